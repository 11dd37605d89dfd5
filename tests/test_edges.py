"""The edges a user hits (issue 23): a float mask of 0s and 1s and a mask holding NaN are refused
every time; B, Sq or Sk = 0 give the empty (or zero) result with gradients on every engine and
through varlen_attention; int64 cu_seqlens are accepted.  (The extension's cache: test_build.py;
the integrations under load: test_fuzz_hf.py.)"""
import pytest
import torch

import fused_attn
from fused_attn import masks, reference
from _utils import padding_mask

FIX = r"mask\.bool\(\).*\(1 - mask\) \* torch\.finfo\(torch\.\w+\)\.min.*float01_bias=True"


def _qkv(B=2, H=2, Sq=5, Sk=7, D=16, dtype=torch.float32, device="cpu", grad=False):
    return [torch.randn(B, H, S, D, dtype=dtype, device=device).requires_grad_(grad) for S in (Sq, Sk, Sk)]


def _float01(shape: str, dtype, lengths=(7, 4)):
    pad = padding_mask(list(lengths), 7)
    if shape == "2D":
        m = pad
    elif shape == "3D":
        m = pad[:, None, :] & pad[:, :5, None]
    else:
        m = pad[:, None, None, :].expand(2, 2, 5, 7)
    return m.to(dtype)


# -- float 0/1 masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", ["2D", "3D", "4D"])
def test_float_zero_one_mask_raises_every_time_with_the_fix(dtype, shape):
    q, k, v = _qkv()
    for backend in ("cpu", "reference", "auto"):
        for _ in range(2):                          # the same mask again, and a fresh one
            with pytest.raises(ValueError, match=FIX):
                fused_attn.attention(q, k, v, _float01(shape, dtype), backend=backend)
        mask = _float01(shape, dtype)
        for _ in range(2):
            with pytest.raises(ValueError, match=FIX):
                fused_attn.attention(q, k, v, mask, backend=backend)
    with pytest.raises(ValueError, match=FIX):      # the oracle refuses it too
        reference.attention(q, k, v, _float01(shape, dtype))
    ones = torch.ones(2, 7, dtype=dtype)            # no padding at all: still 0/1 with a 1
    with pytest.raises(ValueError, match=FIX):
        fused_attn.attention(q, k, v, ones)


@pytest.mark.parametrize("values", [
    [0.0, float("-inf")], [0.0, -10000.0], [0.0, torch.finfo(torch.float32).min], [0.0, 0.0], [0.0, -1.0],
    [0.5, 1.0], [1.0, -1e9], [2.0, 0.0]], ids=["-inf", "-1e4", "finfo.min", "all-zero", "bias", "not-0/1",
                                               "1/hidden", "0/2"])
def test_additive_masks_are_accepted(values):
    q, k, v = _qkv()
    pad = padding_mask([7, 4], 7)
    mask = torch.where(pad, values[0], values[1])
    out = fused_attn.attention(q, k, v, mask, backend="cpu")
    torch.testing.assert_close(out, reference.attention(q, k, v, mask), atol=2e-5, rtol=1e-5)
    fused_attn.attention(q, k, v, pad, backend="cpu")
    fused_attn.attention(q, k, v, pad.long(), backend="cpu")


def test_a_genuine_plus_one_bias_opts_out(monkeypatch):
    """reduce_mask(..., float01_bias=True) per mask, or FUSED_ATTN_FLOAT01_BIAS=1 for the process: the
    0/1 values are added to the scores, as the oracle computes them with an explicit bias."""
    q, k, v = _qkv()
    bias = _float01("4D", torch.float32)
    expect = torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5 + bias, dim=-1) @ v      # plain math
    red = fused_attn.reduce_mask(bias, 2, 2, 5, 7, float01_bias=True)
    for backend in ("cpu", "reference"):
        torch.testing.assert_close(fused_attn.attention(q, k, v, red, backend=backend), expect, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=FIX):              # the opt-out is per mask, not remembered
        fused_attn.attention(q, k, v, bias)
    monkeypatch.setenv(masks.FLOAT01_BIAS_ENV, "1")
    torch.testing.assert_close(fused_attn.attention(q, k, v, bias, backend="cpu"), expect, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="NaN"):             # NaN is refused whatever the opt-out
        fused_attn.reduce_mask(torch.where(bias == 1, float("nan"), 0.0), 2, 2, 5, 7, float01_bias=True)


