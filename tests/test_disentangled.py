"""DeBERTa's disentangled score (fused_attn.DisentangledBias, rel_bias=): every engine against the
reference, and the reference against HF's own relative positions and gathers."""
import pytest
import torch

import fused_attn
from fused_attn import DisentangledBias, reference
from fused_attn._rng import philox_rng
from _utils import assert_tolerance, padding_mask
from cases import make_qkv

# -- the reference against HF's math ------------------------------------------------------------


def _hf_index(S, span, buckets, max_pos):
    """Our index for HF DeBERTa-v2/v3 with Sq == Sk == S: clamp(bucket(i - j) + span, 0, 2 span - 1)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    d = torch.arange(-(S - 1), S)                                  # i - j for index position i - j + S - 1
    rel = make_log_bucket_position(d, buckets, max_pos).long() if buckets > 0 else d
    return torch.clamp(rel + span, 0, 2 * span - 1)


def _hf_gathers(c2p, p2c, S, span, buckets, max_pos):
    """HF's DisentangledSelfAttention.disentangled_attention_bias gathers, as it writes them."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    layer = torch.empty(1, S, 1)
    relative_pos = build_relative_position(layer, layer, bucket_size=buckets, max_position=max_pos)  # [1, S, S]
    c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
    p2c_pos = torch.clamp(-relative_pos + span, 0, span * 2 - 1)
    B, H = c2p.shape[:2]
    c2p_att = torch.gather(c2p, -1, c2p_pos[None].expand(B, H, S, S))
    p2c_att = torch.gather(p2c, -1, p2c_pos[None].expand(B, H, S, S)).transpose(-1, -2)
    return c2p_att, p2c_att


@pytest.mark.parametrize("S,span,buckets,max_pos", [(40, 8, 16, 64), (29, 6, -1, 6), (70, 16, 32, 48)])
def test_reference_gather_is_hf_deberta(S, span, buckets, max_pos):
    """The index DisentangledBias documents for HF (one column for c2p row i and p2c row j) gives
    exactly HF's two gathers; P small enough that the clamp and the log buckets matter."""
    pytest.importorskip("transformers")
    from fused_attn.disentangled import relative_scores

    B, H, P = 2, 3, 2 * span
    c2p, p2c = torch.randn(B, H, S, P, dtype=torch.float64), torch.randn(B, H, S, P, dtype=torch.float64)
    index = _hf_index(S, span, buckets, max_pos)
    hf_c2p, hf_p2c = _hf_gathers(c2p, p2c, S, span, buckets, max_pos)
    assert torch.equal(relative_scores(DisentangledBias(c2p, None, index), S, S, torch.float64), hf_c2p)
    assert torch.equal(relative_scores(DisentangledBias(None, p2c, index), S, S, torch.float64), hf_p2c)
    # the same check fails for an index off by one, or for a table read transposed (j - i)
    for bad in (torch.roll(index, 1), index.flip(0)):
        assert not torch.equal(relative_scores(DisentangledBias(c2p, None, bad), S, S, torch.float64), hf_c2p)
        assert not torch.equal(relative_scores(DisentangledBias(None, p2c, bad), S, S, torch.float64), hf_p2c)


def test_reference_is_hf_attention_scores():
    """reference.attention with rel_bias = softmax((q kᵀ + c2p + p2c) / sqrt(D * 3)) v, HF's formula."""
    pytest.importorskip("transformers")
    B, H, S, D, span = 2, 2, 24, 16, 5
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    c2p, p2c = torch.randn(B, H, S, 2 * span, dtype=torch.float64), torch.randn(B, H, S, 2 * span, dtype=torch.float64)
    index = _hf_index(S, span, 8, 32)
    hf_c2p, hf_p2c = _hf_gathers(c2p, p2c, S, span, 8, 32)
    scale = (D * 3) ** -0.5
    want = torch.softmax((q @ k.transpose(-1, -2) + hf_c2p + hf_p2c) * scale, -1) @ v
    got = reference.attention(q, k, v, scale=scale, rel_bias=DisentangledBias(c2p, p2c, index))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -- every engine against the reference ----------------------------------------------------------


