"""fused_attn.attention: validate, reduce the mask, pick a backend, run the fused kernel."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import backends, masks, ops, reference
from ._checks import (NO_WINDOW, Geometry, check_causal, check_head_mask, check_qkv, check_scalars, check_sizes,
                      check_varlen, check_window)
from ._rng import philox_rng
from .masks import ReducedMask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: Union[torch.Tensor, ReducedMask, None] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    head_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    window_size=NO_WINDOW,
) -> torch.Tensor:
    """Masked attention ``softmax(q kᵀ · scale + mask) · v`` in one fused kernel.

    Arguments:
        q: [B, H, Sq, D] fp16 / bf16 / fp32, any strides (HF's transposed views are read in place).
        k, v: [B, H_kv, Sk, D], same dtype and device as q; H % H_kv == 0 (grouped-query attention:
            query head h reads k / v head h // (H // H_kv), in place; H_kv = H is plain attention).
        attention_mask: None, or one of (bool/int: True / nonzero = may attend; float: additive,
            0.0 = may attend -- so not ``mask.float()``, whose 1.0 and 0.0 both attend)
            - [B, Sk] bool/int key padding (the tokenizer's attention_mask),
            - [B, Sq, Sk] bool/int per-pair mask,
            - [B|1, H|1, Sq|1, Sk] bool mask (HF 4D masks),
            - any of those 4D shapes as a float additive mask (0 / -10000 / finfo.min / -inf;
              entries <= -1e4 hide the key),
            - a ``fused_attn.ReducedMask`` from ``fused_attn.reduce_mask`` (reused as is).
        causal: bottom-right aligned causal mask: query i sees key j iff j <= i + (Sk - Sq).
        window_size: (left, right) local attention, FlashAttention-2's convention: query i sees key
            j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right; -1 = unbounded on that side;
            (-1, -1) (the default) = no window.  With causal the right side is 0.  The kernels
            visit only the key tiles inside the band.  Keyword only.
        dropout_p: dropout on the attention probabilities, inside the kernel (training).
        scale: score scale, default D ** -0.5.
        head_mask: [H] or [B, H] multiplier on the probabilities (HF 4.x head_mask).
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference"; env FUSED_ATTN_BACKEND
            overrides "auto".
    Returns:
        [B, H, Sq, D] in q's dtype.  Rows that see no key are exactly 0.  Differentiable in
        q, k, v (masks and head_mask get no gradient); dk, dv have k's and v's H_kv heads.
    """
    s = check_qkv(q, k, v)
    scale = check_scalars(dropout_p, scale, s.head_dim)
    hm = check_head_mask(head_mask, s, q.device)
    causal = check_causal(causal)
    window = _band(check_window(window_size), causal)
    red = masks.reduce_mask(attention_mask, s.batch, s.heads, s.q_len, s.k_len, device=q.device)
    needs = _needs(window, s.group > 1)
    name = backends.select(backend, q, needs)
    check_sizes(q, k, v, red, dropout_p, name)
    if name == "reference":
        return reference.attention(q, k, v, red, causal, float(dropout_p), scale, head_mask, window_size=window)
    if hm is not None:
        hm = hm.detach().to(torch.float32)
    rng = philox_rng(q.device) if dropout_p > 0.0 else None
    return ops.fused_attention(q, k, v, red, hm, causal, scale, float(dropout_p), name, rng, window=window)


def _band(window: tuple, causal: bool) -> tuple:
    """The window an engine receives: causal caps the right side at 0, and a causal call whose
    window is unbounded on the left is plain causal (no window)."""
    if not causal:
        return window
    return NO_WINDOW if window[0] < 0 else (window[0], 0)


def _needs(window: tuple, grouped: bool) -> tuple:
    """The optional engine features a call uses (backends.Engine.features)."""
    if window == NO_WINDOW:
        return ("gqa",) if grouped else ()
    return ("window", "gqa") if grouped else ("window",)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    causal: bool = False,
    backend: str = "auto",
    *,
    window_size=NO_WINDOW,
) -> torch.Tensor:
    """Attention over a packed batch of variable-length sequences (FlashAttention-2's
    ``flash_attn_varlen_func`` argument order): no padding is stored or computed.

    Arguments:
        q: [Tq, H, D] the queries of all B sequences one after the other; fp16 / bf16 / fp32;
            any strides (e.g. a slice of a fused [T, 3, H, D] projection is read in place).
        k, v: [Tk, H_kv, D], same dtype and device as q; H % H_kv == 0 (grouped-query, read in place).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] on q's device, cumulative lengths: sequence b is
            q rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] and k / v rows cu_seqlens_k[b]:cu_seqlens_k[b + 1].
            Starts at 0, non-decreasing, ends at Tq / Tk; sequences of length 0 are allowed.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest query / key sequence (no host
            sync is needed to find them; they size the grid and the dropout layout).
        dropout_p: dropout on the attention probabilities, inside the kernel.  Sequence b, query i,
            key j (positions within the sequence) keeps or drops exactly as element [b, h, i, j] of
            the padded call on the batch padded to [B, H, max_seqlen_q, max_seqlen_k].
        scale: score scale, default D ** -0.5.
        causal: bottom-right aligned within each sequence: query i sees key j iff
            j <= i + (Sk_b - Sq_b).
        window_size: (left, right) local attention within each sequence: query i sees key j iff
            i + Sk_b - Sq_b - left <= j <= i + Sk_b - Sq_b + right (-1: unbounded); keyword only.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference"; env FUSED_ATTN_BACKEND
            overrides "auto".
    Returns:
        [Tq, H, D] in q's dtype.  A query with no key to see outputs exactly 0.  Differentiable in
        q, k, v.

    The values of cu_seqlens are checked on CPU tensors; on CUDA only with FUSED_ATTN_DEBUG=1
    (checking needs a host sync).  Whatever they hold, the kernels stay inside the tensors.
    """
    seqs = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = check_scalars(dropout_p, scale, q.shape[2])
    causal = check_causal(causal)
    window = _band(check_window(window_size), causal)
    # the kernels take [1, H, T, D] views: batch stride unused, a sequence is a row offset
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    name = backends.select(backend, q4, _needs(window, k.shape[1] != q.shape[1]))
    b, mq, mk = seqs.batch, seqs.max_seqlen_q, seqs.max_seqlen_k
    red = masks.ReducedMask("none", b, q.shape[1], mq, mk)
    # the kernels' limits, on the padded shape the packed batch stands for (one sequence per batch entry)
    check_sizes(*(Geometry((b, t.shape[1], m, t.shape[3]), (0, *t.stride()[1:]))
                  for t, m in ((q4, mq), (k4, mk), (v4, mk))), red, dropout_p, name)
    if name == "reference":
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          float(dropout_p), scale, causal, window_size=window)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    rng = philox_rng(q.device) if dropout_p > 0.0 else None
    out = ops.fused_attention(q4, k4, v4, red, None, causal, scale, float(dropout_p), name, rng, varlen=seqs,
                              window=window)
    return out[0].transpose(0, 1)
