"""Backward pass and in-kernel dropout of every kernel engine against the oracle."""
import numpy as np
import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn._rng import philox_rng, rng_tensor
from _utils import assert_tolerance, eager_attention
from cases import MASK_KINDS, make_mask, make_qkv, random_case
from conftest import is_interpreted


def grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def check_backward(engine, B, H, Sq, Sk, D, dtype, mask="none", causal=False, layout="contiguous",
                   head_mask=None, seed=0, window_size=(-1, -1), kv_heads=None):
    """kv_heads: grouped-query k / v (the first kv_heads heads of k, v: strided leaves)."""
    name, device = engine
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, Sq, Sk, D, dtype, device, layout, requires_grad=True, g=g)
    if kv_heads is not None:
        k, v = (t.detach()[:, :kv_heads].requires_grad_() for t in (k, v))
    m = make_mask(mask, B, H, Sq, Sk, dtype, device, g=g)
    hm = head_mask.to(device) if head_mask is not None else None
    grad_out = torch.randn(B, H, Sq, D, generator=g).to(device=device, dtype=dtype)
    w = window_size
    got = grads(lambda a, b, c: fused_attn.attention(a, b, c, m, causal=causal, head_mask=hm, backend=name,
                                                     window_size=w), q, k, v, grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    oracle = grads(lambda a, b, c: reference.attention(a, b, c, m, causal=causal, head_mask=hm, window_size=w),
                   q32, k32, v32, grad_out.float())
    eager = grads(lambda a, b, c: eager_attention(a, b, c, m, causal=causal, head_mask=hm, window_size=w),
                  q, k, v, grad_out)
    for label, x, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert x.dtype == dtype
        assert x.shape == o.shape
        assert_tolerance(f"{label}[{name}, {mask}, causal={causal}, {dtype}, window={w}, kv_heads={kv_heads}]",
                         x, o, e)
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_grad_mask_forms(engine, mask, causal):
    check_backward(engine, 2, 2, 45, 70, 32, torch.float16, mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 63, 65), (1, 2, 97, 33)])
def test_grad_shapes_dtypes(engine, shape, dtype):
    B, H, Sq, Sk = shape
    check_backward(engine, B, H, Sq, Sk, 64, dtype, mask="pad-left", layout="hf")


@pytest.mark.parametrize("D", [16, 48, 80, 128])
def test_grad_head_dims(engine, D):
    check_backward(engine, 1, 2, 33, 40, D, torch.float16, mask="pad-holes")


@pytest.mark.parametrize("sq,sk", [(20, 77), (77, 20), (1, 50)])
def test_grad_causal_cross(engine, sq, sk):
    check_backward(engine, 2, 2, sq, sk, 32, torch.float32, mask="pad-right", causal=True, layout="fused-kv")


def test_grad_head_mask(engine):
    check_backward(engine, 2, 3, 31, 31, 32, torch.float32, mask="pair",
                   head_mask=torch.tensor([[0.0, 0.5, 1.0], [1.0, 2.0, 0.25]]))


@pytest.mark.parametrize("seed", range(8))
def test_grad_random_cases(engine, seed):
    c = random_case(100 + seed, small=is_interpreted(*engine))
    check_backward(engine, c["B"], c["H"], c["Sq"], c["Sk"], c["D"], c["dtype"], mask=c["mask"],
                   causal=c["causal"], layout=c["layout"], seed=seed)


def test_rows_that_see_nothing_get_zero_grads(engine):
    name, device = engine
    q, k, v = make_qkv(2, 2, 33, 40, 32, torch.float16, device, requires_grad=True)
    m = torch.ones(2, 33, 40, dtype=torch.bool, device=device)
    m[0] = False
    m[1, 3:7] = False
    out = fused_attn.attention(q, k, v, m, backend=name)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dq[1, :, 3:7] == 0).all() and (dq[1, :, 7:] != 0).any()


