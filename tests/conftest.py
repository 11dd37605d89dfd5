"""Shared test set-up: the Triton interpreter on machines without a GPU, seeds, the cuda and
gpu_smoke markers."""
import os
import re

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported; fused_attn imports it lazily, so setting it
# here (before any test module runs a kernel) makes the Triton kernels run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "gpu_smoke: the curated GPU smoke set (GPU_SMOKE below; needs a CUDA GPU)")


# The GPU smoke set: `pytest -m gpu_smoke`, at most ~3 minutes on an H100 (the smoke step of
# benchmarks/gpu_check.py, with 8 pytest-xdist workers).  Existing CUDA tests, picked by node id
# (file::test[param id]; * matches anything): each kernel family (forward, dK/dV, dQ, delta,
# keep-mask) and mask path (none / key padding / block map), each dtype, dropout stored and
# regenerated, varlen, direct launches against Triton's launcher, CUDA-graph replay with dropout,
# the HF integration.  A test can also be marked @pytest.mark.gpu_smoke itself (it then needs a GPU).
GPU_SMOKE = (
    # forward: each dtype (key padding), each mask path
    "test_forward.py::test_shapes_dtypes[triton-gpu-shape1-dtype*]",
    "test_forward.py::test_mask_forms[triton-gpu-none-True]",
    "test_forward.py::test_mask_forms[triton-gpu-pair-blockdiag-False]",
    "test_forward.py::test_mask_forms[triton-gpu-additive-bias-False]",
    "test_forward.py::test_large_shapes_gpu[pad-holes-shape1]",
    # backward: each dtype, key padding with holes + causal, per-head 4-D mask
    "test_backward.py::test_grad_shapes_dtypes[triton-gpu-shape1-dtype*]",
    "test_backward.py::test_grad_mask_forms[triton-gpu-pad-holes-True]",
    "test_backward.py::test_grad_mask_forms[triton-gpu-4d-heads-False]",
    # dropout: the documented stream, the stored keep-mask words, stored vs regenerated, single pass
    "test_backward.py::test_dropout_matches_reference_exactly[triton-gpu-pad-right-True]",
    "test_dropout_bits.py::test_stored_words_are_the_keep_mask[triton-gpu]",
    "test_dropout_bits.py::test_stored_and_regenerated_give_identical_gradients[triton-gpu-pad-right-False-*]",
    "test_dropout_bits.py::test_stored_and_regenerated_give_identical_gradients[triton-gpu-4d-heads-True-*]",
    "test_dropout_bits.py::test_single_pass_backward_with_dropout[triton-gpu-*]",
    # varlen: each dtype, empty and one-token sequences, equal to padded, dropout stored vs regenerated
    "test_varlen.py::test_varlen_dtypes_head_dims[triton-gpu-80-dtype*]",
    "test_varlen.py::test_varlen_forward_backward[triton-gpu-empty-and-one-True]",
    "test_varlen.py::test_varlen_equals_padded[triton-gpu-False]",
    "test_dropout_bits.py::test_varlen_stored_and_regenerated_give_identical_gradients[triton-gpu-True]",
    # launch paths: direct launches bitwise equal to Triton's launcher; CUDA graphs, dropout on replay
    "test_triton_launch.py::test_direct_launch_gpu[*]",
    "test_compile.py::test_cuda_graph_capture_forward_backward[pad-right-triton-gpu]",
    "test_compile.py::test_cuda_graph_dropout_draws_anew_on_every_replay[triton-gpu]",
    # Hugging Face on the GPU
    "test_hf_gpu.py::test_patched_matches_eager_on_gpu[fp16-bert]",
    "test_hf_gpu.py::test_training_with_dropout_on_gpu",
    # local attention (window_size=) and grouped-query k/v
    "test_window.py::test_window_edges_are_exact[triton-gpu-*]",
    "test_window.py::test_window_backward[triton-gpu-*]",
    "test_window.py::test_window_dropout_matches_reference_exactly[triton-gpu-*]",
    "test_window.py::test_window_varlen[triton-gpu-*]",
    "test_window.py::test_gqa_with_window_dropout_head_mask[triton-gpu]",
    # DeBERTa's disentangled score (rel_bias=)
    "test_disentangled.py::test_rel_bias_forward_backward[triton-gpu-*]",
    "test_disentangled.py::test_rel_bias_half[triton-gpu-*]",
    "test_disentangled.py::test_rel_bias_dropout[triton-gpu]",
    "test_disentangled.py::test_rel_bias_varlen[triton-gpu-*]",
)
_SMOKE_RE = [re.compile(".*".join(map(re.escape, p.split("*"))) + "$") for p in GPU_SMOKE]


def gpu_smoke_patterns_matched(nodeids):
    """{pattern: number of node ids it matches} (node ids as pytest prints them, e.g. tests/x.py::t[id])."""
    return {p: sum(1 for n in nodeids if r.match(n.split("/")[-1])) for p, r in zip(GPU_SMOKE, _SMOKE_RE)}


@pytest.hookimpl(tryfirst=True)        # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("/")[-1]
        if any(r.match(name) for r in _SMOKE_RE):
            item.add_marker(pytest.mark.gpu_smoke)


def pytest_runtest_setup(item):
    # markers, not item.keywords: those also hold the names of the parent directories (a checkout
    # in a directory named "cuda" would skip every test)
    if (item.get_closest_marker("cuda") or item.get_closest_marker("gpu_smoke")) and not torch.cuda.is_available():
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