# -- NaN in an additive mask --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", ["visible", "hidden-row", "keys"])
def test_nan_in_an_additive_mask_raises(dtype, where):
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 5, 7, dtype=dtype)
    mask[1, 0, :, 5:] = torch.finfo(dtype).min
    if where == "visible":
        mask[0, 0, 2, 3] = float("nan")
    elif where == "hidden-row":
        mask[1, 0, 4, :] = float("nan")
    else:
        mask = mask[:, :, :1]
        mask[0, 0, 0, 6] = float("nan")
    for backend in ("cpu", "reference"):
        for _ in range(2):
            with pytest.raises(ValueError, match=r"attention_mask: a float mask .* contains NaN.*nan_to_num"):
                fused_attn.attention(q, k, v, mask, backend=backend)


@pytest.mark.cuda
def test_cuda_masks_are_checked_without_a_host_sync(monkeypatch):
    """On CUDA the verdict comes back behind an event: the next call that reduces or reuses a mask
    raises (FUSED_ATTN_DEBUG=1: the call itself); every later use of that mask raises too."""
    q, k, v = _qkv(device="cuda", dtype=torch.float16)
    bad = _float01("2D", torch.float16).cuda()
    good = torch.zeros(2, 7, device="cuda", dtype=torch.float16)
    fused_attn.attention(q, k, v, bad)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"earlier call on the GPU.*" + FIX):
        fused_attn.attention(q, k, v, good)
    with pytest.raises(ValueError, match=FIX):
        fused_attn.attention(q, k, v, bad)
    monkeypatch.setenv("FUSED_ATTN_DEBUG", "1")
    with pytest.raises(ValueError, match=FIX):
        fused_attn.attention(q, k, v, _float01("3D", torch.float16).cuda())
    fused_attn.attention(q, k, v, good + 0)


# -- empty inputs --------------------------------------------------------------------------------


EMPTY = [(0, 5, 7), (2, 0, 7), (2, 5, 0), (0, 0, 0)]


@pytest.mark.parametrize("B,Sq,Sk", EMPTY, ids=["B=0", "Sq=0", "Sk=0", "all"])
@pytest.mark.parametrize("mask", [None, "keys", "additive", "pairs"])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_inputs_give_the_empty_result_with_gradients(engine, B, Sq, Sk, mask, causal):
    name, device = engine
    q, k, v = _qkv(B, 2, Sq, Sk, device=device, grad=True)
    m = {None: None, "keys": torch.ones(B, Sk, dtype=torch.bool, device=device),
         "additive": torch.zeros(B, 1, 1, Sk, device=device),
         "pairs": torch.ones(B, Sq, Sk, dtype=torch.long, device=device)}[mask]
    for backend in (name, "reference"):
        out = fused_attn.attention(q, k, v, m, causal=causal, backend=backend)
        assert out.shape == (B, 2, Sq, 16) and out.dtype == q.dtype and out.device == q.device
        assert torch.equal(out, torch.zeros_like(out))            # rows (if any) see no key: exactly 0
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=False)
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))
    with pytest.raises(ValueError, match="attention_mask"):            # masks are still validated
        fused_attn.attention(q, k, v, torch.ones(B + 1, Sk, dtype=torch.bool, device=device), backend=name)


@pytest.mark.parametrize("lens_q,lens_k", [([], []), ([0, 0], [0, 0]), ([3, 4], [0, 0]), ([0, 3], [5, 0]),
                                           ([3, 0, 2], [0, 4, 2])],
                         ids=["B=0", "T=0", "Tk=0", "crossed", "mixed"])
