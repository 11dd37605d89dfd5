"""Engine registry.  An engine is one object with the same surface (:class:`Engine`): a name,
the device its tensors live on, what it supports, ``reasons(q)`` -- why it cannot take a call --
and forward / backward / keep_mask with one signature and argument order.  "auto" takes the first
engine with no reasons (warning once when it had to skip the preferred one); an explicit request
that cannot be served raises with the reasons.  "reference" (fused_attn.reference) is the oracle,
always available, and never registered: the functional API calls it directly.

Engines are built on first use (importing one may fail: that becomes its reason).  Tests register
engines of their own (tests/_cuda_emu.py) with :func:`register`.
"""
from __future__ import annotations

import operator
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .._checks import KERNEL_DTYPES

_warned = set()


class Engine:
    """One kernel engine.  Subclasses set the attributes and implement the three kernel entry
    points; ``unavailable`` says why its kernels cannot load here (None: they can)."""

    name: str = ""
    device_type: str = "cpu"                  # the device of the tensors it takes
    dtypes: Tuple[torch.dtype, ...] = KERNEL_DTYPES
    max_head_dim: int = 256
    # optional call features it implements: "window" (window_size, a local band), "gqa" (k / v with
    # fewer heads than q); a call that uses one the engine lacks gets it as a reason (missing())
    features: frozenset = frozenset()

    def missing(self, needs) -> List[str]:
        """Reasons for the features in `needs` this engine does not implement."""
        what = {"window": "window_size (local attention)", "gqa": "k / v with fewer heads than q (grouped-query)"}
        return [f"{what.get(f, f)} is not supported by the {self.name} backend" for f in needs
                if f not in self.features]

    def unavailable(self) -> Optional[str]:
        return None

    def reasons(self, q: torch.Tensor) -> List[str]:
        """Why this engine cannot serve a call like q (empty list: it can)."""
        out = []
        if q.device.type != self.device_type:
            out.append(f"tensors are on {q.device.type}, the {self.name} backend needs {self.device_type.upper()} "
                       f"tensors")
        if q.dtype not in self.dtypes:
            out.append(f"dtype {q.dtype} is not supported ({', '.join(str(d) for d in self.dtypes)})")
        if q.shape[-1] > self.max_head_dim:
            out.append(f"head dim {q.shape[-1]} > {self.max_head_dim}")
        if not out:
            why = self.unavailable()
            if why:
                out.append(why)
        return out

    def forward(self, q, k, v, red, *, causal: bool, dropout_p: float, scale: float, head_mask=None,
                rng: Optional[torch.Tensor] = None, varlen=None, stats: bool = False, window_size=(-1, -1)):
        """(out like q, lse [B, H, Sq] fp32 in log2 units, +inf where a row sees nothing[, visited
        key blocks per (b, h, query block) when stats]).  q [B, H, Sq, D], k / v [B, H_kv, Sk, D]
        (H_kv < H only with the "gqa" feature), red a masks.ReducedMask; window_size the (left,
        right) band with causal folded in (right = 0 when causal; only with the "window" feature:
        callers pass it only when it is not (-1, -1)); rng the dropout (seed, offset), an int64 tensor [2] on q's device
        that the kernels read (needed when dropout_p > 0; fused_attn._rng); varlen a
        packing.SeqLens: then q / k / v are the [1, H, T, D] views of packed tensors and lse is
        [1, H, Tq]."""
        raise NotImplementedError

    def backward(self, grad_out, q, k, v, out, lse, red, *, causal: bool, dropout_p: float, scale: float,
                 head_mask=None, rng: Optional[torch.Tensor] = None, varlen=None, window_size=(-1, -1)):
        """(dq, dk, dv) like q, k, v; rng, window_size: the forward's."""
        raise NotImplementedError

    def keep_bits_shape(self, q, k, dropout_p: float, varlen=None) -> Optional[Tuple[int, ...]]:
        """The shape of the int32 buffer in which forward (``keep_bits=``) stores the dropout
        keep-mask for backward (``keep_bits=``), or None: this engine's backward regenerates it
        (the default; engines that store accept the ``keep_bits`` keyword in both)."""
        return None

    def keep_mask(self, batch: int, heads: int, q_len: int, k_len: int, dropout_p: float,
                  rng: torch.Tensor) -> torch.Tensor:
        """The bool dropout keep-mask [B, H, Sq, Sk] the kernels apply for the (seed, offset) in
        rng (an int64 tensor [2]; fused_attn._rng.rng_tensor builds one for given values), on
        rng's device."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fused_attn engine {self.name!r} ({self.device_type})>"


def _triton() -> Engine:
    from .triton_backend import ENGINE
    return ENGINE


def _cpp(name: str) -> Callable[[], Engine]:
    def build():
        from . import cpp_backend
        return cpp_backend.CPU if name == "cpu" else cpp_backend.CUDA
    return build


# the built-in engines, built on first use; AUTO: the order "auto" tries them in, per device
_FACTORIES: Dict[str, Callable[[], Engine]] = {"triton": _triton, "cuda": _cpp("cuda"), "cpu": _cpp("cpu")}
_ENGINES: Dict[str, Engine] = {}
_BROKEN: Dict[str, str] = {}
AUTO = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "triton", "reference")}


def names() -> Tuple[str, ...]:
    """Every backend name a call may ask for (built-in, registered, and "reference")."""
    return tuple(dict.fromkeys([*_FACTORIES, *_ENGINES, "reference"]))


def register(engine: Engine) -> Engine:
    """Make ``engine`` available as ``backend=engine.name`` (replacing one of that name)."""
    _ENGINES[engine.name] = engine
    _BROKEN.pop(engine.name, None)
    _CHOICES.clear()
    return engine


def get(name: str) -> Engine:
    """The engine called ``name``; RuntimeError saying why when it cannot even be built."""
    engine = _ENGINES.get(name)
    if engine is not None:
        return engine
    if name in _BROKEN:
        raise RuntimeError(_BROKEN[name])
    if name not in _FACTORIES:
        raise ValueError(f"backend: {name!r} is not one of 'auto', " + ", ".join(repr(n) for n in names()))
    try:
        engine = _FACTORIES[name]()
    except Exception as e:  # noqa: BLE001 - an engine that cannot even import says why
        _BROKEN[name] = f"not available ({type(e).__name__}: {e})"
        raise RuntimeError(_BROKEN[name]) from e
    _ENGINES[name] = engine
    return engine


def reasons(name: str, q: torch.Tensor) -> List[str]:
    """Why backend `name` cannot serve a call with these inputs (empty: it can)."""
    if name == "reference":
        return []
    try:
        engine = get(name)
    except RuntimeError as e:
        return [str(e)]
    return engine.reasons(q)


# select()'s answers: what decides them (the request, the environment switches, q's device,
# dtype and head dim) -> engine name; cleared when an engine is registered.
_CHOICES: Dict[tuple, str] = {}


def select(requested: str, q: torch.Tensor, needs: Tuple[str, ...] = ()) -> str:
    """The engine that serves a call like q: `requested` itself when it can (else RuntimeError with
    its reasons), or for "auto" the first engine of AUTO[q's device] that can.  needs: the optional
    features the call uses (Engine.features)."""
    if torch.compiler.is_compiling():
        return _select_at_trace_time(requested, q.device, q.dtype, operator.index(q.shape[-1]), needs)
    env = os.environ
    key = (requested, env.get("FUSED_ATTN_BACKEND"), env.get("TRITON_INTERPRET"), q.device, q.dtype, q.shape[-1],
           needs)
    name = _CHOICES.get(key)
    if name is None:
        name = _CHOICES[key] = _select(requested, q, needs)
    return name


def _missing(name: str, needs: Tuple[str, ...]) -> List[str]:
    if not needs or name == "reference":
        return []
    try:
        return get(name).missing(needs)
    except RuntimeError:
        return []     # (reasons() already says why it cannot be built)


def _select_at_trace_time(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                          needs: Tuple[str, ...] = ()) -> str:
    """select() under torch.compile.  Dynamo calls this eagerly while it traces and puts the name
    it returns in the graph as a constant, so the checks and the extension build behind them (a
    lock, a compiler run) are never traced: the first fused_attn call of a process may be a
    compiled one.  (Guarded by q's device, dtype and head dim; FUSED_ATTN_BACKEND is read once.)"""
    return _select(requested, torch.empty((1, 1, 1, head_dim), dtype=dtype, device=device), needs)


# What torch.compiler.assume_constant_result(fn) does, without importing torch._dynamo (about 1 s)
# at `import fused_attn`; tests/test_compile.py checks that the decorator still sets this flag.
_select_at_trace_time._dynamo_marked_constant = True


def _select(requested: str, q: torch.Tensor, needs: Tuple[str, ...] = ()) -> str:
    known = names()
    if requested not in known + ("auto",):
        raise ValueError(f"backend: {requested!r} is not one of 'auto', " + ", ".join(repr(n) for n in known))
    if requested == "auto":
        requested = os.environ.get("FUSED_ATTN_BACKEND", "auto") or "auto"
        if requested not in known + ("auto",):
            raise ValueError(f"FUSED_ATTN_BACKEND={requested!r} is not one of 'auto', " + ", ".join(known))
    if requested != "auto":
        why = reasons(requested, q) or _missing(requested, needs)
        if why:
            raise RuntimeError(f"backend {requested!r} cannot serve this call: " + "; ".join(why))
        return requested
    candidates = AUTO.get(q.device.type, ("reference",))
    skipped: Dict[str, List[str]] = {}
    for name in candidates:
        why = reasons(name, q) or _missing(name, needs)
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
