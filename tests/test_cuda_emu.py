"""The CUDA emulation behind the "cuda-emu" engine (tests/_cuda_emu.py) computes what a GPU would
for warp shuffles, shared memory and barriers, and stops at the bugs it promises to catch: without
that, its passing runs of the CUDA kernels would mean little."""
import pytest
import torch

import _cuda_emu

pytestmark = pytest.mark.skipif(_cuda_emu.unavailable() is not None,
                                reason=f"CUDA emulation unavailable: {_cuda_emu.unavailable()}")


@pytest.fixture(scope="module")
def ops():
    return _cuda_emu.load()


def test_warp_shuffles(ops):
    out = ops.selftest("shuffles", 2, 96).view(2, 3, 32)
    warp = torch.arange(3, dtype=torch.float32)[None, :, None]
    expected = sum(range(32)) + 100.0 * (3 + 32 * warp)
    assert torch.equal(out, expected.expand(2, 3, 32))


def test_shared_memory_and_barrier(ops):
    out = ops.selftest("shared", 3, 64).view(3, 64)
    expected = ((torch.arange(64) + 1) % 64).float()
    assert torch.equal(out, expected.expand(3, 64))


@pytest.mark.parametrize("case, message", [
    ("divergent_barrier", "deadlocked"),
    ("early_exit_shuffle", "deadlocked"),
    ("partial_mask_shuffle", "only full-mask shuffles"),
    ("shared_overflow", "past the 256 bytes"),
    ("too_much_shared", "65536 bytes of dynamic shared memory"),
])
def test_bugs_stop_the_launch(ops, case, message):
    with pytest.raises(RuntimeError, match=message):
        ops.selftest(case, 2, 64)


def test_launch_after_a_failed_one(ops):
    with pytest.raises(RuntimeError):
        ops.selftest("divergent_barrier", 1, 64)
    test_shared_memory_and_barrier(ops)


def test_uninitialized_shared_memory_reads_nan(ops):
    assert torch.isnan(ops.selftest("uninitialized_shared", 1, 32)).all()