def test_varlen_empty_batches_and_sequences(engine, lens_q, lens_k):
    name, device = engine
    H, D = 2, 16

    def cu(lens):
        return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                            device=device)

    q, k, v = (torch.randn(sum(n), H, D, device=device, requires_grad=True) for n in (lens_q, lens_k, lens_k))
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    outs = {}
    for backend in (name, "reference"):
        out = fused_attn.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), mq, mk, backend=backend)
        assert out.shape == q.shape
        # (the oracle's graph may not reach k, v when no query sees a key: None there means zero)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=backend == "reference")
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]
        assert all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))
        outs[backend] = (out.detach(), *grads)
    for got, ref in zip(outs[name], outs["reference"]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    start = 0
    for nq, nk in zip(lens_q, lens_k):                       # a sequence with no key: exactly 0
        if nk == 0:
            assert torch.equal(outs[name][0][start:start + nq], torch.zeros(nq, H, D, device=device))
        start += nq


# -- int64 cu_seqlens -----------------------------------------------------------------------------


def test_int64_cu_seqlens_are_accepted_and_converted_once(engine):
    name, device = engine
    lens = torch.tensor([5, 0, 9, 3], device=device)
    cu64 = torch.nn.functional.pad(lens.cumsum(0), (1, 0))             # what users write: int64
    assert cu64.dtype == torch.int64
    q, k, v = (torch.randn(int(lens.sum()), 2, 16, device=device, requires_grad=True) for _ in range(3))
    got = fused_attn.varlen_attention(q, k, v, cu64, cu64, 9, 9, backend=name)
    want = fused_attn.varlen_attention(q, k, v, cu64.int(), cu64.int(), 9, 9, backend=name)
    assert torch.equal(got, want)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    from fused_attn import _checks
    converted = _checks._as_int32(cu64)
    assert converted.dtype == torch.int32 and _checks._as_int32(cu64) is converted    # once per tensor
    cu64[1] = 4                                                          # written in place: converted again
    assert _checks._as_int32(cu64)[1].item() == 4


class _Event:
    """Stands in for a torch.cuda.Event: done when the test says so."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done


def test_deferred_checks_raise_at_the_next_call_once_ready(monkeypatch):
    """The CUDA path's bookkeeping, on CPU tensors: a verdict that is not ready holds nothing up; once
    ready, the next reduce_mask raises, and every later use of the bad mask raises too."""
    monkeypatch.setattr(masks, "_PENDING", type(masks._PENDING)())
    q, k, v = _qkv()
    bad = _float01("2D", torch.float32)
    red = masks._reduce(bad, 2, 2, 5, 7)                         # reduced, not yet checked (as on CUDA)
    event = _Event()
    masks._defer(masks._stats(red.values), event, red, "a float mask (test)", bad.dtype, False)
    good = torch.zeros(2, 7)
    fused_attn.attention(q, k, v, good, backend="cpu")         # not ready: no wait, no error
    assert len(masks._PENDING) == 1
    event.done = True
    with pytest.raises(ValueError, match=r"earlier call on the GPU.*" + FIX):
        fused_attn.attention(q, k, v, good, backend="cpu")
    assert not masks._PENDING
    for _ in range(2):
        with pytest.raises(ValueError, match=FIX):
            fused_attn.attention(q, k, v, red, backend="cpu")
    fused_attn.attention(q, k, v, good, backend="cpu")         # other masks are not affected
    nan = torch.zeros(2, 7)
    nan[1, 3] = float("nan")
    red_nan, ok = masks._reduce(nan, 2, 2, 5, 7), _Event()
    masks._defer(masks._stats(red_nan.values), ok, red_nan, "a float mask (test)", nan.dtype, True)
    ok.done = True
    with pytest.raises(ValueError, match="contains NaN"):
        fused_attn.attention(q, k, v, good, backend="cpu")
    fine = masks._reduce(torch.zeros(2, 7), 2, 2, 5, 7)
    ready = _Event()
    ready.done = True
    masks._defer(masks._stats(fine.values), ready, fine, "a float mask (test)", torch.float32, False)
    fused_attn.attention(q, k, v, fine, backend="cpu")
    assert fine.error is None and not masks._PENDING
