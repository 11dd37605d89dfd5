"""Mask reduction (pure torch), skipping, caching and argument errors."""
import itertools

import pytest
import torch

import fused_attn
from fused_attn import masks
from fused_attn.masks import EMPTY, FULL, PARTIAL, reduce_mask
from _utils import padding_mask
from cases import MASK_KINDS, make_mask, make_qkv


# -- reduction ------------------------------------------------------------------------------


def test_contiguous_padding_becomes_key_ranges():
    right = padding_mask([5, 9, 1], 9)
    left = padding_mask([5, 9, 1], 9, left=True)
    r = reduce_mask(right, 3, 2, 4, 9)
    assert r.kind == "keys"
    assert r.key_start.tolist() == [0, 0, 0] and r.key_end.tolist() == [5, 9, 1]
    assert r.key_needs_mask.tolist() == [0, 0, 0]          # no mask load at all
    l_ = reduce_mask(left, 3, 2, 4, 9)
    assert l_.key_start.tolist() == [4, 0, 8] and l_.key_end.tolist() == [9, 9, 9]
    assert l_.key_needs_mask.tolist() == [0, 0, 0]
    # HF's extended additive masks reduce the same way, old (-10000) and new (finfo.min)
    for fill in (-10000.0, torch.finfo(torch.float16).min, float("-inf")):
        ext = torch.zeros(3, 1, 1, 9, dtype=torch.float16).masked_fill(~right[:, None, None, :], fill)
        e = reduce_mask(ext, 3, 2, 4, 9)
        assert e.kind == "keys" and e.key_end.tolist() == [5, 9, 1] and e.key_needs_mask.tolist() == [0, 0, 0]


def test_holes_and_values_force_a_dense_row():
    m = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    r = reduce_mask(m, 3, 1, 2, 5)
    assert r.key_start.tolist() == [0, 1, 0] and r.key_end.tolist() == [4, 3, 0]
    assert r.key_needs_mask.tolist() == [1, 0, 0]
    bias = torch.tensor([[0.0, 0.5, -1e4, -1e4, -1e4]])           # a visible non-zero value
    b = reduce_mask(bias[:, None, None, :], 1, 1, 2, 5)
    assert b.key_end.tolist() == [2] and b.key_needs_mask.tolist() == [1]


