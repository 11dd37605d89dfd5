"""Packed variable-length attention (fused_attn.varlen_attention) on every engine: against the
fp32 oracle (docs/design.md tolerance rule), against the padded kernels, dropout, validation."""
import pytest
import torch

import fused_attn
from fused_attn import ops, reference
from fused_attn._rng import philox_rng
from fused_attn.packing import SeqLens
from _utils import assert_tolerance, eager_varlen, padding_mask
from cases import cu_seqlens, make_packed, random_varlen_case
from conftest import is_interpreted
from test_backward import _keep_mask, _rng_state, _set_rng_state


def _grads(f, q, k, v, go):
    """(out, dq, dk, dv); keys that no query sees get zero gradients, also from the reference."""
    out = f(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), go, allow_unused=True, materialize_grads=True))


def check_varlen(engine, lens_q, lens_k, H, D, dtype, causal=False, layout="contiguous", backward=True, seed=0,
                 window_size=(-1, -1), kv_heads=None):
    """kv_heads: grouped-query k / v (the first kv_heads heads of the packed k, v)."""
    name, device = engine
    g = torch.Generator().manual_seed(seed)
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, D, dtype, device, layout, requires_grad=backward, g=g)
    if kv_heads is not None:
        k, v = (t.detach()[:, :kv_heads].requires_grad_(backward) for t in (k, v))
    mq, mk = max(lens_q), max(lens_k)
    w = window_size
    go = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)

    def run(f):
        if backward:
            return _grads(f, q, k, v, go)
        with torch.no_grad():
            return (f(q, k, v),)

    got = run(lambda a, b, c: fused_attn.varlen_attention(a, b, c, cu_q, cu_k, mq, mk, causal=causal, backend=name,
                                                          window_size=w))
    oracle = run(lambda a, b, c: reference.varlen_attention(a.float(), b.float(), c.float(), cu_q, cu_k, mq, mk,
                                                            causal=causal, window_size=w))
    eager = run(lambda a, b, c: eager_varlen(a, b, c, cu_q, cu_k, causal=causal, window_size=w))
    assert got[0].shape == q.shape and got[0].dtype == dtype
    for label, x, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert_tolerance(f"varlen {label}[{name}, causal={causal}, {lens_q}/{lens_k}, window={w}, "
                         f"kv_heads={kv_heads}]", x, o, e, dtype=dtype)
    return got


