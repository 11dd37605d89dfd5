"""The dropout keep-mask stored by the forward (bit-packed words, read by the backward instead of
regenerating it) and the single-pass backward (dQ by atomics, FUSED_ATTN_DETERMINISTIC=0).

Engines that store (Engine.keep_bits_shape is not None under FUSED_ATTN_DROPOUT_MASK=store) must
give bitwise the gradients of the regenerated mask; the others skip."""
import pytest
import torch

import fused_attn
from fused_attn import backends, reduce_mask
from fused_attn._rng import rng_tensor
from cases import make_mask, make_packed, make_qkv
from test_backward import check_backward, test_dropout_matches_reference_exactly

P = 0.3
SEED, OFFSET = 2**40 + 977, 2**33 + 12


def _storing(engine, monkeypatch, q, k, varlen=None):
    """The engine object and the shape of its keep-mask words (skips engines that never store)."""
    eng = backends.get(engine[0])
    monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", "store")
    shape = eng.keep_bits_shape(q, k, P, varlen)
    if shape is None:
        pytest.skip(f"engine {engine[0]!r} regenerates the keep-mask")
    return eng, shape


def _unpack(words):
    """[B, H, R, C] int32 words -> [B, H, 32 R, C] bool (bit i % 32 of word [i // 32, j])."""
    bits = (words[:, :, :, None, :] >> torch.arange(32, device=words.device)[:, None]) & 1
    return bits.reshape(words.shape[0], words.shape[1], -1, words.shape[3]).bool()


def test_stored_words_are_the_keep_mask(engine, monkeypatch):
    """No mask: the forward visits every tile, so every element's bit is written, and equals the
    engine's documented keep-mask (test_backward pins that one to a NumPy Philox)."""
    name, device = engine
    B, H, Sq, Sk, D = 2, 3, 45, 70, 16
    q, k, v = make_qkv(B, H, Sq, Sk, D, torch.float16, device)
    eng, shape = _storing(engine, monkeypatch, q, k)
    words = torch.zeros(shape, dtype=torch.int32, device=device)
    red = reduce_mask(None, B, H, Sq, Sk)
    rng = rng_tensor(SEED, OFFSET, device)
    eng.forward(q, k, v, red, causal=False, dropout_p=P, scale=D ** -0.5, rng=rng, keep_bits=words)
    keep = eng.keep_mask(B, H, Sq, Sk, P, rng)
    got = _unpack(words)[:, :, :Sq, :Sk]
    assert torch.equal(got.cpu(), keep.cpu()), f"{(got != keep).sum().item()} of {keep.numel()} bits differ"


# (mask kind, causal, B, H, Sq, Sk, D): key padding (range and holes), causal, 3D / 4D masks
# with empty blocks, Sq != Sk, odd head dims
CASES = [
    ("pad-right", False, 2, 2, 45, 70, 32),
    ("pad-holes", True, 2, 2, 70, 45, 48),
    ("pair-blockdiag", False, 2, 2, 64, 64, 24),
    ("4d-heads", True, 2, 2, 37, 80, 80),
    ("additive-4d-q-inf", False, 2, 2, 50, 33, 40),
    ("none", True, 1, 2, 97, 33, 32),
]


@pytest.mark.parametrize("mask,causal,B,H,Sq,Sk,D", CASES)
def test_stored_and_regenerated_give_identical_gradients(engine, monkeypatch, mask, causal, B, H, Sq, Sk, D):
    name, device = engine
    q, k, v = make_qkv(B, H, Sq, Sk, D, torch.float16, device, requires_grad=True)
    _storing(engine, monkeypatch, q, k)
    m = make_mask(mask, B, H, Sq, Sk, torch.float16, device)
    go = torch.randn(B, H, Sq, D).to(device=device, dtype=torch.float16)
    got = {}
    for mode in ("store", "regenerate"):
        monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", mode)
        torch.manual_seed(5)
        out = fused_attn.attention(q, k, v, m, causal=causal, dropout_p=P, backend=name)
        got[mode] = (out, *torch.autograd.grad(out, (q, k, v), go))
    for label, a, b in zip(("out", "dq", "dk", "dv"), got["store"], got["regenerate"]):
        assert torch.equal(a, b), f"{label}: stored and regenerated keep-masks differ by {(a - b).abs().max()}"


