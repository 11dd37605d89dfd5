"""Shared test set-up: the Triton interpreter on machines without a GPU, seeds, the cuda marker."""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported; fused_attn imports it lazily, so setting it
# here (before any test module runs a kernel) makes the Triton kernels run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_runtest_setup(item):
    if "cuda" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# (backend, device) pairs every kernel test runs on; unavailable ones skip with their reason.
# "cuda-emu" is the CUDA kernels' source run on CPU under an emulation of CUDA (tests/_cuda_emu.py).
ENGINES = [
    pytest.param(("triton", "cpu"), id="triton-interp"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("cuda-emu", "cpu"), id="cuda-emu"),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.cuda),
    pytest.param(("cuda", "cuda"), id="cuda-ext", marks=pytest.mark.cuda),
]


@pytest.fixture(params=ENGINES)
def engine(request):
    """(backend name, device) of a kernel engine that can run here."""
    from fused_attn import backends

    name, device = request.param
    if name == "cuda-emu":
        import _cuda_emu

        why = _cuda_emu.unavailable()
        if why is None:
            try:
                _cuda_emu.register()
            except RuntimeError as e:
                why = str(e)
        if why:
            pytest.skip(f"CUDA emulation unavailable: {why}")
    why = backends.reasons(name, torch.empty(1, 1, 1, 16, device=device))
    if why:
        pytest.skip(f"backend {name!r} unavailable: {'; '.join(why)}")
    if name == "triton" and device == "cpu":
        import _triton_interp

        _triton_interp.round_bf16_to_nearest()    # fp32 -> bf16 as on the GPU (see the module)
        _triton_interp.speed_up()                 # same values, faster (see the module)
    return name, device


def is_interpreted(name, device):
    """Kernel code run by an interpreter or emulator on CPU (Triton, CUDA): keep shapes small."""
    return name in ("triton", "cuda", "cuda-emu") and device == "cpu"
