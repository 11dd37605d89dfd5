"""The fused attention as torch.library custom ops (``fused_attn_op::forward`` / ``backward``),
with fake implementations and a registered autograd formula, so torch.compile traces a call
without graph breaks and CUDA graphs can capture it, dropout included: the dropout RNG state is
the device tensor ``rng`` (fused_attn._rng), which the kernels read.

The reduced mask travels as its tensors plus a kind string; the op looks the ReducedMask object
up again by identity of its tensors (so block maps cached on it are reused), or rebuilds it.
The engine name picks the engine from the registry (``fused_attn.backends.get``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends, masks
from .packing import SeqLens

NAMESPACE = "fused_attn_op"


def _seqlens(cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int):
    return None if cu_q is None else SeqLens(cu_q, cu_k, max_q, max_k)


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def attn_forward(q: Tensor, k: Tensor, v: Tensor, mask_values: Optional[Tensor],
                 key_start: Optional[Tensor], key_end: Optional[Tensor], key_needs_mask: Optional[Tensor],
                 head_mask: Optional[Tensor], rng: Optional[Tensor], kind: str, additive: bool,
                 causal: bool, scale: float, dropout_p: float, engine: str,
                 cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                 max_seqlen_k: int, window_left: int = -1, window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    red = masks.rebuild(kind, q.shape[0], q.shape[1], q.shape[2], k.shape[2], mask_values, additive,
                        key_start, key_end, key_needs_mask)
    varlen = _seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    eng = backends.get(engine)
    keep = _keep_bits(eng, q, k, dropout_p, varlen)
    kw = {} if keep.numel() == 0 else {"keep_bits": keep}
    out, lse = eng.forward(q, k, v, red, causal=causal, dropout_p=dropout_p, scale=scale, head_mask=head_mask,
                           rng=rng, varlen=varlen, **_window_kw(window_left, window_right), **kw)
    return out, lse, keep


def _window_kw(left: int, right: int) -> dict:
    """The engines' window_size keyword: absent for no window (engines without the feature take calls
    without it)."""
    return {} if left < 0 and right < 0 else {"window_size": (left, right)}


def _keep_bits(eng, q: Tensor, k: Tensor, dropout_p: float, varlen) -> Tensor:
    """The buffer the engine's forward stores the dropout keep-mask in for the backward; empty
    when the backward regenerates it (a custom op cannot return None).  Zeroed: the forward
    writes only the tiles it visits, and an op's output must be a function of its inputs."""
    shape = eng.keep_bits_shape(q, k, dropout_p, varlen)
    return q.new_zeros(shape, dtype=torch.int32) if shape is not None else q.new_empty((0,), dtype=torch.int32)


@attn_forward.register_fake
def _(q, k, v, mask_values, key_start, key_end, key_needs_mask, head_mask, rng, kind, additive, causal,
      scale, dropout_p, engine, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left=-1,
      window_right=-1):
    # lse is [B, H, Sq], or [1, H, Tq] for the [1, H, Tq, D] view of a packed batch
    varlen = _seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    keep = _keep_bits(backends.get(engine), q, k, dropout_p, varlen)
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32), keep


@torch.library.custom_op(f"{NAMESPACE}::backward", mutates_args=())
def attn_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  mask_values: Optional[Tensor], key_start: Optional[Tensor], key_end: Optional[Tensor],
                  key_needs_mask: Optional[Tensor], head_mask: Optional[Tensor], rng: Optional[Tensor],
                  keep_bits: Tensor, kind: str, additive: bool, causal: bool,
                  scale: float, dropout_p: float, engine: str, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, window_left: int = -1,
                  window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    red = masks.rebuild(kind, q.shape[0], q.shape[1], q.shape[2], k.shape[2], mask_values, additive,
                        key_start, key_end, key_needs_mask)
    varlen = _seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    kw = {} if keep_bits.numel() == 0 else {"keep_bits": keep_bits}
    return backends.get(engine).backward(grad_out, q, k, v, out, lse, red, causal=causal, dropout_p=dropout_p,
                                         scale=scale, head_mask=head_mask, rng=rng, varlen=varlen,
                                         **_window_kw(window_left, window_right), **kw)


@attn_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask_values, key_start, key_end, key_needs_mask, head_mask, rng, keep_bits,
      kind, additive, causal, scale, dropout_p, engine, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      window_left=-1, window_right=-1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask_values, key_start, key_end, key_needs_mask, head_mask, rng = inputs[:9]
    ctx.meta = inputs[9:]
    ctx.save_for_backward(q, k, v, output[0], output[1], mask_values, key_start, key_end, key_needs_mask,
                          head_mask, rng, output[2])


def _backward(ctx, grad_out, _grad_lse, _grad_keep):
    q, k, v, out, lse, mask_values, key_start, key_end, key_needs_mask, head_mask, rng, keep = ctx.saved_tensors
    dq, dk, dv = attn_backward(grad_out, q, k, v, out, lse, mask_values, key_start, key_end, key_needs_mask,
                               head_mask, rng, keep, *ctx.meta)
    return (dq, dk, dv) + (None,) * 18


attn_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward as the custom ops, for eager mode: a plain autograd.Function
    holding the engine and the ReducedMask objects themselves, without the dispatcher round trips
    (tens of us per call, which show next to a 30 us kernel)."""

    @staticmethod
    def forward(ctx, q, k, v, engine, red, kw):
        shape = engine.keep_bits_shape(q, k, kw["dropout_p"], kw["varlen"]) if kw["dropout_p"] > 0.0 else None
        if shape is not None:   # the forward stores the dropout keep-mask for the backward
            # (not zeroed: words of skipped tiles are read only where P = 0, test_dropout_bits.py)
            kw = dict(kw, keep_bits=q.new_empty(shape, dtype=torch.int32))
        out, lse = engine.forward(q, k, v, red, **kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.engine, ctx.red, ctx.kw = engine, red, kw
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.engine.backward(grad_out, q, k, v, out, lse, ctx.red, **ctx.kw)
        return dq, dk, dv, None, None, None


def fused_attention(q, k, v, red: masks.ReducedMask, head_mask: Optional[Tensor], causal: bool,
                    scale: float, dropout_p: float, engine: str, rng: Optional[Tensor],
                    varlen: Optional[SeqLens] = None, window: Tuple[int, int] = (-1, -1)) -> Tensor:
    """Run the fused kernel of `engine`: through the custom op under torch.compile, directly
    otherwise (inference needs no autograd node at all).  rng: the dropout (seed, offset), int64 [2]
    on q's device (None without dropout).  varlen: q / k / v are the [1, H, T, D] views of a packed
    batch with these sequences.  window: the (left, right) local window, causal already folded in
    (functional._band); (-1, -1) = none, and then the engines get no window_size keyword."""
    if torch.compiler.is_compiling():
        seq = (None, None, 0, 0) if varlen is None else (varlen.cu_seqlens_q, varlen.cu_seqlens_k,
                                                          varlen.max_seqlen_q, varlen.max_seqlen_k)
        out, _, _ = attn_forward(q, k, v, red.values, red.key_start, red.key_end, red.key_needs_mask, head_mask,
                                 rng, red.kind, red.additive, causal, scale, dropout_p, engine, *seq, window[0],
                                 window[1])
        return out
    eng = backends.get(engine)
    kw = dict(causal=causal, dropout_p=dropout_p, scale=scale, head_mask=head_mask, rng=rng, varlen=varlen,
              **_window_kw(*window))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, eng, red, kw)
    return eng.forward(q, k, v, red, **kw)[0]
