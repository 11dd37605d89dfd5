"""Argument checks shared by every entry point (functional API, reference, backends).

Everything here raises before any kernel runs, naming the argument and the shapes involved.
"""
from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass
from typing import Optional

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


@dataclass(frozen=True)
class Shapes:
    batch: int
    heads: int
    q_len: int
    k_len: int
    head_dim: int


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_qkv(q, k, v, dtypes=KERNEL_DTYPES) -> Shapes:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, H, S, D], got shape {_shape(t)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported "
                            f"(expected one of {', '.join(str(d) for d in dtypes)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")
    b, h, sq, d = q.shape
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"q, k: every dim must be >= 1, got q {_shape(q)}, k {_shape(k)}")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k: shape {_shape(k)} does not match q {_shape(q)} "
                         f"(expected [{b}, {h}, Sk, {d}])")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {_shape(v)} must equal k's shape {_shape(k)}")
    return Shapes(b, h, sq, k.shape[2], d)


def check_scalars(dropout_p: float, scale: Optional[float], head_dim: int) -> float:
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p: must be a float in [0, 1), got {dropout_p!r}")
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or not float(scale) == float(scale):
        raise TypeError(f"scale: expected a float or None, got {scale!r}")
    return float(scale)


def check_causal(causal) -> bool:
    """causal as a bool: True / False, and also 0 / 1 (Python or NumPy ints) and NumPy bools."""
    if isinstance(causal, bool):
        return causal
    np = sys.modules.get("numpy")
    if np is not None and isinstance(causal, np.bool_):
        return bool(causal)
    if isinstance(causal, numbers.Integral) and causal in (0, 1):
        return bool(causal)
    raise TypeError(f"causal: expected a bool (or 0 / 1), got {causal!r} ({type(causal).__name__})")


def check_head_mask(head_mask, s: Shapes, device) -> Optional[torch.Tensor]:
    """Returns head_mask as a float [B|1, H] tensor (or None)."""
    if head_mask is None:
        return None
    if not isinstance(head_mask, torch.Tensor):
        raise TypeError(f"head_mask: expected a torch.Tensor or None, got {type(head_mask).__name__}")
    if head_mask.device != device:
        raise ValueError(f"head_mask: is on {head_mask.device} but q is on {device}")
    if tuple(head_mask.shape) == (s.heads,):
        return head_mask[None, :]
    if tuple(head_mask.shape) == (s.batch, s.heads):
        return head_mask
    raise ValueError(f"head_mask: shape {_shape(head_mask)} is not [H] = [{s.heads}] "
                     f"or [B, H] = [{s.batch}, {s.heads}]")


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=KERNEL_DTYPES,
                 check_values: Optional[bool] = None):
    """Checks a packed batch (q [Tq, H, D], k / v [Tk, H, D], cu_seqlens int32 [B + 1]) and returns
    its fused_attn.packing.SeqLens.  The values of cu_seqlens (start 0, monotone, end T, lengths
    <= max_seqlen) are checked where that costs no host synchronisation -- CPU tensors -- or when
    check_values / FUSED_ATTN_DEBUG=1 asks for it."""
    from .packing import SeqLens, debug_checks

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected 3 dims [T, H, D] (packed tokens), got shape {_shape(t)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported "
                            f"(expected one of {', '.join(str(d) for d in dtypes)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")
    if q.shape[1] < 1 or q.shape[2] < 1:
        raise ValueError(f"q: heads and head dim must be >= 1, got shape {_shape(q)}")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k: shape {_shape(k)} does not match q {_shape(q)} (expected [Tk, {q.shape[1]}, "
                         f"{q.shape[2]}])")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {_shape(v)} must equal k's shape {_shape(k)}")
    cus = []
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 torch.Tensor [B + 1], got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name}: dtype {cu.dtype}, expected torch.int32")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name}: expected shape [B + 1] with B >= 1, got {_shape(cu)}")
        if cu.device != q.device:
            raise ValueError(f"{name}: is on {cu.device} but q is on {q.device}")
        cus.append(cu.contiguous())
    if cus[0].shape != cus[1].shape:
        raise ValueError(f"cu_seqlens_q {_shape(cus[0])} and cu_seqlens_k {_shape(cus[1])}: different batch sizes")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"{name}: expected a Python int, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{name}: must be >= 0, got {m}")
    if check_values is None:   # (under torch.compile a check would break the graph)
        check_values = (q.device.type == "cpu" or debug_checks()) and not torch.compiler.is_compiling()
    if check_values:
        for name, cu, total, mx in (("cu_seqlens_q", cus[0], q.shape[0], max_seqlen_q),
                                    ("cu_seqlens_k", cus[1], k.shape[0], max_seqlen_k)):
            _check_cu_values(name, cu, total, mx)
    return SeqLens(cus[0], cus[1], int(max_seqlen_q), int(max_seqlen_k))


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {vals[0]}")
    lengths = [b - a for a, b in zip(vals, vals[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(f"{name}: must be non-decreasing, but entry {bad + 1} ({vals[bad + 1]}) < entry {bad} "
                         f"({vals[bad]})")
    if vals[-1] != total:
        raise ValueError(f"{name}: last entry {vals[-1]} must equal the number of packed rows {total}")
    longest = max(lengths)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen_{name[-1]}: {max_seqlen} is below the longest sequence ({longest}) "
                         f"in {name}")
