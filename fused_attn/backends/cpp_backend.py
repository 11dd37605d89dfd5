"""C++ engines ("cpu" and "cuda"): the ``torch.ops.fused_attn`` ops built from csrc/.

The extension is compiled on first use (fused_attn._build; never at import) unless it was built
ahead of time.  This module passes the reduced mask as the op's tensors (key ranges, or the block
map for the kernel's tile sizes) and q/k/v as they are: the kernels read strides.
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


def _mask_args(red: ReducedMask, device_kind: str, causal: bool):
    """(mask values, key_start, key_end, key_dense, block_state) for the op."""
    keys = (red.key_start, red.key_end, red.key_dense) if red.kind == "keys" else (None, None, None)
    state = None
    if red.kind == "blocks":
        bm, bn = BLOCKS[device_kind]
        state = red.block_map(bm, bn, causal).state
    values = red.values if red.kind != "none" else None
    return (values, *keys, state)


def _head_mask(head_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if head_mask is None:
        return None
    hm = head_mask if head_mask.dim() == 2 else head_mask[None]
    return hm.to(torch.float32)


def forward(q, k, v, red: ReducedMask, causal: bool, scale: float, dropout_p: float,
            head_mask: Optional[torch.Tensor], seed: int = 0, rng_offset: int = 0,
            device_kind: str = "cpu", stats: bool = False):
    """Returns (out [B, H, Sq, D] in q.dtype, lse [B, H, Sq] fp32 in log2 units, +inf for rows that
    see nothing[, visited key blocks per (b, h, query block) when stats])."""
    ops = _ops(device_kind)
    bm, bn = BLOCKS[device_kind]
    out, lse, visited = ops.fwd(q, k, v, *_mask_args(red, device_kind, causal), _head_mask(head_mask),
                                bool(red.additive), bool(causal), float(scale), float(dropout_p),
                                int(seed), int(rng_offset), bm, bn)
    return (out, lse, visited) if stats else (out, lse)


def backward(grad_out, q, k, v, out, lse, red: ReducedMask, causal: bool, scale: float,
             dropout_p: float, head_mask: Optional[torch.Tensor], seed: int = 0, rng_offset: int = 0,
             device_kind: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the dtypes of q, k, v."""
    ops = _ops(device_kind)
    bm, bn = BLOCKS[device_kind]
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    return ops.bwd(grad_out, q, k, v, out, lse, *_mask_args(red, device_kind, causal),
                   _head_mask(head_mask), bool(red.additive), bool(causal), float(scale), float(dropout_p),
                   int(seed), int(rng_offset), bm, bn)


def dropout_keep_mask(batch: int, heads: int, q_len: int, k_len: int, dropout_p: float, seed: int,
                      rng_offset: int, device, device_kind: str = "cpu") -> torch.Tensor:
    """The bool keep-mask [B, H, Sq, Sk] the kernels apply for this (seed, offset): a testing hook,
    so the reference can apply exactly the same dropout."""
    ops = _ops(device_kind)
    like = torch.empty(0, device=device)
    return ops.dropout_keep(like, batch, heads, q_len, k_len, float(dropout_p), int(seed), int(rng_offset))


def _register_fakes() -> None:
    """Shape-only implementations of the C++ ops, so torch.compile can trace them."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("fused_attn::fwd")
    def _fwd_fake(q, k, v, *args):
        block_m = args[-2]
        B, H, Sq, _ = q.shape
        return (torch.empty_like(q), q.new_empty((B, H, Sq), dtype=torch.float32),
                q.new_empty((B, H, -(-Sq // block_m)), dtype=torch.int32))

    @torch.library.register_fake("fused_attn::bwd")
    def _bwd_fake(grad_out, q, k, v, *args):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("fused_attn::dropout_keep")
    def _keep_fake(like, batch, heads, q_len, k_len, dropout_p, seed, rng_offset):
        return like.new_empty((batch, heads, q_len, k_len), dtype=torch.bool)
