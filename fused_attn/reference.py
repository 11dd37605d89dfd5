"""The oracle: plain eager PyTorch, computed in fp32 (fp64 for fp64 inputs).

It *defines* fused_attn's semantics (docs/design.md): every kernel is tested against it, and it is
tested against plain eager / Hugging Face attention.  Differentiable with ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import masks
from ._checks import (NO_WINDOW, REFERENCE_DTYPES, check_causal, check_head_mask, check_qkv, check_scalars,
                      check_varlen, check_window)


def causal_visible(q_len: int, k_len: int, device) -> torch.Tensor:
    """[Sq, Sk] bool, bottom-right aligned: query i sees key j iff j <= i + (Sk - Sq)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def window_visible(q_len: int, k_len: int, window_size, device) -> Optional[torch.Tensor]:
    """[Sq, Sk] bool, FlashAttention-2's local window (left, right), bottom-right aligned: query i
    sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded on that side);
    None for (-1, -1)."""
    left, right = window_size
    if left < 0 and right < 0:
        return None
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    d = j - i - (k_len - q_len)
    vis = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= d >= -left
    if right >= 0:
        vis &= d <= right
    return vis


def attention(q, k, v, attention_mask=None, causal: bool = False, dropout_p: float = 0.0,
              scale: Optional[float] = None, head_mask=None, backend: str = "reference", *,
              dropout_mask: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
              return_probs: bool = False, window_size=NO_WINDOW):
    """Same signature and semantics as :func:`fused_attn.attention`.

    ``dropout_mask`` (testing): a bool keep-mask broadcastable to [B, H, Sq, Sk]; with it the
    reference applies exactly that dropout (kept probabilities scaled by 1 / (1 - dropout_p)),
    so kernel dropout can be compared element-wise.  Without it, dropout_p > 0 draws its own.
    ``compute_dtype``: the dtype of the math (default fp32, fp64 for fp64 inputs); q's own dtype
    gives plain eager attention as a user would write it (the tests' tolerance yardstick).
    ``return_probs``: return (out, probabilities as applied to v [B, H, Sq, Sk] in compute dtype).
    """
    s = check_qkv(q, k, v, dtypes=REFERENCE_DTYPES)
    scale = check_scalars(dropout_p, scale, s.head_dim)
    hm = check_head_mask(head_mask, s, q.device)
    causal = check_causal(causal)
    window = check_window(window_size)
    visible, bias = masks.dense_mask(attention_mask, s.batch, s.heads, s.q_len, s.k_len)
    if s.group > 1:   # grouped-query k / v: query head h reads k / v head h // group
        k, v = (t.repeat_interleave(s.group, dim=1) for t in (k, v))

    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(cdt)
    if causal:
        cv = causal_visible(s.q_len, s.k_len, q.device)
        visible = cv if visible is None else visible & cv
    wv = window_visible(s.q_len, s.k_len, window, q.device)
    if wv is not None:
        visible = wv if visible is None else visible & wv
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
        # a row that sees no key outputs exactly 0 (and gets zero gradients), never NaN
        empty_row = ~visible.any(-1, keepdim=True)
        scores = scores.masked_fill(empty_row, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        keep = dropout_mask
        if keep is None:
            keep = torch.rand(probs.shape, device=q.device) >= dropout_p
        probs = probs * keep.to(cdt) / (1.0 - dropout_p)
    if hm is not None:
        probs = probs * hm.to(cdt)[:, :, None, None]
    out = torch.matmul(probs, v.to(cdt)).to(q.dtype)
    return (out, probs) if return_probs else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     dropout_p: float = 0.0, scale: Optional[float] = None, causal: bool = False,
                     backend: str = "reference", *, dropout_mask: Optional[torch.Tensor] = None,
                     window_size=NO_WINDOW) -> torch.Tensor:
    """Same signature and semantics as :func:`fused_attn.varlen_attention`: every sequence of the
    packed batch through :func:`attention` on its own (causal and window_size bottom-right aligned
    per sequence).

    ``dropout_mask`` (testing): the bool keep-mask in the padded layout [B, H, max_seqlen_q,
    max_seqlen_k]; sequence b uses ``dropout_mask[b, :, :Sq_b, :Sk_b]`` (docs/design.md, "Dropout").
    """
    seqs = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        dtypes=REFERENCE_DTYPES, check_values=True)
    window = check_window(window_size)
    cq, ck = seqs.cu_seqlens_q.tolist(), seqs.cu_seqlens_k.tolist()
    outs = []
    for b in range(seqs.batch):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]          # [1, H, Sq_b, D]
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        if qs.shape[2] == 0:
            continue
        if ks.shape[2] == 0:                                    # no key at all: exactly 0
            o = qs * 0
        else:
            keep = None
            if dropout_mask is not None:
                keep = dropout_mask[b:b + 1, :, :qs.shape[2], :ks.shape[2]]
            o = attention(qs, ks, vs, None, causal, dropout_p, scale, dropout_mask=keep, window_size=window)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q * 0
    return torch.cat(outs)