@pytest.fixture
def engine(engine):
    """conftest's engine, for engines whose kernels compute the disentangled score."""
    from fused_attn import backends
    if not backends.get(engine[0]).rel_bias:
        pytest.skip(f"{engine[0]}: rel_bias not implemented yet")
    return engine


def _tables(B, H, Sq, Sk, P, dtype, device, which="both", g=None):
    """Random tables (requires_grad) and a random index: every (i - j) gets its own column, so an
    index read off by one or transposed changes the result."""
    mk = lambda rows: (torch.randn(B, H, rows, P, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
    c2p = mk(Sq) if which in ("both", "c2p") else None
    p2c = mk(Sk) if which in ("both", "p2c") else None
    index = torch.randint(0, P, (Sq + Sk - 1,), generator=g).to(device)
    return c2p, p2c, index


def _run(fn, inputs, grad_out):
    out = fn(*inputs)
    live = [t for t in inputs if t is not None]
    return [out, *torch.autograd.grad(out, live, grad_out)]


def check(engine, B, H, Sq, Sk, D, P, dtype, which="both", mask=None, table_dtype=None, dropout_p=0.0,
          seed=0, causal=False):
    name, device = engine
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, Sq, Sk, D, dtype, device, requires_grad=True, g=g)
    c2p, p2c, index = _tables(B, H, Sq, Sk, P, table_dtype or dtype, device, which, g)
    go = torch.randn(B, H, Sq, D, generator=g).to(device=device, dtype=dtype)
    m = None if mask is None else mask.to(device)
    state = torch.get_rng_state()
    got = _run(lambda a, b, c, x, y: fused_attn.attention(a, b, c, m, causal, dropout_p, backend=name,
                                                          rel_bias=DisentangledBias(x, y, index)),
               (q, k, v, c2p, p2c), go)
    keep = None
    if dropout_p > 0:   # the keep-mask the kernels drew (test_backward.py's dropout tests)
        from fused_attn import backends
        torch.set_rng_state(state)
        keep = backends.get(name).keep_mask(B, H, Sq, Sk, dropout_p, philox_rng(torch.device(device)))

    def ref(cdt):
        return lambda a, b, c, x, y: reference.attention(a, b, c, m, causal, dropout_p, dropout_mask=keep,
                                                         compute_dtype=cdt, rel_bias=DisentangledBias(x, y, index))
    f32 = [None if t is None else t.detach().float().requires_grad_() for t in (q, k, v, c2p, p2c)]
    oracle = _run(ref(None), f32, go.float())
    eager = _run(ref(dtype), (q, k, v, c2p, p2c), go)
    labels = ["out", "dq", "dk", "dv"] + [n for n, t in (("dc2p", c2p), ("dp2c", p2c)) if t is not None]
    assert len(got) == len(labels)
    for label, x, o, e in zip(labels, got, oracle, eager):
        assert_tolerance(f"{label}[{name}, {which}, {dtype}, Sq={Sq}, Sk={Sk}]", x, o, e, dtype=dtype)
    return got


@pytest.mark.parametrize("which", ["both", "c2p", "p2c"])
@pytest.mark.parametrize("Sq,Sk", [(37, 45), (45, 30)])
def test_rel_bias_forward_backward(engine, which, Sq, Sk):
    check(engine, 2, 2, Sq, Sk, 32, 12, torch.float32, which)


@pytest.mark.parametrize("dtype,table_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_rel_bias_half(engine, dtype, table_dtype):
    check(engine, 1, 2, 70, 70, 64, 24, dtype, table_dtype=table_dtype)


@pytest.mark.parametrize("left", [False, True])
def test_rel_bias_key_padding(engine, left):
    mask = padding_mask([40, 23], 40, left=left)
    check(engine, 2, 2, 40, 40, 32, 16, torch.float32, mask=mask)


@pytest.mark.parametrize("mask_kind,causal", [("pair", False), ("pad-right", True)])
def test_rel_bias_masks(engine, mask_kind, causal):
    """Per-pair masks (the block-map loops) and causal (diagonal tiles)."""
    from cases import make_mask
    check(engine, 2, 2, 37, 45, 32, 10, torch.float32, mask=make_mask(mask_kind, 2, 2, 37, 45), causal=causal)


def test_rel_bias_single_pass_backward(engine, monkeypatch):
    """Triton's single-pass backward adds dc2p in the dK/dV kernel (atomics across key blocks)."""
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "0")
    check(engine, 2, 2, 37, 45, 32, 10, torch.float32)


def test_rel_bias_dropout(engine):
    check(engine, 2, 2, 37, 45, 32, 10, torch.float32, dropout_p=0.25)


def test_rel_bias_long_rows(engine):
    """More than one key / query tile per row (the CPU kernel's 64, Triton's tiles)."""
    from conftest import is_interpreted
    S = 80 if is_interpreted(*engine) else 200
    check(engine, 1, 1, S, S + 3, 16, 40, torch.float32)


@pytest.mark.parametrize("which", ["both", "c2p"])
def test_rel_bias_varlen(engine, which):
    name, device = engine
    lens_q, lens_k = [5, 0, 33, 17], [9, 4, 33, 20]
    H, D, P = 2, 32, 14
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    mq, mk = max(lens_q) + 2, max(lens_k) + 1          # bounds above the longest: the index follows them
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, H, D, device=device, requires_grad=True)
    k, v = (torch.randn(tk, H, D, device=device, requires_grad=True) for _ in range(2))
    c2p = torch.randn(tq, H, P, device=device, requires_grad=True)
    p2c = torch.randn(tk, H, P, device=device, requires_grad=True) if which == "both" else None
    index = torch.randint(0, P, (mq + mk - 1,), device=device)
    go = torch.randn(tq, H, D, device=device)

    def call(fn, backend):
        return lambda a, b, c, x, y: fn(a, b, c, cu_q, cu_k, mq, mk, backend=backend,
                                        rel_bias=DisentangledBias(x, y, index))
    got = _run(call(fused_attn.varlen_attention, name), (q, k, v, c2p, p2c), go)
    oracle = _run(call(reference.varlen_attention, "reference"), (q, k, v, c2p, p2c), go)
    for label, x, o in zip(["out", "dq", "dk", "dv", "dc2p", "dp2c"], got, oracle):
        assert_tolerance(f"varlen {label}[{name}]", x, o, o)
    # the packed call is the padded one, sequence by sequence (positions inside each sequence)
    b = 2
    sl = lambda t, cu: t[cu[b]:cu[b + 1]].transpose(0, 1)[None]
    off = mk - lens_k[b]
    sub = reference.attention(sl(q, cu_q), sl(k, cu_k), sl(v, cu_k), rel_bias=DisentangledBias(
        sl(c2p, cu_q), None if p2c is None else sl(p2c, cu_k), index[off:off + lens_q[b] + lens_k[b] - 1]))
    assert_tolerance("varlen vs padded", got[0][cu_q[b]:cu_q[b + 1]], sub[0].transpose(0, 1),
                     sub[0].transpose(0, 1))


