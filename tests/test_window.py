"""Local attention (window_size) and grouped-query k / v on every engine, against the oracle
(docs/design.md tolerance rule): forward, gradients, dropout, packed batches, and the band's exact
edges.  The checks are test_forward / test_backward / test_varlen's, with a window or fewer k / v heads."""
import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn._rng import philox_rng
from _utils import assert_tolerance, eager_attention
from cases import make_mask, make_qkv
from test_backward import _keep_mask, _rng_state, _set_rng_state, check_backward, grads
from test_forward import check_forward
from test_varlen import check_varlen


@pytest.fixture
def wengine(engine):
    """The engine fixture, skipping engines that do not implement window_size / grouped-query k/v
    (their reasons say so: test_engine_without_the_feature_says_why)."""
    from fused_attn import backends
    missing = backends.get(engine[0]).missing(("window", "gqa"))
    if missing:
        pytest.skip("; ".join(missing))
    return engine


def band_by_loops(Sq, Sk, left, right, causal=False):
    """The window's visibility [Sq, Sk], written as FlashAttention-2 states it, one element at a time
    (independent of fused_attn.reference.window_visible)."""
    vis = torch.zeros(Sq, Sk, dtype=torch.bool)
    for i in range(Sq):
        for j in range(Sk):
            ok = True
            if left != -1 and j < i + Sk - Sq - left:
                ok = False
            if right != -1 and j > i + Sk - Sq + right:
                ok = False
            if causal and j > i + Sk - Sq:
                ok = False
            vis[i, j] = ok
    return vis


# -- the oracle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq,sk", [(9, 9), (5, 12), (12, 5)])
@pytest.mark.parametrize("window,causal", [((0, 0), False), ((2, 3), False), ((-1, 1), False), ((4, -1), False),
                                           ((3, 7), True), ((-1, 2), True)])
def test_reference_window_is_a_dense_band_mask(sq, sk, window, causal):
    """reference(window_size=w) == reference with the band as an explicit [Sq, Sk] bool mask."""
    g = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(2, 3, sq, sk, 8, torch.float64, g=g)
    vis = band_by_loops(sq, sk, *window, causal=causal)
    got = reference.attention(q, k, v, causal=causal, window_size=window)
    want = reference.attention(q, k, v, vis[None].expand(2, sq, sk))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and it differs from the unwindowed call where the band hides something more
    if not torch.equal(vis, band_by_loops(sq, sk, -1, -1, causal=causal)):
        assert not torch.allclose(got, reference.attention(q, k, v, causal=causal))


def test_reference_gqa_is_repeated_kv():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 7, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g) for _ in range(2))
    want = reference.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(reference.attention(q, k, v), want, rtol=0, atol=0)
    # HF's repeat_kv order: query head h reads kv head h // (H // H_kv)
    assert torch.equal(reference.attention(q[:, 3:4], k[:, 1:2], v[:, 1:2]), want[:, 3:4])


# -- kernels: the band's edges, exactly ------------------------------------------------------------


EDGE_WINDOWS = [((0, 0), False), ((1, 2), False), ((33, 0), False), ((5, -1), False), ((-1, 40), False),
                ((64, 64), False), ((7, 3), True), ((70, -1), True)]


@pytest.mark.parametrize("window,causal", EDGE_WINDOWS)
def test_window_edges_are_exact(wengine, window, causal):
    """q = 0 gives uniform weights over the visible keys and v = identity gives them back: the
    output's nonzero pattern is the band, which must equal the independently built one element for
    element (an off-by-one at any tile edge fails).  Sq != Sk, and tiles of 32 / 64 cut the band."""
    name, device = wengine
    sq, sk = 80, 96
    q = torch.zeros(1, 1, sq, 96, device=device)
    k = torch.randn(1, 1, sk, 96, device=device)
    v = torch.eye(sk, 96, device=device)[None, None]
    out = fused_attn.attention(q, k, v, causal=causal, window_size=window, backend=name)[0, 0].cpu()
    vis = band_by_loops(sq, sk, *window, causal=causal)
    assert torch.equal(out > 0, vis), f"band mismatch at {(out > 0).ne(vis).nonzero()[:5].tolist()}"
    counts = vis.sum(-1, keepdim=True).clamp(min=1).float()
    torch.testing.assert_close(out, vis.float() / counts)


