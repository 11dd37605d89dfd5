"""Size limits: calls too large for an engine's 32-bit index arithmetic, its launch grid or the
dropout RNG's counter raise ValueError before any kernel runs; sizes just inside the limits,
and everything the 64-bit paths cover, pass the checks.  Built from zero-stride (expanded) or
meta tensors, since real ones would not fit in memory (docs/attention.md, "Size limits")."""
import pytest
import torch

import fused_attn
from fused_attn import masks
from fused_attn._checks import check_sizes


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def expanded(B, H, S, D, device="cpu"):
    """[B, H, S, D] of zeros in 2 * D bytes: stride 0 everywhere but the head dim."""
    return torch.zeros(1, 1, 1, D, dtype=torch.float16, device=device).expand(B, H, S, D)


def check(q, k, engine, mask=None, dropout_p=0.0):
    B, H, Sq, _ = q.shape
    red = masks.reduce_mask(mask, B, H, Sq, k.shape[2], device=q.device)
    check_sizes(q, k, k, red, dropout_p, engine)


def test_dropout_counter_limit_raises_before_any_kernel(engine):
    """ceil(Sq / 4) * Sk > 2^32 repeats the Philox counter: ValueError, on every engine, without
    running the (2^17)^2-score kernel (which would not finish in the test's lifetime)."""
    name, device = engine
    S = 2**17 + 4                                 # ceil(S / 4) * S = (2^15 + 1) (2^17 + 4) > 2^32
    q = expanded(1, 1, S, 16, device)
    with pytest.raises(ValueError, match=r"dropout_p > 0.*2\^32"):
        fused_attn.attention(q, q, q, dropout_p=0.1, backend=name)


# ids not equal to "cuda": conftest skips tests whose keywords include the cuda marker's name
@pytest.mark.parametrize("engine_name", ["cpu", "triton", "cuda"], ids=lambda e: f"{e}-limits")
def test_dropout_counter_boundary(engine_name):
    sq, sk = 4 * 2**16, 2**16                     # ceil(Sq / 4) * Sk == 2^32: the last counter is 2^32 - 1
    check(meta(1, 1, sq, 16), meta(1, 1, sk, 16), engine_name, dropout_p=0.1)
    with pytest.raises(ValueError, match="keep-mask would repeat"):
        check(meta(1, 1, sq + 1, 16), meta(1, 1, sk, 16), engine_name, dropout_p=0.1)
    check(meta(1, 1, sq + 1, 16), meta(1, 1, sk, 16), engine_name, dropout_p=0.0)   # no dropout, no limit


def test_triton_batch_heads_grid_limit():
    """B * H is the Triton grid's axis y (<= 65535 on CUDA): a clear ValueError through the API."""
    q = meta(4096, 16, 8, 64)                     # B * H = 65536
    with pytest.raises(ValueError, match="B \\* H = 65536.*65535"):
        fused_attn.attention(q, q, q, backend="triton")
    check(meta(4095, 16, 8, 64), meta(4095, 16, 8, 64), "triton")
    check(q, q, "cpu")                            # the C++ kernel loops over B * H: no limit


def test_triton_slice_offsets_are_32_bit_batch_bases_64_bit():
    # HF layout [B, S, H, D] viewed as [B, H, S, D]: the row stride is H * D, so one slice spans
    # S * H * D elements; at 2^31 the kernels' row * stride offsets would wrap
    S, H, D = 2**31 // (16 * 128) + 1, 16, 128
    q = meta(1, S, H, D).transpose(1, 2)
    with pytest.raises(ValueError, match=r"q: one \(batch, head\) slice .*32-bit"):
        fused_attn.attention(q, q, q, backend="triton")
    check(meta(1, S - 1, H, D).transpose(1, 2), meta(1, S - 1, H, D).transpose(1, 2), "triton")
    # the same S as contiguous [B, H, S, D]: 2^31+ elements in all, slices of S * D: fine, because
    # batch and head bases are 64-bit
    c = meta(2, H, S, D)
    assert c.numel() > 2**32
    check(c, c, "triton")
    check(q, q, "cpu")


def test_triton_mask_offsets():
    """A per-pair mask whose (batch, head) slice has >= 2^31 entries cannot be indexed in 32 bits;
    a key-padding mask of the same lengths can."""
    sq, sk = 2**16, 2**15 + 1
    q, k = meta(1, 1, sq, 64), meta(1, 1, sk, 64)
    pair = torch.empty(1, sq, sk, device="meta", dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask: one .* 32-bit"):
        fused_attn.attention(q, k, k, pair, backend="triton")
    check(q, k, "triton", mask=torch.empty(1, sk, device="meta", dtype=torch.bool))
    check(q, k, "cpu", mask=pair)


def test_cuda_grid_limits():
    rows = 32 * 65535                              # blocks of 32 rows on grid axis y
    check(meta(1, 1, rows, 64), meta(1, 1, rows, 64), "cuda")
    with pytest.raises(ValueError, match="CUDA kernels launch"):
        check(meta(1, 1, rows + 1, 64), meta(1, 1, 8, 64), "cuda")
    with pytest.raises(ValueError, match="CUDA kernels launch"):
        check(meta(1, 1, 8, 64), meta(1, 1, rows + 1, 64), "cuda")     # the dK/dV kernel's key blocks
    check(meta(1, 1, rows + 1, 64), meta(1, 1, 8, 64), "cpu")