LENGTHS = [
    ([5, 17, 33], [5, 17, 33]),
    ([1, 0, 40, 9], [1, 0, 40, 9]),          # an empty sequence, a single token
    ([12, 30, 3], [20, 7, 3]),               # Sq_b != Sk_b in both directions
    ([6, 4], [0, 11]),                       # queries with no key at all -> exactly 0
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", LENGTHS, ids=["equal", "empty-and-one", "cross", "no-keys"])
def test_varlen_forward_backward(engine, lens, causal):
    check_varlen(engine, lens[0], lens[1], 2, 32, torch.float16, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [16, 80])
def test_varlen_dtypes_head_dims(engine, dtype, D):
    check_varlen(engine, [9, 26, 3], [9, 26, 3], 2, D, dtype, causal=True)


@pytest.mark.parametrize("layout,lens", [("qkv", ([7, 20, 1], [7, 20, 1])), ("kv", ([7, 20], [15, 3]))])
def test_varlen_strided_views(engine, layout, lens):
    """Slices of a fused [T, 3, H, D] QKV projection (or [T, 2, H, D] KV) are read in place."""
    check_varlen(engine, lens[0], lens[1], 3, 32, torch.float16, layout=layout)


@pytest.mark.parametrize("seed", range(6))
def test_varlen_random_cases(engine, seed):
    c = random_varlen_case(500 + seed, small=is_interpreted(*engine))
    check_varlen(engine, c["lens_q"], c["lens_k"], c["H"], c["D"], c["dtype"], causal=c["causal"],
                 layout=c["layout"], seed=seed)


def _pad(x, lens, S):
    """[T, H, D] packed -> [B, H, S, D] right-padded with zeros."""
    cu = cu_seqlens(lens).tolist()
    out = x.new_zeros(len(lens), x.shape[1], S, x.shape[2])
    for b, n in enumerate(lens):
        out[b, :, :n] = x[cu[b]:cu[b + 1]].transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_padded(engine, causal):
    """The packed call and the padded call on the same batch (right padding, key-padding mask)
    give the same real-token outputs and gradients, both within the tolerance of the oracle."""
    name, device = engine
    lens, H, D, S = [13, 40, 1, 27], 2, 32, 40
    q, k, v, cu, _ = make_packed(lens, lens, H, D, torch.float16, device, requires_grad=True)
    go = torch.randn_like(q)
    packed = _grads(lambda a, b, c: fused_attn.varlen_attention(a, b, c, cu, cu, S, S, causal=causal, backend=name),
                    q, k, v, go)
    mask = padding_mask(lens, S, device=device)
    qp, kp, vp = (_pad(t.detach(), lens, S).requires_grad_() for t in (q, k, v))
    gop = _pad(go, lens, S)
    padded = _grads(lambda a, b, c: fused_attn.attention(a, b, c, mask, causal=causal, backend=name), qp, kp, vp, gop)
    oracle = _grads(lambda a, b, c: reference.varlen_attention(a.float(), b.float(), c.float(), cu, cu, S, S,
                                                               causal=causal), q, k, v, go)
    eager = _grads(lambda a, b, c: eager_varlen(a, b, c, cu, cu, causal=causal), q, k, v, go)
    cul = cu.tolist()
    for label, x, xp, o, e in zip(("out", "dq", "dk", "dv"), packed, padded, oracle, eager):
        # causal with padding: a padded query row sees the real keys in the padded call, not in the
        # packed one, so only real rows are compared (the padded rows' dK/dV terms come from dO = 0)
        real = torch.cat([xp[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
        assert_tolerance(f"packed {label}", x, o, e)
        assert_tolerance(f"padded {label}", real, o, e)
    assert cul[-1] == q.shape[0]


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dropout_follows_the_padded_keep_mask(engine, causal):
    """Dropout of sequence b, query i, key j is element [b, h, i, j] of the padded keep-mask for
    [B, H, max_seqlen_q, max_seqlen_k]: the reference given that mask matches exactly."""
    name, device = engine
    lens_q, lens_k, H, D, p = [9, 0, 30], [14, 5, 22], 2, 32, 0.3
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, D, torch.float32, device, requires_grad=True)
    mq, mk = max(lens_q), max(lens_k)
    go = torch.randn_like(q)
    state = _rng_state(device)
    got = _grads(lambda a, b, c: fused_attn.varlen_attention(a, b, c, cu_q, cu_k, mq, mk, dropout_p=p,
                                                             causal=causal, backend=name), q, k, v, go)
    _set_rng_state(state, device)
    seed, offset = philox_rng(torch.device(device)).tolist()
    keep = _keep_mask(engine, len(lens_q), H, mq, mk, p, seed, offset, device)
    oracle = _grads(lambda a, b, c: reference.varlen_attention(a, b, c, cu_q, cu_k, mq, mk, dropout_p=p, causal=causal,
                                                               dropout_mask=keep), q, k, v, go)
    eager = _grads(lambda a, b, c: eager_varlen(a, b, c, cu_q, cu_k, causal=causal, dropout_mask=keep, dropout_p=p),
                   q, k, v, go)
    for label, x, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert_tolerance(f"varlen dropout {label}", x, o, e)
    # and dropout really happened: without it the output differs
    with torch.no_grad():
        plain = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=name)
    assert (plain - got[0]).abs().max() > 1e-2


def test_varlen_compile_fullgraph(engine):
    name, device = engine
    lens = [6, 19, 2]
    q, k, v, cu, _ = make_packed(lens, lens, 2, 16, torch.float32, device, requires_grad=True)

    def f(q, k, v, cu):
        return fused_attn.varlen_attention(q, k, v, cu, cu, 19, 19, causal=True, backend=name)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    out_ref = f(q, k, v, cu)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_varlen_opcheck(engine):
    name, device = engine
    lens = [6, 19, 2]
    q, k, v, cu, _ = make_packed(lens, lens, 2, 16, torch.float32, device, requires_grad=True)
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    args = (q4, k4, v4, None, None, None, None, None, None, "none", False, True, 0.25, 0.0, name, cu, cu, 19, 19)
    torch.library.opcheck(ops.attn_forward, args)


def test_varlen_garbage_cu_seqlens_stay_in_bounds(engine):
    """Unvalidated cu_seqlens (the GPU hot path does not check them) never make a kernel leave its
    tensors: the kernels clamp rows to [0, T] and lengths to max_seqlen."""
    name, device = engine
    q, k, v, _, _ = make_packed([10], [12], 2, 16, torch.float32, device)
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    for cq, ck, mq, mk in (([0, 7, 3, 99], [-5, 4, 40, 12], 6, 6), ([0, 10], [0, 12], 1, 2), ([3, 1], [2, 1], 64, 64)):
        seqs = SeqLens(torch.tensor(cq, dtype=torch.int32, device=device),
                       torch.tensor(ck, dtype=torch.int32, device=device), mq, mk)
        red = fused_attn.masks.ReducedMask("none", seqs.batch, 2, mq, mk)
        out = ops.fused_attention(q4, k4, v4, red, None, True, 0.25, 0.0, name, None, varlen=seqs)
        assert out.shape == q4.shape


def test_varlen_rows_in_no_sequence_are_zero(engine):
    """C++ engines (design.md): rows of a packed batch that lie in no sequence (only with invalid
    cu_seqlens) come out 0 (lse +inf), gradients 0, even where the results are allocated without
    a fill pass: the memory freed just before is full of NaN."""
    name, device = engine
    if name not in ("cpu", "cuda", "cuda-emu"):
        pytest.skip("rows in no sequence are unspecified on Triton")
    T, H, D = 40, 2, 16
    q, k, v, _, _ = make_packed([T], [T], H, D, torch.float32, device, requires_grad=True)
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    # rows 0-2: before the first sequence; 17-19: past max_seqlen (8) in the last one; 20-39: after it
    cu = torch.tensor([3, 9, 9, 20], dtype=torch.int32, device=device)
    seqs = SeqLens(cu, cu, 8, 8)
    none = torch.tensor([True] * 3 + [False] * 14 + [True] * 23, device=device)
    red = fused_attn.masks.ReducedMask("none", seqs.batch, H, 8, 8)
    for _ in range(3):
        junk = torch.full((4 * T * H * D,), float("nan"), device=device)
        del junk
        out = ops.fused_attention(q4, k4, v4, red, None, False, 0.25, 0.0, name, None, varlen=seqs)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert out[0].transpose(0, 1)[~none].isfinite().all()
        for t, what in ((out[0].transpose(0, 1), "out"), (dq, "dq"), (dk, "dk"), (dv, "dv")):
            bad = t[none]
            assert (bad == 0).all(), f"{what}: rows in no sequence hold {bad[bad != 0][:4].tolist()} (rows " \
                                     f"{none.nonzero().flatten().tolist()})"


# -- validation -------------------------------------------------------------------------------


def _args(T=10, H=2, D=16, dtype=torch.float32):
    q = torch.randn(T, H, D, dtype=dtype)
    cu = torch.tensor([0, 4, T], dtype=torch.int32)
    return [q, q.clone(), q.clone(), cu, cu.clone(), 6, 6]


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.__setitem__(3, a[3].long()), TypeError, "cu_seqlens_q: dtype torch.int64"),
    (lambda a: a.__setitem__(4, a[4][None]), ValueError, "cu_seqlens_k: expected shape"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 7, 4], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "last entry 9"),
    (lambda a: a.__setitem__(4, torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "must start at 0"),
    (lambda a: a.__setitem__(5, 5), ValueError, "max_seqlen_q: 5 is below the longest sequence"),
    (lambda a: a.__setitem__(6, 6.0), TypeError, "max_seqlen_k: expected a Python int"),
    (lambda a: a.__setitem__(0, a[0][None]), ValueError, r"q: expected 3 dims \[T, H, D\]"),
    (lambda a: a.__setitem__(1, a[1].repeat(1, 2, 1)[:, :3]), ValueError, "k: shape"),   # 2 % 3 != 0
    (lambda a: a.__setitem__(4, torch.tensor([0, 10], dtype=torch.int32)), ValueError, "different batch sizes"),
    (lambda a: a.__setitem__(3, a[3].to("meta")), ValueError, "cu_seqlens_q: is on meta"),
], ids=["cu-dtype", "cu-rank", "cu-decreasing", "cu-end", "cu-start", "max-too-small", "max-float", "q-rank",
        "k-heads", "cu-batch", "cu-device"])
def test_varlen_validation(change, error, match):
    args = _args()
    change(args)
    with pytest.raises(error, match=match):
        fused_attn.varlen_attention(*args, backend="reference")
    with pytest.raises(error, match=match):
        fused_attn.varlen_attention(*args)


def test_varlen_size_limits_apply_to_the_padded_shape():
    """The dropout counter limit (ceil(Sq / 4) * Sk <= 2^32) holds for max_seqlen_q x max_seqlen_k."""
    args = _args()
    args[5], args[6] = 2**20, 2**15
    fused_attn.varlen_attention(*args, backend="cpu")                  # no dropout: fine
    with pytest.raises(ValueError, match="dropout RNG counts"):
        fused_attn.varlen_attention(*args, dropout_p=0.1, backend="cpu")
