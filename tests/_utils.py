"""Test helpers: the docs/design.md tolerance rule, eager attention in the kernel's dtype, inputs."""
from __future__ import annotations

import torch

from fused_attn import reference

# Absolute floor of the tolerance rule, per dtype (FlashAttention's rule: 2x eager + floor).
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 2e-5, torch.float64: 1e-10}


def eager_attention(q, k, v, attention_mask=None, causal=False, scale=None, head_mask=None,
                    dropout_mask=None, dropout_p=0.0):
    """Plain eager attention computed *in q's dtype* (what a user would write), with the
    reference's semantics.  Its error against the fp32 oracle sets the tolerance."""
    if dropout_mask is None:
        dropout_p = 0.0
    return reference.attention(q, k, v, attention_mask, causal, dropout_p, scale, head_mask,
                               dropout_mask=dropout_mask, compute_dtype=q.dtype)


def assert_tolerance(name, got, oracle, eager, dtype=None):
    """|got - oracle|_max <= 2 |eager - oracle|_max + floor, reporting where it fails."""
    dtype = dtype or got.dtype
    assert torch.isfinite(got).all(), f"{name}: non-finite values at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    oracle = oracle.double()
    err = (got.double() - oracle).abs()
    bound = 2 * (eager.double() - oracle).abs().max().item() + FLOOR[dtype]
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        share = (err > bound).double().mean().item()
        raise AssertionError(
            f"{name}: max error {worst:.3e} > bound {bound:.3e} at {idx}: got {got[idx].item():.6f}, "
            f"oracle {oracle[idx].item():.6f}; {share:.2%} of elements over the bound")


def padding_mask(lengths, S, left=False, device="cpu"):
    """[B, S] bool key-padding mask, True = real token."""
    lengths = torch.as_tensor(lengths, device=device)
    ar = torch.arange(S, device=device)[None, :]
    if left:
        return ar >= (S - lengths)[:, None]
    return ar < lengths[:, None]
