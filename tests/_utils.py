"""Test helpers: the docs/design.md tolerance rule, eager attention in the kernel's dtype, inputs."""
from __future__ import annotations

import torch

from fused_attn import reference

# Absolute floor of the tolerance rule, per dtype (FlashAttention's rule: 2x eager + floor).
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 2e-5, torch.float64: 1e-10}


def eager_attention(q, k, v, attention_mask=None, causal=False, scale=None, head_mask=None,
                    dropout_mask=None, dropout_p=0.0, window_size=(-1, -1)):
    """Plain eager attention computed *in q's dtype* (what a user would write), with the
    reference's semantics.  Its error against the fp32 oracle sets the tolerance."""
    if dropout_mask is None:
        dropout_p = 0.0
    return reference.attention(q, k, v, attention_mask, causal, dropout_p, scale, head_mask,
                               dropout_mask=dropout_mask, compute_dtype=q.dtype, window_size=window_size)


def eager_varlen(q, k, v, cu_q, cu_k, causal=False, scale=None, dropout_mask=None, dropout_p=0.0,
                 window_size=(-1, -1)):
    """eager_attention per sequence of a packed batch (q [Tq, H, D], k / v [Tk, H, D]), in q's
    dtype; dropout_mask in the padded layout [B, H, max_seqlen_q, max_seqlen_k]."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        if qs.shape[2] == 0:
            continue
        if ks.shape[2] == 0:                          # no key at all: exactly 0
            outs.append(q[cq[b]:cq[b + 1]] * 0)
            continue
        keep = None if dropout_mask is None else dropout_mask[b:b + 1, :, :qs.shape[2], :ks.shape[2]]
        o = eager_attention(qs, ks, vs, causal=causal, scale=scale, dropout_mask=keep, dropout_p=dropout_p,
                            window_size=window_size)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q * 0


def assert_tolerance(name, got, oracle, eager, dtype=None):
    """|got - oracle|_max <= 2 |eager - oracle|_max + floor, reporting where it fails."""
    dtype = dtype or got.dtype
    assert torch.isfinite(got).all(), f"{name}: non-finite values at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    # a NaN oracle or eager value would make every comparison below false, so the check would pass anything
    for what, t in (("oracle", oracle), ("eager", eager)):
        assert torch.isfinite(t).all(), f"{name}: the {what} has non-finite values at {(~torch.isfinite(t)).nonzero()[:5].tolist()}"
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
