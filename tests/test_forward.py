"""Forward pass of every kernel engine against the fp32 oracle (docs/design.md tolerance rule)."""
import pytest
import torch

import fused_attn
from fused_attn import reference
from _utils import assert_tolerance, eager_attention
from cases import MASK_KINDS, make_mask, make_qkv, random_case
from conftest import is_interpreted

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check_forward(engine, B, H, Sq, Sk, D, dtype, mask="none", causal=False, layout="contiguous",
                  head_mask=None, scale=None, seed=0, window_size=(-1, -1), kv_heads=None):
    """kv_heads: grouped-query k / v (the first kv_heads heads of k, v: strided views)."""
    name, device = engine
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, Sq, Sk, D, dtype, device, layout, g=g)
    if kv_heads is not None:
        k, v = k[:, :kv_heads], v[:, :kv_heads]
    m = make_mask(mask, B, H, Sq, Sk, dtype, device, g=g)
    hm = head_mask.to(device) if head_mask is not None else None
    out = fused_attn.attention(q, k, v, m, causal=causal, scale=scale, head_mask=hm, backend=name,
                               window_size=window_size)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    oracle = reference_fp32(q, k, v, m, causal, scale, hm, window_size)
    eager = eager_attention(q, k, v, m, causal=causal, scale=scale, head_mask=hm, window_size=window_size)
    assert_tolerance(f"out[{name}, {mask}, causal={causal}, window={window_size}, kv_heads={kv_heads}]",
                     out, oracle, eager)
    return out, oracle


def reference_fp32(q, k, v, m, causal, scale, hm, window_size=(-1, -1)):
    """The oracle's fp32 result, before it is rounded back to the input dtype."""
    return reference.attention(q.float(), k.float(), v.float(), m, causal=causal, scale=scale, head_mask=hm,
                               window_size=window_size)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_mask_forms(engine, mask, causal):
    check_forward(engine, 2, 2, 65, 97, 32, torch.float16, mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 2, 63, 65), (1, 2, 65, 63), (2, 1, 129, 129), (1, 1, 17, 200)])
def test_shapes_dtypes(engine, shape, dtype):
    B, H, Sq, Sk = shape
    check_forward(engine, B, H, Sq, Sk, 64, dtype, mask="pad-right")


@pytest.mark.parametrize("D", [16, 32, 48, 80, 96, 128])
def test_head_dims(engine, D):
    check_forward(engine, 2, 2, 40, 50, D, torch.float16, mask="pad-holes")


@pytest.mark.parametrize("layout", ["hf", "fused-kv"])
def test_strided_inputs(engine, layout):
    check_forward(engine, 2, 3, 33, 47, 32, torch.float16, mask="pad-left", layout=layout)


@pytest.mark.parametrize("sq,sk", [(1, 64), (20, 77), (77, 20), (64, 64), (5, 1)])
@pytest.mark.parametrize("mask", ["none", "pad-right", "pair"])
def test_causal_cross_lengths(engine, sq, sk, mask):
    """Causal stays bottom-right aligned for Sk > Sq (past keys) and Sk < Sq."""
    check_forward(engine, 2, 2, sq, sk, 32, torch.float32, mask=mask, causal=True)


@pytest.mark.parametrize("shape", ["H", "BH"])
def test_head_mask_and_scale(engine, shape):
    hm = torch.tensor([0.0, 0.5, 1.0]) if shape == "H" else torch.rand(2, 3)
    check_forward(engine, 2, 3, 31, 31, 32, torch.float32, mask="pad-right", head_mask=hm, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_that_see_nothing_are_zero(engine, dtype):
    name, device = engine
    q, k, v = make_qkv(2, 2, 33, 40, 32, dtype, device)
    m = torch.ones(2, 33, 40, dtype=torch.bool, device=device)
    m[0] = False                    # every row of batch 0
    m[1, 5:9] = False               # some rows of batch 1
    for mask in (m, torch.zeros(2, 40, dtype=torch.bool, device=device),
                 torch.full((2, 1, 1, 40), torch.finfo(dtype).min, dtype=dtype, device=device)):
        out = fused_attn.attention(q, k, v, mask, backend=name)
        assert torch.isfinite(out).all()
    out = fused_attn.attention(q, k, v, m, backend=name)
    assert (out[0] == 0).all() and (out[1, :, 5:9] == 0).all()
    assert (out[1, :, 9:].abs().sum(-1) > 0).all()
    # causal with Sk < Sq: the first Sq - Sk rows see nothing
    out = fused_attn.attention(q[:, :, :33], k[:, :, :20], v[:, :, :20], causal=True, backend=name)
    assert (out[:, :, :13] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("seed", range(16))
def test_random_cases(engine, seed):
    c = random_case(seed, small=is_interpreted(*engine))
    check_forward(engine, c["B"], c["H"], c["Sq"], c["Sk"], c["D"], c["dtype"], mask=c["mask"],
                  causal=c["causal"], layout=c["layout"], seed=seed)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 3, 1000, 1000, 64), (4, 12, 512, 512, 64), (1, 2, 1025, 4097, 128),
                                   (3, 2, 127, 1025, 80), (2, 4, 2048, 2048, 96)])
@pytest.mark.parametrize("mask", ["pad-right", "pad-holes", "pair-blockdiag", "hf-finfo-additive"])
def test_large_shapes_gpu(shape, mask):
    B, H, Sq, Sk, D = shape
    for causal in (False, True):
        check_forward(("triton", "cuda"), B, H, Sq, Sk, D, torch.float16, mask=mask, causal=causal, layout="hf")


def test_reference_matches_sdpa_and_hf_eager():
    """The oracle itself: bool masks vs torch SDPA, additive masks vs HF's eager formula."""
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 3, 37, 41, 32, torch.float64, g=g)
    for kind in ("pad-right", "pair", "4d-heads"):
        m = make_mask(kind, 2, 3, 37, 41, g=g)
        m4 = m[:, None, None, :] if m.dim() == 2 else (m[:, None] if m.dim() == 3 else m)
        keep_rows = m4.expand(2, 3, 37, 41).any(-1, keepdim=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m4)
        ref = reference.attention(q, k, v, m)
        torch.testing.assert_close(ref * keep_rows, sdpa * keep_rows, rtol=1e-10, atol=1e-10)
        assert (ref[~keep_rows.expand_as(ref)] == 0).all()
    for kind in ("hf-old-additive", "hf-finfo-additive", "additive-bias"):
        m = make_mask(kind, 2, 3, 37, 41, dtype=torch.float64, g=g)
        hf = torch.softmax(q @ k.transpose(-1, -2) * 32 ** -0.5 + m, -1) @ v   # HF eager_attention_forward
        torch.testing.assert_close(reference.attention(q, k, v, m), hf, rtol=1e-10, atol=1e-10)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :37], v[:, :, :37], is_causal=True)
    torch.testing.assert_close(reference.attention(q, k[:, :, :37], v[:, :, :37], causal=True), sdpa)
