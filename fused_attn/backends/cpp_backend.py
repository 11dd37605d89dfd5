"""C++ engines ("cpu" and "cuda"): the ``torch.ops.fused_attn`` ops built from csrc/.

The extension is compiled on first use (fused_attn._build; never at import) unless it was built
ahead of time.  This module passes the reduced mask as the op's tensors (key ranges, or the block
map for the kernel's tile sizes) and q/k/v as they are: the kernels read strides.

Packed variable-length batches (``varlen=``) run through the same ops: q [1, H, Tq, D] and k, v
[1, H, Tk, D] (views of [T, H, D] tensors), lse [1, H, Tq], plus the cu_seqlens / max_seqlen
arguments; sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1], attended on its own.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _build
from ..masks import ReducedMask

# Tile sizes compiled into the kernels (csrc/fused_attn.cpp, csrc/cuda/attn_cuda.cu); the block
# map handed to a kernel must be built for them.
BLOCKS = {"cpu": (64, 64), "cuda": (32, 32)}
MAX_HEAD_DIM = {"cpu": 256, "cuda": 128}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_fakes_registered = False


def _ops(device_kind: str):
    """torch.ops.fused_attn, loading (building) the extension on first call."""
    held = _build.load()
    if device_kind == "cuda" and held != "cuda":
        raise RuntimeError("the extension was built without its CUDA kernels: "
                           + (_build.cuda_toolchain() or "it was built on a machine without nvcc"))
    _register_fakes()
    return torch.ops.fused_attn


def reasons(q: torch.Tensor, name: str) -> List[str]:
    """Why engine `name` ("cpu" or "cuda") cannot serve a call like q (empty list: it can)."""
    out = []
    if q.dtype not in DTYPES:
        out.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if q.shape[-1] > MAX_HEAD_DIM[name]:
        out.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM[name]}")
    why = unavailable(name)
    if why:
        out.append(why)
    return out


def unavailable(name: str) -> Optional[str]:
    """Why the kernels of engine `name` cannot be loaded here (None: they can; builds them once)."""
    if name == "cuda" and torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    try:
        _ops(name)
    except RuntimeError as e:
        return str(e)
    return None


def _mask_args(red: Optional[ReducedMask], device_kind: str, causal: bool):
    """(mask values, key_start, key_end, key_dense, block_state, additive) for the op; red None: no
    mask."""
    if red is None:
        return (None, None, None, None, None, False)
    keys = (red.key_start, red.key_end, red.key_dense) if red.kind == "keys" else (None, None, None)
    state = None
    if red.kind == "blocks":
        bm, bn = BLOCKS[device_kind]
        state = red.block_map(bm, bn, causal).state
    values = red.values if red.kind != "none" else None
    return (values, *keys, state, bool(red.additive))


def _head_mask(head_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if head_mask is None:
        return None
    hm = head_mask if head_mask.dim() == 2 else head_mask[None]
    return hm.to(torch.float32)


def _varlen_args(varlen, red: Optional[ReducedMask], head_mask: Optional[torch.Tensor]) -> tuple:
    """The ops' trailing (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) arguments."""
    if varlen is None:
        return (None, None, 0, 0)
    if red is not None and red.kind != "none":
        raise ValueError("varlen: packed batches take no attention_mask (sequence bounds come from cu_seqlens)")
    if head_mask is not None:
        raise ValueError("varlen: packed batches take no head_mask")
    return (varlen.cu_seqlens_q, varlen.cu_seqlens_k, int(varlen.max_seqlen_q), int(varlen.max_seqlen_k))


