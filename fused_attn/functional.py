"""fused_attn.attention: validate, reduce the mask, pick a backend, run the fused kernel."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import backends, masks, ops, reference
from ._checks import check_head_mask, check_qkv, check_scalars, check_sizes
from ._rng import philox_seed_offset
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
) -> torch.Tensor:
    """Masked attention ``softmax(q kᵀ · scale + mask) · v`` in one fused kernel.

    Arguments:
        q: [B, H, Sq, D] fp16 / bf16 / fp32, any strides (HF's transposed views are read in place).
        k, v: [B, H, Sk, D], same dtype and device as q.
        attention_mask: None, or one of (True / 1 / 0.0 = may attend)
            - [B, Sk] bool/int key padding (the tokenizer's attention_mask),
            - [B, Sq, Sk] bool/int per-pair mask,
            - [B|1, H|1, Sq|1, Sk] bool mask (HF 4D masks),
            - any of those 4D shapes as a float additive mask (0 / -10000 / finfo.min / -inf;
              entries <= -1e4 hide the key),
            - a ``fused_attn.ReducedMask`` from ``fused_attn.reduce_mask`` (reused as is).
        causal: bottom-right aligned causal mask: query i sees key j iff j <= i + (Sk - Sq).
        dropout_p: dropout on the attention probabilities, inside the kernel (training).
        scale: score scale, default D ** -0.5.
        head_mask: [H] or [B, H] multiplier on the probabilities (HF 4.x head_mask).
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference"; env FUSED_ATTN_BACKEND
            overrides "auto".
    Returns:
        [B, H, Sq, D] in q's dtype.  Rows that see no key are exactly 0.  Differentiable in
        q, k, v (masks and head_mask get no gradient).
    """
    s = check_qkv(q, k, v)
    scale = check_scalars(dropout_p, scale, s.head_dim)
    hm = check_head_mask(head_mask, s, q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    red = masks.reduce_mask(attention_mask, s.batch, s.heads, s.q_len, s.k_len, device=q.device)
    name = backends.select(backend, q)
    check_sizes(q, k, v, red, dropout_p, name)
    if name == "reference":
        return reference.attention(q, k, v, red, causal, float(dropout_p), scale, head_mask)
    if hm is not None:
        hm = hm.detach().to(torch.float32)
    seed, offset = 0, 0
    if dropout_p > 0.0:
        seed, offset = philox_seed_offset(q.device, s.batch * s.heads * s.q_len * s.k_len)
    return ops.fused_attention(q, k, v, red, hm, causal, scale, float(dropout_p), name, seed, offset)
