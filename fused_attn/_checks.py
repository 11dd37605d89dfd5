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
