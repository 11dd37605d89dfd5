"""C++ engines ("cpu" and "cuda"): the ``torch.ops.fused_attn`` ops built from csrc/, each one
:class:`CppEngine` (tests register a third, the CUDA kernels under a CPU emulation).

The extension is compiled on first use (fused_attn._build; never at import) unless it was built
ahead of time.  This module passes the reduced mask as the op's tensors (key ranges, or the block
map for the kernel's tile sizes) and q/k/v as they are: the kernels read strides.

Packed variable-length batches (``varlen=``) run through the same ops: q [1, H, Tq, D] and k, v
[1, H, Tk, D] (views of [T, H, D] tensors), lse [1, H, Tq], plus the cu_seqlens / max_seqlen
arguments; sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1], attended on its own.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import _build
from ..masks import ReducedMask
from . import Engine

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_fakes_registered = False


def extension_ops(kernels: str):
    """torch.ops.fused_attn, loading (building) the extension on first call; kernels "cpu" or
    "cuda": the extension must hold those."""
    held = _build.load()
    if kernels == "cuda" and held != "cuda":
        raise RuntimeError("the extension was built without its CUDA kernels: "
                           + (_build.cuda_toolchain() or "it was built on a machine without nvcc"))
    _register_fakes()
    return torch.ops.fused_attn


class CppEngine(Engine):
    """The C++ kernels behind one op namespace: ``load_ops()`` returns it (the ``fwd`` / ``bwd`` /
    ``dropout_keep`` ops of csrc/), ``blocks`` the tile sizes compiled into the kernels (the block
    maps handed to them must be built for those)."""

    def __init__(self, name: str, device_type: str, blocks: Tuple[int, int], max_head_dim: int,
                 load_ops: Callable[[], object], unsupported: Optional[Callable[[], Optional[str]]] = None,
                 features: frozenset = frozenset()):
        self.name, self.device_type, self.blocks, self.max_head_dim = name, device_type, blocks, max_head_dim
        self._load_ops, self._unsupported = load_ops, unsupported
        self.features = frozenset(features)

    def ops(self):
        return self._load_ops()

    def unavailable(self) -> Optional[str]:
        """Why the kernels cannot be loaded here (None: they can; builds them once)."""
        why = self._unsupported() if self._unsupported is not None else None
        if why:
            return why
        try:
            self.ops()
        except RuntimeError as e:
            return str(e)
        return None

    def forward(self, q, k, v, red, *, causal, dropout_p, scale, head_mask=None, rng=None, varlen=None,
                stats=False, window_size=(-1, -1), rel_bias=None):
        self._check_features(q, k, window_size, rel_bias)
        out, lse, visited = _forward(self.ops(), self.blocks, q, k, v, red, causal, scale, dropout_p, head_mask,
                                     rng, varlen, window_size, _rel_args(rel_bias))
        return (out, lse, visited) if stats else (out, lse)

    def backward(self, grad_out, q, k, v, out, lse, red, *, causal, dropout_p, scale, head_mask=None, rng=None,
                 varlen=None, window_size=(-1, -1), rel_bias=None):
        self._check_features(q, k, window_size, rel_bias)
        dq, dk, dv, dc2p, dp2c = _backward(self.ops(), self.blocks, grad_out, q, k, v, out, lse, red, causal, scale,
                                           dropout_p, head_mask, rng, varlen, window_size, _rel_args(rel_bias))
        if rel_bias is None:
            return dq, dk, dv
        c2p, p2c, _ = rel_bias   # the table gradients in the tables' dtypes
        return (dq, dk, dv, None if c2p is None else dc2p.to(c2p.dtype), None if p2c is None else dp2c.to(p2c.dtype))

    def _check_features(self, q, k, window_size, rel_bias=None) -> None:
        needs = tuple(f for f, used in (("window", tuple(window_size) != (-1, -1)), ("gqa", k.shape[1] != q.shape[1]),
                                        ("rel_bias", rel_bias is not None)) if used)
        why = self.missing(needs)
        if why:
            raise RuntimeError(f"backend {self.name!r} cannot serve this call: " + "; ".join(why))

    def keep_mask(self, batch, heads, q_len, k_len, dropout_p, rng):
        return self.ops().dropout_keep(rng, batch, heads, q_len, k_len, float(dropout_p))


def _no_cuda_torch() -> Optional[str]:
    return None if torch.version.cuda is not None else f"torch {torch.__version__} has no CUDA support"


# Tile sizes: csrc/cpu_attn.h (CPU), csrc/cuda/attn_kernels.cuh (CUDA).
CPU = CppEngine("cpu", "cpu", (64, 64), 256, lambda: extension_ops("cpu"), features={"window", "gqa", "rel_bias"})
CUDA = CppEngine("cuda", "cuda", (32, 32), 128, lambda: extension_ops("cuda"), _no_cuda_torch,
                 features={"window", "gqa", "rel_bias"})


def _rel_args(rel_bias) -> tuple:
    """The ops' trailing (c2p, p2c, rel_index): fp32 tables, int32 index (all None without)."""
    if rel_bias is None:
        return (None, None, None)
    c2p, p2c, index = rel_bias
    return (None if c2p is None else c2p.to(torch.float32), None if p2c is None else p2c.to(torch.float32),
            index.to(torch.int32).contiguous())