@pytest.mark.parametrize("kind", [k for k in MASK_KINDS if k != "none"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (64, 128)])
def test_block_map_matches_brute_force(kind, causal, bm, bn):
    B, H, Sq, Sk = 2, 3, 45, 70
    m = make_mask(kind, B, H, Sq, Sk, g=torch.Generator().manual_seed(1))
    red = reduce_mask(m, B, H, Sq, Sk)
    red = masks.ReducedMask("blocks", B, H, Sq, Sk, values=red.values, additive=red.additive)
    st = red.block_map(bm, bn, causal).state
    vis = red.visible().expand(B, H, Sq, Sk)
    nonzero = (red.values != 0).expand(B, H, Sq, Sk) & vis if red.additive else torch.zeros_like(vis)
    if causal:
        i = torch.arange(Sq)[:, None]
        j = torch.arange(Sk)[None, :]
        vis = vis & (j <= i + Sk - Sq)
    for b in range(B):
        for h in range(H):
            for qb in range(-(-Sq // bm)):
                for kb in range(-(-Sk // bn)):
                    tile = vis[b, h, qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
                    got = int(st[min(b, st.shape[0] - 1), min(h, st.shape[1] - 1), min(qb, st.shape[2] - 1), kb])
                    if not tile.any():
                        # exact for masks alone; with causal, min(states) may keep a PARTIAL
                        # tile whose visible part lies right of the diagonal (visited, not wrong)
                        assert got == EMPTY or (causal and got == PARTIAL), (b, h, qb, kb)
                    elif got == FULL:
                        assert tile.all() and (kb + 1) * bn <= Sk
                        assert not nonzero[b, h, qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn].any()
                    else:
                        assert got == PARTIAL
    # the lists hold exactly the PARTIAL / FULL blocks, ascending
    bmap = red.block_map(bm, bn, causal)
    for lists, states in ((bmap.kv, st), (bmap.transposed_lists(), st.expand(-1, -1, -(-Sq // bm), -1).transpose(-1, -2))):
        for count, index, kind in ((lists.part_count, lists.part_index, PARTIAL),
                                   (lists.full_count, lists.full_index, FULL)):
            for idx in itertools.product(*(range(n) for n in count.shape)):
                listed = index[idx][:int(count[idx])].tolist()
                assert listed == [j for j in range(states.shape[-1]) if states[idx][j] == kind]


def test_reduction_is_cached_per_mask_tensor():
    m = padding_mask([3, 7], 8)
    r1 = reduce_mask(m, 2, 4, 8, 8)
    assert reduce_mask(m, 2, 4, 8, 8) is r1                 # 12 layers, one reduction
    assert r1.block_map(16, 16, False) is r1.block_map(16, 16, False)
    m[0, 5] = True                                          # in-place change -> new reduction
    r2 = reduce_mask(m, 2, 4, 8, 8)
    assert r2 is not r1 and r2.key_needs_mask.tolist() == [1, 0]
    assert reduce_mask(r2, 2, 4, 8, 8) is r2                # a ReducedMask passes through


def test_inference_mode_masks_are_reduced_fresh(engine):
    """Inference tensors have no version counter: they work, and an in-place change between
    calls is seen (never a stale cached reduction)."""
    name, device = engine
    q, k, v = make_qkv(2, 2, 8, 8, 16, torch.float32, device)
    with torch.inference_mode():
        m = padding_mask([3, 8], 8, device=device)
        first = fused_attn.attention(q, k, v, m, backend=name)
        torch.testing.assert_close(first, fused_attn.reference.attention(q, k, v, m), atol=1e-5, rtol=1e-5)
        m[0, 5] = True
        second = fused_attn.attention(q, k, v, m, backend=name)
        torch.testing.assert_close(second, fused_attn.reference.attention(q, k, v, m), atol=1e-5, rtol=1e-5)
    assert not torch.equal(first[0], second[0])


def test_layers_share_one_reduction(monkeypatch):
    calls = []
    real = masks._reduce
    monkeypatch.setattr(masks, "_reduce", lambda *a: calls.append(1) or real(*a))
    masks._CACHE.clear()
    q, k, v = make_qkv(2, 2, 16, 16, 16, torch.float32)
    m = padding_mask([10, 16], 16)
    for _ in range(12):
        fused_attn.attention(q, k, v, m, backend="reference")
    assert len(calls) == 1


# -- skipping: the kernel reports how many key blocks each program visited -------------------


def _visited(q, k, v, mask, causal=False, block=(32, 16)):
    from fused_attn.backends import triton_backend as tb
    red = reduce_mask(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    cfg = tb.TileConfig(block[0], block[1], 4, 1)
    out, _, visited = tb.forward(q, k, v, red, causal, q.shape[-1] ** -0.5, 0.0, None, config=cfg, stats=True)
    ref = fused_attn.reference.attention(q, k, v, mask, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return visited


def test_kernel_skips_padded_key_blocks():
    q, k, v = make_qkv(3, 2, 64, 160, 16, torch.float32)
    m = padding_mask([1, 40, 160], 160)
    visited = _visited(q, k, v, m)
    assert visited[0].unique().tolist() == [1]              # ceil(1 / 16)
    assert visited[1].unique().tolist() == [3]              # ceil(40 / 16)
    assert visited[2].unique().tolist() == [10]
    # left padding: the loop starts at the first real key
    visited = _visited(q, k, v, padding_mask([1, 40, 160], 160, left=True))
    assert visited[:, 0].flatten().tolist() == [1, 1, 3, 3, 10, 10]
    # a batch row with no real key visits nothing
    assert _visited(q, k, v, torch.zeros(3, 160, dtype=torch.bool)).sum() == 0


def test_kernel_skips_causal_and_empty_blocks():
    q, k, v = make_qkv(1, 1, 64, 64, 16, torch.float32)
    visited = _visited(q, k, v, None, causal=True)           # 32-row blocks, 16-key blocks
    assert visited.flatten().tolist() == [2, 4]
    # block-diagonal (packed sentences [0, 32) and [32, 64)): each query block sees its own two
    seg = torch.arange(64) // 32
    bd = (seg[:, None] == seg[None, :])[None]
    assert _visited(q, k, v, bd).flatten().tolist() == [2, 2]
    # causal + Sk > Sq (past keys): the diagonal shifts right by Sk - Sq
    q2 = q[:, :, :32]
    assert _visited(q2, k, v, None, causal=True).flatten().tolist() == [4]


# -- errors ---------------------------------------------------------------------------------


def _qkv():
    return make_qkv(2, 3, 5, 7, 16, torch.float32)


@pytest.mark.parametrize("bad,match", [
    (torch.ones(2, 6, dtype=torch.bool), r"attention_mask: key-padding mask has shape 2x6"),
    (torch.ones(3, 7, dtype=torch.bool), r"attention_mask: key-padding mask has shape 3x7"),
    (torch.ones(2, 7, 5, dtype=torch.bool), r"attention_mask: per-pair mask has shape 2x7x5"),
    (torch.ones(2, 2, 5, 7, dtype=torch.bool), r"attention_mask: 4D mask has shape 2x2x5x7"),
    (torch.ones(7, dtype=torch.bool), r"attention_mask: rank 1"),
    (torch.ones(1, 1, 1, 2, 7, dtype=torch.bool), r"attention_mask: rank 5"),
])
def test_bad_mask_shapes(bad, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        fused_attn.attention(q, k, v, bad)


def test_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="attention_mask: dtype torch.complex64"):
        fused_attn.attention(q, k, v, torch.ones(2, 7, dtype=torch.complex64))
    with pytest.raises(TypeError, match="attention_mask: expected a torch.Tensor"):
        fused_attn.attention(q, k, v, [[1] * 7] * 2)
    with pytest.raises(ValueError, match=r"k: shape \[2, 3, 7, 8\] does not match q \[2, 3, 5, 16\]"):
        fused_attn.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"v: shape \[2, 3, 6, 16\] must equal k's shape \[2, 3, 7, 16\]"):
        fused_attn.attention(q, k, v[:, :, :6])
    with pytest.raises(ValueError, match=r"q: expected 4 dims \[B, H, S, D\], got shape \[3, 5, 16\]"):
        fused_attn.attention(q[0], k, v)
    with pytest.raises(TypeError, match="q, k, v: dtypes differ"):
        fused_attn.attention(q.half(), k, v)
    with pytest.raises(TypeError, match="q: dtype torch.int32 is not supported"):
        fused_attn.attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="dropout_p: must be a float in \\[0, 1\\)"):
        fused_attn.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"head_mask: shape \[2\] is not \[H\] = \[3\]"):
        fused_attn.attention(q, k, v, head_mask=torch.ones(2))
    with pytest.raises(ValueError, match="backend: 'tpu' is not one of"):
        fused_attn.attention(q, k, v, backend="tpu")
    with pytest.raises(ValueError, match=r"heads and head dim must be >= 1"):
        fused_attn.attention(q[:, :, :, :0], k[..., :0], v[..., :0])
    with pytest.raises(ValueError, match="this ReducedMask was built for"):
        fused_attn.attention(q, k, v, reduce_mask(torch.ones(2, 7, dtype=torch.bool), 2, 3, 6, 7))


def test_mask_on_wrong_device_names_it():
    q, k, v = _qkv()
    fake = torch.ones(2, 7, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="attention_mask: mask is on meta but q is on cpu"):
        fused_attn.attention(q, k, v, fake)


def _triton_decorated_first():
    """Import the Triton engine while TRITON_INTERPRET is still set: Triton decides at decoration
    whether it interprets the kernels, and a test that unsets the variable before the engine's
    first import would leave compiled kernels to the triton-interp tests after it (xdist)."""
    from fused_attn import backends
    backends.reasons("triton", torch.empty(1, 1, 1, 16))


def test_explicit_backend_that_cannot_serve_says_why(monkeypatch):
    q, k, v = _qkv()
    _triton_decorated_first()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve this call: tensors are on cpu"):
        fused_attn.attention(q, k, v, backend="triton")
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    torch.testing.assert_close(fused_attn.attention(q, k, v), fused_attn.reference.attention(q, k, v))


def test_auto_fallback_warns_once_with_the_reason(monkeypatch):
    from fused_attn import backends
    q, k, v = _qkv()
    real = backends.reasons
    monkeypatch.setattr(backends, "reasons",
                        lambda name, t: ["no C++ compiler (test)"] if name == "cpu" else real(name, t))
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_CHOICES", {})
    _triton_decorated_first()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSED_ATTN_BACKEND", raising=False)
    with pytest.warns(UserWarning, match=r"backend 'auto' uses 'reference' because cpu: no C\+\+ compiler \(test\)"):
        out = fused_attn.attention(q, k, v)
    torch.testing.assert_close(out, fused_attn.reference.attention(q, k, v))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_attn.attention(q, k, v)          # once: the second call is silent


# -- a float mask of 0s and 1s: refused every time (tests/test_edges.py) -------------------------


# -- small usability checks ---------------------------------------------------------------------


def test_reduced_mask_repr_is_short():
    B, S = 4, 300
    pad = padding_mask([300, 120, 7, 1], S)
    red = reduce_mask(pad, B, 12, S, S)
    assert repr(red) == ("ReducedMask(kind='keys', B=4, H=12, Sq=300, Sk=300, values=uint8[4, 1, 1, 300] "
                         "on cpu, block_maps=0)")
    pair = reduce_mask(torch.where(pad[:, None, :] & pad[:, :, None], 0.0, float("-inf")), B, 12, S, S)
    pair.block_map(64, 64, False)
    assert repr(pair) == ("ReducedMask(kind='blocks', B=4, H=12, Sq=300, Sk=300, values=additive "
                          "float32[4, 1, 300, 300] on cpu, block_maps=1)")
    assert repr(reduce_mask(None, 1, 2, 3, 4)) == "ReducedMask(kind='none', B=1, H=2, Sq=3, Sk=4, block_maps=0)"


@pytest.mark.parametrize("mask_kind", ["keys", "pair", "4d"])
def test_hf_layout_mask_error_has_a_hint(mask_kind):
    """q, k, v in HF's [B, S, H, D] (not transposed): the mask error says what to do."""
    B, S, H, D = 2, 10, 4, 16
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    pad = padding_mask([10, 6], S)
    mask = {"keys": pad, "pair": pad[:, None, :] & pad[:, :, None], "4d": pad[:, None, None, :]}[mask_kind]
    with pytest.raises(ValueError, match=r"would fit q, k, v of shape \[B, S, H, D\] = \[2, 10, 4, D\].*"
                                         r"q\.transpose\(1, 2\)"):
        fused_attn.attention(q, k, v, mask)
    out = fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # the fix works
    torch.testing.assert_close(out, fused_attn.reference.attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2), mask))
    q, k, v = _qkv()                       # a plain wrong shape gets no layout hint
    with pytest.raises(ValueError) as err:
        fused_attn.attention(q, k, v, torch.ones(2, 6, dtype=torch.bool))
    assert "transpose" not in str(err.value)


def test_causal_accepts_ints_zero_one_and_numpy_bools():
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    for fn in (fused_attn.attention, fused_attn.reference.attention):
        causal = fn(q, k, v, causal=True)
        plain = fn(q, k, v, causal=False)
        for value, want in ((1, causal), (0, plain), (np.True_, causal), (np.False_, plain), (np.int64(1), causal)):
            torch.testing.assert_close(fn(q, k, v, causal=value), want, rtol=0, atol=0)
        for bad in (2, -1, 1.0, "yes", None, torch.tensor(True)):
            with pytest.raises(TypeError, match=r"causal: expected a bool \(or 0 / 1\)"):
                fn(q, k, v, causal=bad)


def test_auto_choice_is_cached_per_device_dtype_and_head_dim(monkeypatch):
    """select() asks the engines once per (request, environment, device, dtype, head dim); a newly
    registered engine clears the cache."""
    from fused_attn import backends
    q, k, v = _qkv()
    asked = []
    real = backends.reasons
    monkeypatch.setattr(backends, "reasons", lambda name, t: asked.append(name) or real(name, t))
    monkeypatch.setattr(backends, "_CHOICES", {})
    first = backends.select("auto", q)
    n = len(asked)
    assert n >= 1
    for _ in range(3):
        assert backends.select("auto", q) == first
    assert len(asked) == n
    backends.select("auto", q.half())            # another dtype: asked again
    assert len(asked) > n
    monkeypatch.setattr(backends, "_ENGINES", dict(backends._ENGINES))
    extra = backends.Engine()
    extra.name = "test-extra"
    backends.register(extra)                     # registering clears the cache
    assert backends._CHOICES == {} and "test-extra" in backends.names()
