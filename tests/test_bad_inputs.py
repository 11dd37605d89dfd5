"""Bad input on every engine: NaN / Inf in q, k or v, zero-size dimensions, mixed devices or
dtypes, masks of every wrong shape or dtype, bad scalars.  Each gets the reference's (eager's)
result or a clear ValueError / TypeError naming the argument -- never a crash or a hang (a
watchdog kills a hung test's process, which pytest reports as a crash)."""
import faulthandler

import pytest
import torch

import fused_attn
from fused_attn import reference
from _utils import padding_mask

B, H, SQ, SK, D = 2, 2, 40, 70, 16
# the Triton interpreter's numpy arithmetic warns about the NaN / Inf these tests feed it
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def qkv(device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, s, D, generator=g).to(device, dtype).requires_grad_(requires_grad)
            for s in (SQ, SK, SK)]


def holes_mask(device="cpu"):
    m = padding_mask([SK, 50], SK, device=device)
    m[0, 5] = False                                   # a hole inside batch 0's range
    return m


# -- NaN / Inf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which,where", [("q", (0, 0, 3, 2)), ("k", (0, 1, 7, 1)), ("v", (1, 0, 9, 0))])
def test_nonfinite_inputs_propagate_like_the_reference(engine, which, where, value):
    """A NaN / Inf at a visible position reaches exactly the outputs it reaches in the reference;
    every other (batch, head) slice is finite and right, forward and backward."""
    name, device = engine
    t = qkv(device)
    t["qkv".index(which)][where] = value
    t = [x.requires_grad_() for x in t]
    mask = holes_mask(device)
    out = fused_attn.attention(*t, mask, backend=name)
    ref = reference.attention(*t, mask)
    bad = ~torch.isfinite(ref)
    assert bad.any()
    assert torch.equal(~torch.isfinite(out), bad), "non-finite outputs differ from the reference's"
    torch.testing.assert_close(out[~bad], ref[~bad], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out, t, torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, t, torch.ones_like(ref))
    b, h = where[:2]
    for g, r in zip(grads, ref_grads):           # the slices the bad value cannot reach
        other = torch.ones(B, H, dtype=torch.bool)
        other[b, h] = False
        assert torch.isfinite(g[other]).all()
        torch.testing.assert_close(g[other], r[other], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["holes", "pair", "additive", "causal"])
def test_nan_in_a_hidden_key_stays_hidden(engine, kind, request):
    """A key the mask hides is not attended to, whatever its values: a NaN in its k changes no
    output (the reference fills hidden scores with -inf; so do SDPA and FlashAttention)."""
    name, device = engine
    q, k, v = qkv(device)
    mask, causal, key = None, False, 5
    if kind == "holes":
        mask = holes_mask(device)
    elif kind == "pair":
        mask = torch.ones(B, SQ, SK, dtype=torch.bool, device=device)
        mask[0, :, 5] = False
    elif kind == "additive":
        mask = torch.zeros(B, 1, 1, SK, device=device)
        mask[0, ..., 5] = torch.finfo(torch.float32).min
    else:
        causal, key = True, SK - 1                  # the last key: hidden from every row but the last
    k[0, 0, key, 1] = float("nan")
    out = fused_attn.attention(q, k, v, mask, causal=causal, backend=name)
    ref = reference.attention(q, k, v, mask, causal=causal)
    bad = ~torch.isfinite(ref)
    assert torch.equal(~torch.isfinite(out), bad), (
        f"{int((~torch.isfinite(out)).sum())} non-finite outputs, the reference has {int(bad.sum())}")
    torch.testing.assert_close(out[~bad], ref[~bad], atol=1e-5, rtol=1e-5)


def test_nan_in_hidden_values_is_never_read_past_the_mask(engine):
    """v of hidden keys: the reference computes 0 * v (NaN for a NaN v) while the kernels skip
    wholly hidden tiles -- so only no-crash and 'rows of other slices are untouched' hold."""
    name, device = engine
    q, k, v = qkv(device)
    v[1, 0, 60, 0] = float("nan")                  # batch 1 sees keys [0, 50)
    out = fused_attn.attention(q, k, v, holes_mask(device), backend=name)
    ref = reference.attention(q, k, v, holes_mask(device))
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out[1, 1]).all()


# -- shapes, devices, dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("dim,tensor", [(1, "q"), (3, "q"), (0, "kv"), (1, "kv"), (3, "kv")])
def test_zero_size_dims_raise(engine, dim, tensor):
    """No heads, no head dim, or a batch mismatch; B, Sq, Sk = 0 give an empty result (test_edges.py)."""
    name, device = engine
    q, k, v = qkv(device)
    if tensor == "q":
        q = q.narrow(dim, 0, 0)
    else:
        k, v = k.narrow(dim, 0, 0), v.narrow(dim, 0, 0)
    with pytest.raises(ValueError, match=r"heads and head dim must be >= 1|does not match|must equal"):
        fused_attn.attention(q, k, v, backend=name)