def test_gradients_are_bitwise_repeatable(engine):
    name, device = engine
    q, k, v = make_qkv(2, 2, 50, 70, 32, torch.float16, device, requires_grad=True)
    m = make_mask("pair", 2, 2, 50, 70, device=device)
    go = torch.randn(2, 2, 50, 32, device=device, dtype=torch.float16)
    first = grads(lambda a, b, c: fused_attn.attention(a, b, c, m, causal=True, backend=name), q, k, v, go)
    again = grads(lambda a, b, c: fused_attn.attention(a, b, c, m, causal=True, backend=name), q, k, v, go)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_gradcheck_reference_fp64():
    """The oracle's own gradients (used above) are right: finite differences in fp64."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 5, 7, 4, torch.float64, requires_grad=True, g=g)
    for kind, causal in (("pad-right", False), ("pair", True), ("additive-bias", False)):
        m = make_mask(kind, 1, 2, 5, 7, dtype=torch.float64, g=g)
        assert torch.autograd.gradcheck(
            lambda a, b, c: reference.attention(a, b, c, m, causal=causal, head_mask=torch.tensor([0.5, 1.0], dtype=torch.float64)),
            (q, k, v))


# -- dropout --------------------------------------------------------------------------------


def _keep_mask(engine, B, H, Sq, Sk, p, seed, offset, device):
    from fused_attn import backends
    return backends.get(engine[0]).keep_mask(B, H, Sq, Sk, p, rng_tensor(seed, offset, device))


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device != "cpu" else torch.get_rng_state()


def _set_rng_state(state, device):
    if device != "cpu":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@pytest.mark.parametrize("mask,causal", [("none", False), ("pad-right", True), ("pair", False)])
def test_dropout_matches_reference_exactly(engine, mask, causal):
    """Same keep-mask in kernel and reference -> same output and gradients (tolerance rule)."""
    name, device = engine
    B, H, Sq, Sk, D, p = 2, 2, 37, 45, 32, 0.25
    q, k, v = make_qkv(B, H, Sq, Sk, D, torch.float32, device, requires_grad=True)
    m = make_mask(mask, B, H, Sq, Sk, device=device)
    go = torch.randn(B, H, Sq, D, device=device)
    state = _rng_state(device)
    got = grads(lambda a, b, c: fused_attn.attention(a, b, c, m, causal=causal, dropout_p=p, backend=name), q, k, v, go)
    _set_rng_state(state, device)
    seed, offset = philox_rng(torch.device(device)).tolist()
    keep = _keep_mask(engine, B, H, Sq, Sk, p, seed, offset, device)
    oracle = grads(lambda a, b, c: reference.attention(a, b, c, m, causal=causal, dropout_p=p, dropout_mask=keep),
                   q, k, v, go)
    eager = grads(lambda a, b, c: eager_attention(a, b, c, m, causal=causal, dropout_mask=keep, dropout_p=p),
                  q, k, v, go)
    for label, x, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert_tolerance(f"dropout {label}", x, o, e)


def _philox_keep_numpy(B, H, Sq, Sk, p, seed, offset):
    """The keep-mask as DESIGN'd, written independently of the kernels: Philox-4x32-10 with key
    = seed's two 31-bit halves, counter = ((i // 4) * Sk + j, b * H + h, offset's two 31-bit
    halves); element (i, j) takes word i % 4, as Triton's uint_to_uniform_float; keep iff >= p."""
    M32 = np.uint64(0xFFFFFFFF)
    i = np.arange(Sq, dtype=np.uint64)[:, None]
    j = np.arange(Sk, dtype=np.uint64)[None, :]
    out = np.empty((B * H, Sq, Sk), dtype=bool)
    for bh in range(B * H):
        c = [((i // np.uint64(4)) * np.uint64(Sk) + j) & M32, np.full_like(i * j, bh),
             np.full_like(i * j, offset & 0x7FFFFFFF), np.full_like(i * j, (offset >> 31) & 0x7FFFFFFF)]
        k0, k1 = np.uint64(seed & 0x7FFFFFFF), np.uint64((seed >> 31) & 0x7FFFFFFF)
        for _ in range(10):
            n0 = (((np.uint64(0xCD9E8D57) * c[2]) >> np.uint64(32)) ^ c[1] ^ k0) & M32
            n2 = (((np.uint64(0xD2511F53) * c[0]) >> np.uint64(32)) ^ c[3] ^ k1) & M32
            c = [n0, (np.uint64(0xCD9E8D57) * c[2]) & M32, n2, (np.uint64(0xD2511F53) * c[0]) & M32]
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
        word = np.choose((i % np.uint64(4)).astype(np.int64) + np.zeros((1, Sk), np.int64), c)
        x = word.astype(np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x)
        out[bh] = x.astype(np.float32) * np.float32(4.6566127342e-10) >= np.float32(p)
    return torch.from_numpy(out.reshape(B, H, Sq, Sk))


def test_dropout_keep_mask_is_the_documented_philox_stream(engine):
    """Every engine draws exactly the documented mask (so engines agree with each other)."""
    name, device = engine
    B, H, Sq, Sk, p, seed, offset = 2, 3, 37, 45, 0.3, 2**40 + 12345, 2**33 + 8
    keep = _keep_mask(engine, B, H, Sq, Sk, p, seed, offset, device)
    assert torch.equal(keep.cpu(), _philox_keep_numpy(B, H, Sq, Sk, p, seed, offset))


def test_dropout_statistics_and_seeding(engine):
    name, device = engine
    B, H, S, D, p = 2, 2, 64, 16, 0.3
    keep = _keep_mask(engine, B, H, S, S, p, 1234, 8, device)
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - p) < 0.02, rate                       # 16k draws: sigma ~ 0.004
    assert not torch.equal(keep, _keep_mask(engine, B, H, S, S, p, 1234, 12, device))
    assert not torch.equal(keep, _keep_mask(engine, B, H, S, S, p, 1235, 8, device))
    # expected value preserved: E[dropout(P) V] = P V; with v = 1 every row of the output is the
    # mean of kept/(1-p) probabilities, averaging to 1
    q = torch.randn(B, H, S, D, device=device)
    k = torch.randn(B, H, S, D, device=device)
    v = torch.ones(B, H, S, D, device=device)
    out = fused_attn.attention(q, k, v, dropout_p=p, backend=name)
    assert abs(out.mean().item() - 1.0) < 0.03
    # consecutive calls differ; torch.manual_seed repeats a run exactly
    torch.manual_seed(7)
    a = fused_attn.attention(q, k, torch.randn_like(k), dropout_p=p, backend=name)
    b = fused_attn.attention(q, k, v, dropout_p=p, backend=name)
    torch.manual_seed(7)
    a2 = fused_attn.attention(q, k, torch.randn_like(k), dropout_p=p, backend=name)
    b2 = fused_attn.attention(q, k, v, dropout_p=p, backend=name)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(b, fused_attn.attention(q, k, v, dropout_p=p, backend=name))


def test_dropout_reads_the_rng_tensor(engine):
    """The kernels take (seed, offset) from the rng tensor when they run (graph-safe RNG state):
    rewriting its values in place changes the dropout of forward and backward, writing the old
    values back repeats it bitwise, and a run is the reference with the keep-mask of its values."""
    from fused_attn import backends
    from fused_attn.masks import ReducedMask

    name, device = engine
    eng = backends.get(name)
    B, H, Sq, Sk, D, p = 1, 2, 21, 30, 16, 0.3
    q, k, v = make_qkv(B, H, Sq, Sk, D, torch.float32, device, requires_grad=True)
    go = torch.randn(B, H, Sq, D, device=device)
    red = ReducedMask("none", B, H, Sq, Sk)
    rng = rng_tensor(0, 0, device)
    kw = dict(causal=False, dropout_p=p, scale=D ** -0.5, rng=rng)

    def run(seed, offset):
        rng.copy_(torch.tensor([seed, offset]))
        with torch.no_grad():
            out, lse = eng.forward(q, k, v, red, **kw)
            return (out, *eng.backward(go, q, k, v, out, lse, red, **kw))

    seed, offset = 2**40 + 5, 2**33 + 4
    first = run(seed, offset)
    other_offset, other_seed = run(seed, offset + 4), run(7, offset)
    again = run(seed, offset)
    for label, x, x2, y, z in zip(("out", "dq", "dk", "dv"), first, again, other_offset, other_seed):
        assert torch.equal(x, x2), f"{label}: the same (seed, offset) values gave another result"
        assert not torch.equal(x, y) and not torch.equal(x, z), f"{label}: new rng values, same dropout"
    keep = _keep_mask(engine, B, H, Sq, Sk, p, seed, offset, device)
    oracle = grads(lambda a, b, c: reference.attention(a, b, c, dropout_p=p, dropout_mask=keep), q, k, v, go)
    eager = grads(lambda a, b, c: eager_attention(a, b, c, dropout_mask=keep, dropout_p=p), q, k, v, go)
    for label, x, o, e in zip(("out", "dq", "dk", "dv"), first, oracle, eager):
        assert_tolerance(f"rng-tensor dropout {label}", x, o, e)
    # dropout without the tensor is an error that says so, not a silently fixed seed
    with pytest.raises((ValueError, RuntimeError), match="rng"):
        eng.forward(q.detach(), k.detach(), v.detach(), red, **dict(kw, rng=None))