def forward(q, k, v, red: Optional[ReducedMask], causal: bool, scale: float, dropout_p: float,
            head_mask: Optional[torch.Tensor], seed: int = 0, rng_offset: int = 0,
            device_kind: str = "cpu", stats: bool = False, varlen=None):
    """Returns (out [B, H, Sq, D] in q.dtype, lse [B, H, Sq] fp32 in log2 units, +inf for rows that
    see nothing[, visited key blocks per (b, h, query block) when stats]).

    varlen: None, or packed sequences: an object with ``cu_seqlens_q``, ``cu_seqlens_k`` (int32
    [B + 1], contiguous, on q's device) and ``max_seqlen_q``, ``max_seqlen_k`` (ints).  Then q is
    [1, H, Tq, D], k and v [1, H, Tk, D], red None or a "none" mask, head_mask None; out is
    [1, H, Tq, D] (a view of a contiguous [Tq, H, D]), lse [1, H, Tq], visited
    [B, H, cdiv(max_seqlen_q, block_m)]; rows in no sequence give out 0 and lse +inf.  The values of
    cu_seqlens are not checked here (the kernels clamp them into bounds)."""
    ops = _ops(device_kind)
    bm, bn = BLOCKS[device_kind]
    packed = _varlen_args(varlen, red, head_mask)
    *mask, additive = _mask_args(red, device_kind, causal)
    out, lse, visited = ops.fwd(q, k, v, *mask, _head_mask(head_mask), additive, bool(causal), float(scale),
                                float(dropout_p), int(seed), int(rng_offset), bm, bn, *packed)
    return (out, lse, visited) if stats else (out, lse)


def backward(grad_out, q, k, v, out, lse, red: Optional[ReducedMask], causal: bool, scale: float,
             dropout_p: float, head_mask: Optional[torch.Tensor], seed: int = 0, rng_offset: int = 0,
             device_kind: str = "cpu", varlen=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the dtypes of q, k, v.  varlen: as in :func:`forward` (then
    grad_out and out are [1, H, Tq, D], lse [1, H, Tq]; rows in no sequence get zero gradients)."""
    ops = _ops(device_kind)
    bm, bn = BLOCKS[device_kind]
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    packed = _varlen_args(varlen, red, head_mask)
    *mask, additive = _mask_args(red, device_kind, causal)
    return ops.bwd(grad_out, q, k, v, out, lse, *mask, _head_mask(head_mask), additive, bool(causal),
                   float(scale), float(dropout_p), int(seed), int(rng_offset), bm, bn, *packed)


def dropout_keep_mask(batch: int, heads: int, q_len: int, k_len: int, dropout_p: float, seed: int,
                      rng_offset: int, device, device_kind: str = "cpu") -> torch.Tensor:
    """The bool keep-mask [B, H, Sq, Sk] the kernels apply for this (seed, offset): a testing hook,
    so the reference can apply exactly the same dropout."""
    ops = _ops(device_kind)
    like = torch.empty(0, device=device)
    return ops.dropout_keep(like, batch, heads, q_len, k_len, float(dropout_p), int(seed), int(rng_offset))


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like t [N, H, T, D] laid out as [N, T, H, D] (the packed results' layout,
    mask_desc.h zeros_token_major)."""
    n, h, rows, d = t.shape
    return t.new_empty((n, rows, h, d)).transpose(1, 2)


def _register_fakes() -> None:
    """Shape-only implementations of the C++ ops, so torch.compile can trace them."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("fused_attn::fwd")
    def _fwd_fake(q, k, v, mask, key_start, key_end, key_dense, block_state, head_mask, additive, causal,
                  scale, dropout_p, seed, rng_offset, block_m, block_n, cu_seqlens_q=None, cu_seqlens_k=None,
                  max_seqlen_q=0, max_seqlen_k=0):
        B, H, Sq, _ = q.shape
        lse = q.new_empty((B, H, Sq), dtype=torch.float32)
        if cu_seqlens_q is None:
            return torch.empty_like(q), lse, q.new_empty((B, H, -(-Sq // block_m)), dtype=torch.int32)
        n_seq = cu_seqlens_q.shape[0] - 1   # packed: visited per sequence
        return (_token_major(q), lse, q.new_empty((n_seq, H, -(-max_seqlen_q // block_m)), dtype=torch.int32))

    @torch.library.register_fake("fused_attn::bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, mask, key_start, key_end, key_dense, block_state, head_mask,
                  additive, causal, scale, dropout_p, seed, rng_offset, block_m, block_n, cu_seqlens_q=None,
                  cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
        if cu_seqlens_q is None:
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        return _token_major(q), _token_major(k), _token_major(v)

    @torch.library.register_fake("fused_attn::dropout_keep")
    def _keep_fake(like, batch, heads, q_len, k_len, dropout_p, seed, rng_offset):
        return like.new_empty((batch, heads, q_len, k_len), dtype=torch.bool)