def test_mixed_devices_raise(engine):
    name, device = engine
    q, k, v = qkv(device)
    other = torch.empty(B, H, SK, D, device="meta")
    with pytest.raises(ValueError, match="devices differ"):
        fused_attn.attention(q, other, v, backend=name)
    with pytest.raises(ValueError, match="attention_mask: mask is on meta"):
        fused_attn.attention(q, k, v, torch.ones(B, SK, dtype=torch.bool, device="meta"), backend=name)
    with pytest.raises(ValueError, match="head_mask: is on meta"):
        fused_attn.attention(q, k, v, head_mask=torch.ones(H, device="meta"), backend=name)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32, torch.float32),
                                    (torch.float32, torch.float32, torch.bfloat16),
                                    (torch.float64,) * 3, (torch.int32,) * 3, (torch.complex64,) * 3,
                                    (torch.float8_e4m3fn,) * 3])
def test_mixed_or_unsupported_dtypes_raise(engine, dtypes):
    name, device = engine
    t = [torch.zeros(B, H, s, D, device=device).to(dt) for s, dt in zip((SQ, SK, SK), dtypes)]
    with pytest.raises(TypeError, match=r"dtype|dtypes differ"):
        fused_attn.attention(*t, backend=name)


def test_non_tensor_and_wrong_rank_inputs_raise(engine):
    name, device = engine
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        fused_attn.attention(q.tolist(), k, v, backend=name)
    with pytest.raises(ValueError, match=r"k: expected 4 dims"):
        fused_attn.attention(q, k[0], v, backend=name)
    with pytest.raises(ValueError, match=r"k: shape .* does not match q"):
        fused_attn.attention(q, k[..., :8], v[..., :8], backend=name)
    with pytest.raises(ValueError, match=r"v: shape .* must equal k"):
        fused_attn.attention(q, k, v[:, :, :9], backend=name)


# -- masks ---------------------------------------------------------------------------------------


WRONG_SHAPES = [(SK,), (B + 1, SK), (B, SK + 1), (1, SK), (B, SQ + 1, SK), (B, SQ, SK - 1), (1, SQ, SK),
                (B, H + 1, SQ, SK), (B + 1, 1, 1, SK), (B, 1, SQ - 1, SK), (B, 1, 1, 1), (B, H, SQ, 1),
                (1, B, H, SQ, SK), ()]


@pytest.mark.parametrize("shape", WRONG_SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_masks_of_wrong_shape_raise(engine, shape):
    name, device = engine
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="attention_mask"):
        fused_attn.attention(q, k, v, torch.ones(shape, dtype=torch.bool, device=device), backend=name)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.uint32, torch.float8_e5m2])
def test_masks_of_unsupported_dtype_raise(engine, dtype):
    name, device = engine
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match=r"attention_mask: dtype .* is not accepted"):
        fused_attn.attention(q, k, v, torch.ones(B, SK, device=device).to(dtype), backend=name)


def test_non_tensor_masks_raise(engine):
    name, device = engine
    q, k, v = qkv(device)
    for bad in (holes_mask().tolist(), holes_mask().numpy(), 1.0, "padding"):
        with pytest.raises(TypeError, match="attention_mask: expected a torch.Tensor"):
            fused_attn.attention(q, k, v, bad, backend=name)
    red = fused_attn.reduce_mask(holes_mask(device), B, H, SQ + 1, SK)
    with pytest.raises(ValueError, match="ReducedMask was built for"):
        fused_attn.attention(q, k, v, red, backend=name)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_accepted_mask_dtype_gives_the_reference(engine, dtype):
    """The other side of the dtype sweep: each accepted dtype is read as the reference reads it."""
    name, device = engine
    q, k, v = qkv(device)
    m = holes_mask(device)
    mask = m.to(dtype) if not dtype.is_floating_point else torch.where(m, 0.0, -1e4).to(dtype)
    out = fused_attn.attention(q, k, v, mask, backend=name)
    torch.testing.assert_close(out, reference.attention(q, k, v, mask), atol=2e-5, rtol=1e-5)


def test_additive_mask_inf_entries(engine):
    """A +inf entry makes its rows NaN, as in the reference -- and nothing crashes.  (NaN in a mask is
    refused: test_edges.py.)"""
    name, device = engine
    q, k, v = qkv(device)
    mask = torch.zeros(B, 1, SQ, SK, device=device)
    mask[0, 0, :, 3] = -float("inf")
    mask[1, 0, 7, 4] = float("inf")
    out = fused_attn.attention(q, k, v, mask, backend=name)
    ref = reference.attention(q, k, v, mask)
    assert torch.equal(~torch.isfinite(out), ~torch.isfinite(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-5, rtol=1e-5)


# -- scalars -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error", [
    (dict(dropout_p=1.0), ValueError), (dict(dropout_p=-0.1), ValueError), (dict(dropout_p=float("nan")), ValueError),
    (dict(dropout_p="0.1"), ValueError), (dict(scale=float("nan")), TypeError), (dict(scale="1"), TypeError),
    (dict(causal=2), TypeError), (dict(causal=None), TypeError), (dict(backend="gpu"), ValueError),
    (dict(head_mask=torch.ones(H + 1)), ValueError), (dict(head_mask=torch.ones(B, H, 1)), ValueError),
    (dict(head_mask=[1.0, 1.0]), TypeError)])
def test_bad_scalars_raise(engine, kwargs, error):
    name, device = engine
    q, k, v = qkv(device)
    kwargs = {"backend": name, **kwargs}
    with pytest.raises(error):
        fused_attn.attention(q, k, v, **kwargs)
