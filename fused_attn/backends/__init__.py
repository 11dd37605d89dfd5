"""Backend registry: each engine says *why* it cannot take a call; "auto" takes the first with
no reasons (warning once when it had to skip the preferred one), and an explicit request that
cannot be served raises with the reasons."""
from __future__ import annotations

import operator
import os
import warnings
from typing import Dict, List

import torch

NAMES = ("triton", "cuda", "cpu", "reference")
_warned = set()


def _engine(name: str):
    if name == "triton":
        from . import triton_backend
        return triton_backend
    if name in ("cuda", "cpu"):
        from . import cpp_backend
        return cpp_backend
    raise ValueError(name)


def reasons(name: str, q: torch.Tensor) -> List[str]:
    """Why backend `name` cannot serve a call with these inputs (empty: it can)."""
    if name == "reference":
        return []
    if name == "cuda" and q.device.type != "cuda":
        return [f"tensors are on {q.device.type}, the cuda backend needs CUDA tensors"]
    if name == "cpu" and q.device.type != "cpu":
        return [f"tensors are on {q.device.type}, the cpu backend needs CPU tensors"]
    try:
        engine = _engine(name)
    except Exception as e:  # noqa: BLE001 - an engine that cannot even import says why
        return [f"not available ({type(e).__name__}: {e})"]
    return engine.reasons(q) if name == "triton" else engine.reasons(q, name)


def select(requested: str, q: torch.Tensor) -> str:
    if torch.compiler.is_compiling():
        return _select_at_trace_time(requested, q.device, q.dtype, operator.index(q.shape[-1]))
    return _select(requested, q)


def _select_at_trace_time(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """select() under torch.compile.  Dynamo calls this eagerly while it traces and puts the name
    it returns in the graph as a constant, so the checks and the extension build behind them (a
    lock, a compiler run) are never traced: the first fused_attn call of a process may be a
    compiled one.  (Guarded by q's device, dtype and head dim; FUSED_ATTN_BACKEND is read once.)"""
    return _select(requested, torch.empty((1, 1, 1, head_dim), dtype=dtype, device=device))


# What torch.compiler.assume_constant_result(fn) does, without importing torch._dynamo (about 1 s)
# at `import fused_attn`; tests/test_compile.py checks that the decorator still sets this flag.
_select_at_trace_time._dynamo_marked_constant = True


def _select(requested: str, q: torch.Tensor) -> str:
    if requested not in NAMES + ("auto",):
        raise ValueError(f"backend: {requested!r} is not one of 'auto', " + ", ".join(repr(n) for n in NAMES))
    if requested == "auto":
        requested = os.environ.get("FUSED_ATTN_BACKEND", "auto") or "auto"
        if requested not in NAMES + ("auto",):
            raise ValueError(f"FUSED_ATTN_BACKEND={requested!r} is not one of 'auto', " + ", ".join(NAMES))
    if requested != "auto":
        why = reasons(requested, q)
        if why:
            raise RuntimeError(f"backend {requested!r} cannot serve this call: " + "; ".join(why))
        return requested
    candidates = ["triton", "cuda"] if q.device.type == "cuda" else ["cpu", "triton", "reference"]
    skipped: Dict[str, List[str]] = {}
    for name in candidates:
        why = reasons(name, q)
        if not why:
            if skipped:
                key = (name, tuple(skipped))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"fused_attn: backend 'auto' uses {name!r} because "
                                  + "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items()),
                                  stacklevel=3)
            return name
        skipped[name] = why
    raise RuntimeError("fused_attn: no backend can serve this call: "
                       + "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items()))