def test_rel_bias_without_tables_is_plain_attention(engine):
    name, device = engine
    q, k, v = make_qkv(1, 2, 20, 20, 16, torch.float32, device)
    plain = fused_attn.attention(q, k, v, backend=name)
    same = fused_attn.attention(q, k, v, backend=name, rel_bias=DisentangledBias(None, None, torch.zeros(39)))
    assert torch.equal(plain, same)


# -- errors ----------------------------------------------------------------------------------------


def _bad(**kw):
    B, H, Sq, Sk, D, P = 2, 2, 7, 9, 16, 6
    q, k, v = torch.randn(B, H, Sq, D), torch.randn(B, H, Sk, D), torch.randn(B, H, Sk, D)
    args = dict(c2p=torch.randn(B, H, Sq, P), p2c=torch.randn(B, H, Sk, P), index=torch.zeros(Sq + Sk - 1,
                                                                                              dtype=torch.long))
    args.update(kw)
    return lambda: fused_attn.attention(q, k, v, backend="reference", rel_bias=DisentangledBias(**args))


@pytest.mark.parametrize("kw,err,words", [
    (dict(c2p=torch.randn(2, 2, 9, 6)), ValueError, ["rel_bias.c2p", "[B, H, Sq, P]", "[2, 2, 9, 6]"]),
    (dict(p2c=torch.randn(2, 2, 7, 6)), ValueError, ["rel_bias.p2c", "[B, H, Sk, P]", "[2, 2, 7, 6]"]),
    (dict(p2c=torch.randn(2, 2, 9, 5)), ValueError, ["widths P", "[2, 2, 9, 5]"]),
    (dict(index=torch.zeros(16, dtype=torch.long)), ValueError, ["rel_bias.index", "[15]", "[16]"]),
    (dict(index=torch.zeros(15)), TypeError, ["rel_bias.index", "integer"]),
    (dict(index=torch.full((15,), 6)), ValueError, ["rel_bias.index", "[0, 6)"]),
    (dict(c2p=torch.randn(2, 2, 7, 6, dtype=torch.float64)), TypeError, ["rel_bias.c2p", "float64"]),
])
def test_bad_rel_bias(kw, err, words):
    with pytest.raises(err) as e:
        _bad(**kw)()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_rel_bias_type():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="DisentangledBias"):
        fused_attn.attention(q, q, q, rel_bias=(None, None, torch.zeros(7)))