# -- kernels against the oracle --------------------------------------------------------------------


FWD_CASES = [
    # (Sq, Sk, window, causal, mask)
    (70, 70, (8, 8), False, "none"),
    (70, 70, (0, 0), False, "pad-right"),
    (45, 100, (20, 5), False, "pad-holes"),
    (100, 45, (3, 30), False, "pair"),
    (70, 90, (16, -1), True, "pad-left"),
    (65, 65, (-1, 10), False, "hf-finfo-additive"),
    (33, 77, (40, 40), True, "4d-heads"),
]


@pytest.mark.parametrize("sq,sk,window,causal,mask", FWD_CASES)
def test_window_forward(wengine, sq, sk, window, causal, mask):
    check_forward(wengine, 2, 2, sq, sk, 32, torch.float16, mask=mask, causal=causal, window_size=window)


def test_window_head_mask_fp32(wengine):
    check_forward(wengine, 2, 3, 50, 50, 32, torch.float32, mask="pad-right", window_size=(6, 2),
                  head_mask=torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("sq,sk,window,causal,mask", [FWD_CASES[i] for i in (0, 2, 3, 4)])
def test_window_backward(wengine, sq, sk, window, causal, mask):
    check_backward(wengine, 2, 2, sq, sk, 32, torch.float16, mask=mask, causal=causal, window_size=window)


def test_window_backward_head_mask(wengine):
    check_backward(wengine, 2, 3, 40, 52, 32, torch.float32, mask="pair", window_size=(5, 9),
                   head_mask=torch.tensor([[0.0, 0.5, 1.0], [1.0, 2.0, 0.25]]))


@pytest.mark.parametrize("causal", [False, True])
def test_window_dropout_matches_reference_exactly(wengine, causal):
    """The keep-mask pinned (drawn by the engine's testing hook for the call's (seed, offset)): the
    windowed kernel and the windowed oracle apply the same dropout."""
    name, device = wengine
    B, H, Sq, Sk, D, p, w = 2, 2, 37, 70, 32, 0.25, (9, 4)
    q, k, v = make_qkv(B, H, Sq, Sk, D, torch.float32, device, requires_grad=True)
    m = make_mask("pad-right", B, H, Sq, Sk, device=device)
    go = torch.randn(B, H, Sq, D, device=device)
    state = _rng_state(device)
    got = grads(lambda a, b, c: fused_attn.attention(a, b, c, m, causal=causal, dropout_p=p, backend=name,
                                                     window_size=w), q, k, v, go)
    _set_rng_state(state, device)
    seed, offset = philox_rng(torch.device(device)).tolist()
    keep = _keep_mask(wengine, B, H, Sq, Sk, p, seed, offset, device)
    oracle = grads(lambda a, b, c: reference.attention(a, b, c, m, causal=causal, dropout_p=p, dropout_mask=keep,
                                                       window_size=w), q, k, v, go)
    eager = grads(lambda a, b, c: eager_attention(a, b, c, m, causal=causal, dropout_mask=keep, dropout_p=p,
                                                  window_size=w), q, k, v, go)
    for label, x, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert_tolerance(f"window dropout {label}", x, o, e)


@pytest.mark.parametrize("window,causal", [((4, 4), False), ((0, 6), False), ((10, -1), True)])
def test_window_varlen(wengine, window, causal):
    """Packed batch: the band is per sequence (Sk_b - Sq_b offsets), empty and cross-length ones too."""
    check_varlen(wengine, [12, 0, 40, 9, 6], [20, 3, 40, 9, 0], 2, 32, torch.float16, causal=causal,
                 window_size=window)


# -- grouped-query k / v ---------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_forward_backward(wengine, kv_heads):
    check_forward(wengine, 2, 4, 37, 50, 32, torch.float16, mask="pad-holes", kv_heads=kv_heads)
    got = check_backward(wengine, 2, 4, 37, 50, 32, torch.float16, mask="pad-right", kv_heads=kv_heads,
                         layout="hf", causal=True)
    assert got[2].shape == (2, kv_heads, 50, 32) and got[3].shape == (2, kv_heads, 50, 32)


def test_gqa_with_window_dropout_head_mask(wengine):
    check_backward(wengine, 2, 4, 40, 40, 32, torch.float32, mask="pair", kv_heads=2, window_size=(7, 7),
                   head_mask=torch.tensor([1.0, 0.5, 0.0, 2.0]))


def test_gqa_varlen(wengine):
    check_varlen(wengine, [12, 30, 3], [20, 7, 3], 4, 32, torch.float16, kv_heads=2, window_size=(5, -1),
                 causal=True)


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [(-2, 3), (3,), 4, (1.0, 2), (True, 1), None, (1, 2, 3), "64"])
def test_bad_window_size_raises(bad):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="window_size"):
        fused_attn.attention(q, q, q, window_size=bad)
    qv = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="window_size"):
        fused_attn.varlen_attention(qv, qv, qv, cu, cu, 8, 8, window_size=bad)