@pytest.mark.parametrize("mask,causal", [("pair-blockdiag", False), ("4d-heads", True), ("pad-holes", True)])
def test_backward_reads_only_the_words_it_needs(engine, monkeypatch, mask, causal):
    """Masks whose block maps skip tiles: the forward writes only the tiles it visits (forward tiles
    differ from the backward's), so the words start as all-zero or all-one garbage; the
    gradients must not depend on it and equal those of the regenerated mask.  Flipping every
    written bit must change them (the backward does read the words)."""
    name, device = engine
    B, H, Sq, Sk, D = 2, 2, 70, 45, 32
    q, k, v = make_qkv(B, H, Sq, Sk, D, torch.float32, device)
    eng, shape = _storing(engine, monkeypatch, q, k)
    red = reduce_mask(make_mask(mask, B, H, Sq, Sk, device=device), B, H, Sq, Sk)
    go = torch.randn(B, H, Sq, D, device=device)
    kw = dict(causal=causal, dropout_p=P, scale=D ** -0.5, rng=rng_tensor(SEED, OFFSET, device))
    out, lse = eng.forward(q, k, v, red, **kw)
    want = eng.backward(go, q, k, v, out, lse, red, **kw)
    words = {}
    for fill in (0, -1):
        words[fill] = torch.full(shape, fill, dtype=torch.int32, device=device)
        out2, lse2 = eng.forward(q, k, v, red, keep_bits=words[fill], **kw)
        assert torch.equal(out2, out) and torch.equal(lse2, lse)
        got = eng.backward(go, q, k, v, out, lse, red, keep_bits=words[fill], **kw)
        for label, a, b in zip(("dq", "dk", "dv"), got, want):
            assert torch.equal(a, b), f"{label} with words filled with {fill}: max diff {(a - b).abs().max()}"
    assert not torch.equal(words[0], words[-1])           # some tiles were skipped
    flipped = eng.backward(go, q, k, v, out, lse, red, keep_bits=~words[0], **kw)
    assert not torch.equal(flipped[2], want[2])


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_stored_and_regenerated_give_identical_gradients(engine, monkeypatch, causal):
    """Packed batches store with the padded [B, H, max_q, max_k] geometry; empty sequences too."""
    name, device = engine
    lens_q, lens_k, H, D = [9, 0, 40, 3], [14, 5, 0, 22], 2, 24
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, D, torch.float16, device, requires_grad=True)
    mq, mk = max(lens_q), max(lens_k)
    from fused_attn.packing import SeqLens
    _storing(engine, monkeypatch, q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
             SeqLens(cu_q, cu_k, mq, mk))
    go = torch.randn_like(q)
    got = {}
    for mode in ("store", "regenerate"):
        monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", mode)
        torch.manual_seed(5)
        out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=P, causal=causal, backend=name)
        got[mode] = (out, *torch.autograd.grad(out, (q, k, v), go))
    for label, a, b in zip(("out", "dq", "dk", "dv"), got["store"], got["regenerate"]):
        assert torch.equal(a, b), f"varlen {label}: max diff {(a - b).abs().max()}"


def test_keep_mask_size_policy(monkeypatch):
    """Stored while the words take at most the memory of q, k and v (BERT lengths), regenerated
    beyond; the environment variable overrides."""
    from fused_attn.backends import triton_backend as tb

    def shape(S, D=64, p=0.1):
        q = torch.empty(4, 12, S, D, dtype=torch.float16, device="meta")
        return tb.keep_bits_shape(q, q, p)

    monkeypatch.delenv("FUSED_ATTN_DROPOUT_MASK", raising=False)
    assert shape(512) == (4, 12, 512 // 32, 512)
    assert shape(100) == (4, 12, 4, 128)              # padded to whole 128 x 128 tiles
    assert shape(4096) is None                         # 4096 / (48 * 64) > 1: regenerate
    assert shape(512, p=0.0) is None
    monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", "store")
    assert shape(4096) == (4, 12, 4096 // 32, 4096)
    monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", "regenerate")
    assert shape(512) is None
    monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", "sometimes")
    with pytest.raises(ValueError, match="FUSED_ATTN_DROPOUT_MASK"):
        shape(512)


# -- single-pass backward -----------------------------------------------------------------------


@pytest.fixture
def single_pass(engine, monkeypatch):
    """FUSED_ATTN_DETERMINISTIC=0 on the Triton engine, with the dQ kernel made unlaunchable: a
    test that passes really took the single pass."""
    if engine[0] != "triton":
        pytest.skip("the single-pass backward is a Triton option")
    from fused_attn.backends import triton_bwd_dq

    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "0")
    monkeypatch.setattr(triton_bwd_dq, "attn_bwd_dq_kernel", None)
    return engine


@pytest.mark.parametrize("mask,causal", [("pad-holes", True), ("pair-blockdiag", False), ("4d-heads", True)])
def test_single_pass_backward_matches_the_oracle(single_pass, mask, causal):
    check_backward(single_pass, 2, 2, 45, 70, 48, torch.float16, mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_pass_backward_varlen_layouts(single_pass, dtype):
    check_backward(single_pass, 2, 1, 63, 65, 80, dtype, mask="pad-left", layout="hf")


@pytest.mark.parametrize("mode", ["store", "regenerate"])
def test_single_pass_backward_with_dropout(single_pass, monkeypatch, mode):
    monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", mode)
    test_dropout_matches_reference_exactly(single_pass, "pad-right", True)


def test_single_pass_respects_torch_determinism(monkeypatch):
    from fused_attn.backends import triton_backend as tb

    monkeypatch.delenv("FUSED_ATTN_DETERMINISTIC", raising=False)
    assert not tb.single_pass_backward()
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "0")
    assert tb.single_pass_backward()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not tb.single_pass_backward()
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("mode", ["store", "regenerate"])
def test_opcheck_forward_op_with_dropout(engine, monkeypatch, mode):
    """The custom op returns the keep-mask words (fake shape = real shape) and its autograd
    formula hands them to the backward op."""
    from fused_attn import ops
    from _utils import padding_mask

    name, device = engine
    monkeypatch.setenv("FUSED_ATTN_DROPOUT_MASK", mode)
    q, k, v = make_qkv(2, 2, 20, 33, 16, torch.float32, device, requires_grad=True)
    red = reduce_mask(padding_mask([5, 33], 33, device=device), 2, 2, 20, 33)
    rng = rng_tensor(SEED, OFFSET, device)
    args = (q, k, v, red.values, red.key_start, red.key_end, red.key_needs_mask, None, rng,
            red.kind, red.additive, False, 0.25, P, name, None, None, 0, 0)
    torch.library.opcheck(ops.attn_forward, args)
    words = ops.attn_forward(*args)[2]
    stores = backends.get(name).keep_bits_shape(q, k, P) is not None
    assert (words.numel() > 0) == stores and (mode == "store" or not stores)
