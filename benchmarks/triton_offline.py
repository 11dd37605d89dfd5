"""Triton's real launch path on a machine without a GPU: a stand-in CUDA driver.

``install()`` makes Triton believe an sm_90 device is current.  @triton.jit kernels (imported
without TRITON_INTERPRET) then take their full launch path on CPU tensors: argument binding,
specialisation, the variant cache, and compilation for sm_90 by Triton's own frontend and
ptxas.  Only the compiled variant's C launcher is replaced: ``LAUNCHES`` records what it was
called with instead.  benchmarks/host_cost.py times the launch path with it; a test checks that
fused_attn's direct launches (backends/triton_launch.py) call the launcher exactly as Triton does.
"""
from __future__ import annotations

import os

import torch

LAUNCHES: list = []     # (compiled kernel, launcher arguments), when recording
_RECORD = {"on": False}


class _Sm90:
    """The driver calls Triton's launch and compile paths make."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _launcher(compiled):
    def run(*args):
        if _RECORD["on"]:
            LAUNCHES.append((compiled, args))
    return run


def install() -> None:
    """Once per process, before any kernel runs; TRITON_INTERPRET must be unset."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_offline: unset TRITON_INTERPRET (the interpreter has no launch path)")
    from triton.compiler import compiler
    from triton.runtime.driver import driver

    def init_handles(self):
        if self.module is None:
            self.module, self.function, self._run = object(), 0, _launcher(self)

    driver.set_active(_Sm90())
    compiler.CompiledKernel._init_handles = init_handles

    # the Triton engine takes CPU tensors, as under the interpreter
    from fused_attn.backends import triton_backend
    triton_backend.interpreting = lambda: True


class recording:
    """``with recording(): ...`` collects the launches made inside into LAUNCHES (emptied first)."""

    def __enter__(self):
        LAUNCHES.clear()
        _RECORD["on"] = True
        return LAUNCHES

    def __exit__(self, *exc):
        _RECORD["on"] = False