def test_bad_kv_heads_raise():
    q = torch.randn(1, 6, 8, 16)
    for hk in (4, 7, 12):
        k = torch.randn(1, hk, 8, 16)
        with pytest.raises(ValueError, match=r"k: shape \[1, %d, 8, 16\] does not match q \[1, 6, 8, 16\]" % hk):
            fused_attn.attention(q, k, k)
    with pytest.raises(ValueError, match=r"v: shape .* must equal k"):
        fused_attn.attention(q, torch.randn(1, 2, 8, 16), torch.randn(1, 3, 8, 16))
    qv, kv = torch.randn(8, 6, 16), torch.randn(8, 4, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k: shape \[8, 4, 16\] does not match q \[8, 6, 16\]"):
        fused_attn.varlen_attention(qv, kv, kv, cu, cu, 8, 8)


def test_engine_without_the_feature_says_why(monkeypatch):
    """An engine that lacks a feature is refused with the reason (explicit backend), never run."""
    from fused_attn import backends
    eng = backends.get("cpu")
    monkeypatch.setattr(eng, "features", frozenset())
    monkeypatch.setattr(backends, "_CHOICES", {})
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match=r"window_size \(local attention\) is not supported by the cpu backend"):
        fused_attn.attention(q, q, q, window_size=(2, 2), backend="cpu")
    with pytest.raises(RuntimeError, match=r"grouped-query\) is not supported by the cpu backend"):
        fused_attn.attention(q, q[:, :1], q[:, :1], backend="cpu")


def test_window_gqa_custom_op_and_compile():
    """The custom ops carry window_size and grouped-query shapes (opcheck: fake kernels, autograd),
    and torch.compile(fullgraph=True) runs them with the eager results."""
    from fused_attn import backends, ops
    if backends.reasons("cpu", torch.empty(1, 1, 1, 16)):
        pytest.skip("no cpu engine")
    q = torch.randn(2, 4, 20, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 33, 16, requires_grad=True) for _ in range(2))
    args = (q, k, v, None, None, None, None, None, None, "none", False, True, 0.25, 0.0, "cpu", None, None, 0, 0,
            5, 0)
    torch.library.opcheck(ops.attn_forward, args)

    def f(a, b, c):
        return fused_attn.attention(a, b, c, causal=True, window_size=(5, 3), backend="cpu")

    go = torch.randn(2, 4, 20, 16)
    want = grads(f, q, k, v, go)
    got = grads(torch.compile(f, fullgraph=True), q, k, v, go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[2].shape == k.shape
