"""Launching a @triton.jit kernel without Triton's per-call binding.

``kernel[grid](*args, **constexprs)`` binds every argument, specialises each one (dtype and
16-byte alignment of a pointer, ==1 / %16 / width of an integer), turns that into a cache key,
re-checks the kernel's globals and only then calls the compiled variant's C launcher.  With ~60
arguments that is most of a call's host time (benchmarks/host_cost.py).

``launch`` keeps, per launch plan (triton_backend), the compiled variants Triton chose, keyed by
a finer version of the same specialisation: each tensor's dtype and data_ptr() % 16,
each integer's and None's value, the current device, over the arguments with the kernels'
tuple arguments (one level: triton_common's groups) flattened.  The first call with a new key goes through Triton's
own launcher, which compiles or finds the variant and launches it; later calls hand the same
arguments, tuples unflattened, to that variant's launcher exactly as Triton's JITFunction.run does
(the launcher flattens tuples and drops the None constants itself).  A key never
covers two of Triton's variants: anything Triton specialises on is in it.

With no launch hook set, the launcher gets None for the hooks and their metadata; calls made
while a hook is set (a profiler), under the interpreter or with $FUSED_ATTN_DIRECT_LAUNCH=0 (read
at import) take Triton's path.
"""
from __future__ import annotations

import functools
import operator
import os
from typing import Optional

import torch

DIRECT_ENV = "FUSED_ATTN_DIRECT_LAUNCH"
_MAX_VARIANTS = 64      # per plan and kernel: alignments and devices are few


# read once, when fused_attn is imported (an environment lookup per launch costs about a µs)
DIRECT = os.environ.get(DIRECT_ENV, "1") != "0"


try:   # the surface this uses is the same in Triton 3.6 and 3.8
    from triton import knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction
    _HOOKS = knobs.runtime
except Exception:  # pragma: no cover - older Triton: always Triton's own launcher
    _HOOKS, JITFunction = None, ()


def _hooked() -> bool:
    """Whether a launch hook is set: Triton's are HookChains (empty unless a profiler adds one);
    an empty chain, like None, has the launcher call nothing."""
    return any(getattr(h, "calls", h) for h in (_HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook))


class Variants:
    """The compiled variants of one kernel under one launch plan (so with fixed constexprs), by
    key.  Which arguments are tuples, and which of the flattened ones are tensors, is the plan's
    too: learned on the first call."""

    __slots__ = ("outer", "flat", "types", "tensors", "values", "table")

    def __init__(self):
        self.outer = self.flat = self.types = self.tensors = self.values = None
        self.table: dict = {}

    def key(self, args) -> Optional[tuple]:
        """None when the arguments' types (tuples' items included) differ from the first call's, or
        a tuple holds a tuple (then Triton's path)."""
        outer = tuple(map(type, args))
        if self.outer is None:
            self.outer = outer
            self.flat = _flattener(outer)
            flat = self.flat(args)
            self.types = tuple(map(type, flat))
            if tuple in self.types:         # nested groups: not keyed here
                self.flat = None
            tensors = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
            # integers, bools and None count by value; floats are fp32 whatever their value
            values = [i for i, a in enumerate(flat) if a is None or type(a) in (int, bool)]
            self.tensors = _getter(tensors)
            self.values = _getter(values)
        if outer != self.outer or self.flat is None:
            return None
        args = self.flat(args)
        if tuple(map(type, args)) != self.types:     # (a tuple's length changes the length)
            return None
        tensors = self.tensors(args)
        # all 16-byte aligned (the usual case: one OR over the distinct tensors' pointers; the
        # placeholder of unused pointer arguments repeats), else which ones are
        if functools.reduce(operator.or_, map(_DATA_PTR, dict.fromkeys(tensors)), 0) & 15:
            aligned = tuple([not t.data_ptr() & 15 for t in tensors])
        else:
            aligned = True
        return tuple(map(_DTYPE, tensors)), aligned, self.values(args)


_DATA_PTR = operator.methodcaller("data_ptr")
_DTYPE = operator.attrgetter("dtype")


def _flattener(types):
    """args -> the tuple of args with its tuple items spliced in (one level), for arguments of
    these types (compiled once per plan: a generic loop would cost more per call)."""
    items = ", ".join(f"*a[{i}]" if t is tuple else f"a[{i}]" for i, t in enumerate(types))
    return eval(f"lambda a: ({items},)") if types else (lambda a: ())


def _getter(positions):
    """args -> the tuple of args[i] for i in positions."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


def _tail(kernel, n_args: int, constexprs: dict) -> tuple:
    """The values of the kernel's parameters after the positional ones, in order: what Triton's
    binder appends (constexprs are parameters too)."""
    out = []
    for p in kernel.params[n_args:]:
        if p.name in constexprs:
            out.append(constexprs[p.name])
        elif p.has_default:
            out.append(p.default)
        else:
            raise TypeError(f"{kernel.fn.__name__}: no value for parameter {p.name}")
    return tuple(out)


def launch(kernel, grid, args: tuple, constexprs: dict, variants: Variants) -> None:
    """kernel[grid](*args, **constexprs).  ``variants``: kept for this kernel and these exact
    constexprs (the launch plan's)."""
    if not isinstance(kernel, JITFunction) or not DIRECT or _hooked():
        kernel[grid](*args, **constexprs)
        return
    device = _driver.active.get_current_device()
    key = (device, variants.key(args))
    hit = variants.table.get(key) if key[1] is not None else None
    if hit is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **constexprs)
        if compiled is not None and key[1] is not None and len(variants.table) < _MAX_VARIANTS:
            variants.table[key] = (compiled, _tail(kernel, len(args), constexprs))
        return
    compiled, tail = hit
    stream = _driver.active.get_current_stream(device)
    gy = grid[1] if len(grid) > 1 else 1
    gz = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], gy, gz, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)