def _mask_args(red: Optional[ReducedMask], blocks: Tuple[int, int], causal: bool):
    """(mask values, key_start, key_end, key_needs_mask, block_state, additive) for the op; red None: no
    mask."""
    if red is None:
        return (None, None, None, None, None, False)
    keys = (red.key_start, red.key_end, red.key_needs_mask) if red.kind == "keys" else (None, None, None)
    state = None
    if red.kind == "blocks":
        state = red.block_map(blocks[0], blocks[1], causal).state
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


def _forward(ops, blocks, q, k, v, red: Optional[ReducedMask], causal: bool, scale: float, dropout_p: float,
             head_mask: Optional[torch.Tensor], rng: Optional[torch.Tensor], varlen, window_size=(-1, -1),
             rel=(None, None, None)):
    """(out [B, H, Sq, D] in q.dtype, lse [B, H, Sq] fp32 in log2 units, +inf for rows that see
    nothing, visited key blocks per (b, h, query block); the CPU kernel counts the key tiles of
    each of a block's shorter query tiles under a narrow band, csrc/cpu_attn.h query_tile_rows).
    rng: the dropout (seed, offset), int64 [2] on q's device, read by the kernels (None without
    dropout).

    varlen: None, or packed sequences (fused_attn.packing.SeqLens).  Then q is [1, H, Tq, D], k and
    v [1, H, Tk, D], red None or a "none" mask, head_mask None; out is [1, H, Tq, D] (a view of a
    contiguous [Tq, H, D]), lse [1, H, Tq], visited [B, H, cdiv(max_seqlen_q, block_m)]; rows in no
    sequence give out 0 and lse +inf.  The values of cu_seqlens are not checked here (the kernels
    clamp them into bounds).  window_size: the (left, right) band, causal folded in (right 0).  rel:
    the ops' (c2p, p2c, rel_index), DeBERTa's disentangled score."""
    packed = _varlen_args(varlen, red, head_mask)
    *mask, additive = _mask_args(red, blocks, causal)
    return ops.fwd(q, k, v, *mask, _head_mask(head_mask), additive, bool(causal), float(scale), float(dropout_p),
                   rng, blocks[0], blocks[1], *packed, int(window_size[0]), int(window_size[1]), *rel)


def _backward(ops, blocks, grad_out, q, k, v, out, lse, red: Optional[ReducedMask], causal: bool, scale: float,
              dropout_p: float, head_mask: Optional[torch.Tensor], rng: Optional[torch.Tensor], varlen,
              window_size=(-1, -1), rel=(None, None, None)):
    """(dq, dk, dv, dc2p, dp2c): dq, dk, dv in the dtypes of q, k, v, the table gradients fp32 (empty
    without the table); rel: the ops' (c2p, p2c, rel_index).  varlen: as in :func:`_forward` (then grad_out and out
    are [1, H, Tq, D], lse [1, H, Tq]; rows in no sequence get zero gradients)."""
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    packed = _varlen_args(varlen, red, head_mask)
    *mask, additive = _mask_args(red, blocks, causal)
    return ops.bwd(grad_out, q, k, v, out, lse, *mask, _head_mask(head_mask), additive, bool(causal),
                   float(scale), float(dropout_p), rng, blocks[0], blocks[1], *packed, int(window_size[0]),
                   int(window_size[1]), *rel)


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
    def _fwd_fake(q, k, v, mask, key_start, key_end, key_needs_mask, block_state, head_mask, additive, causal,
                  scale, dropout_p, rng, block_m, block_n, cu_seqlens_q=None, cu_seqlens_k=None,
                  max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1, c2p=None, p2c=None,
                  rel_index=None):
        B, H, Sq, _ = q.shape
        lse = q.new_empty((B, H, Sq), dtype=torch.float32)
        if cu_seqlens_q is None:
            return torch.empty_like(q), lse, q.new_empty((B, H, -(-Sq // block_m)), dtype=torch.int32)
        n_seq = cu_seqlens_q.shape[0] - 1   # packed: visited per sequence
        return (_token_major(q), lse, q.new_empty((n_seq, H, -(-max_seqlen_q // block_m)), dtype=torch.int32))

    @torch.library.register_fake("fused_attn::bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, mask, key_start, key_end, key_needs_mask, block_state, head_mask,
                  additive, causal, scale, dropout_p, rng, block_m, block_n, cu_seqlens_q=None,
                  cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1, c2p=None,
                  p2c=None, rel_index=None):
        tables = tuple(q.new_empty((0,), dtype=torch.float32) if t is None or rel_index is None
                       else t.new_empty(t.shape) for t in (c2p, p2c))
        if cu_seqlens_q is None:
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *tables
        return _token_major(q), _token_major(k), _token_major(v), *tables

    @torch.library.register_fake("fused_attn::dropout_keep")
    def _keep_fake(rng, batch, heads, q_len, k_len, dropout_p):
        return rng.new_empty((batch, heads, q_len, k_len), dtype=torch.bool)