# -- torch.compile -------------------------------------------------------------------------------


def test_rel_bias_compile_fullgraph(engine):
    """The tables travel through the custom ops (fake kernels included) and get their gradients."""
    name, device = engine
    q, k, v = make_qkv(2, 2, 24, 40, 16, torch.float32, device, requires_grad=True)
    c2p, p2c, index = _tables(2, 2, 24, 40, 10, torch.float32, device)
    m = padding_mask([24, 31], 40, device=device)

    def f(q, k, v, c2p, p2c):
        return fused_attn.attention(q, k, v, m, backend=name, rel_bias=DisentangledBias(c2p, p2c, index))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, c2p, p2c)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, c2p, p2c))
    out_ref = f(q, k, v, c2p, p2c)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (q, k, v, c2p, p2c))
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_rel_bias_opcheck(engine):
    from fused_attn import ops
    name, device = engine
    q, k, v = make_qkv(1, 2, 20, 33, 16, torch.float32, device, requires_grad=True)
    c2p, p2c, index = _tables(1, 2, 20, 33, 8, torch.float32, device)
    for tables in ((c2p, p2c), (c2p, None), (None, p2c)):
        args = (q, k, v, None, None, None, None, None, None, "none", False, False, 0.25, 0.0, name, None, None, 0, 0,
                *tables, index)
        torch.library.opcheck(ops.attn_forward, args)


def test_engine_without_rel_bias_says_so():
    """An engine whose kernels lack the disentangled score raises naming it, never ignores the tables."""
    from fused_attn import backends

    class Plain(backends.Engine):
        name, device_type = "plain-test", "cpu"

    backends.register(Plain())
    try:
        q = torch.randn(1, 1, 4, 8)
        with pytest.raises(RuntimeError, match="plain-test.*rel_bias"):
            fused_attn.attention(q, q, q, backend="plain-test",
                                 rel_bias=DisentangledBias(torch.randn(1, 1, 4, 3), None, torch.zeros(7, dtype=torch.long)))
    finally:
        backends._ENGINES.pop("plain-test")
        backends._CHOICES.clear()
