"""The CUDA kernels of csrc/cuda/, run on CPU: the suite's "cuda-emu" engine.

tests/cuda_emu/cuda_emu.h emulates the part of CUDA the file uses (threads as fibers, barriers,
warp shuffles, shared memory, launch limits), and attn_cuda_emu.cpp compiles the unchanged .cu files
with it into ``torch.ops.fused_attn_cuda_emu``, under the fused_attn ops' schemas (csrc/op_schema.h:
the same arguments, packed varlen ones included).  `route` makes the "cuda" backend take CPU
tensors and call those ops, so every engine-parametrized test also runs the CUDA kernels on
machines without a GPU (CI).  Emulated threads are slow: a test's shapes are what bound it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from fused_attn import _build

HERE = Path(__file__).resolve().parent / "cuda_emu"
_state = {"ops": None, "error": None}


def cuda_file(relative: str) -> Optional[str]:
    """A file of the CUDA toolkit (no GPU needed), looked for under CUDA_HOME, CUDA_PATH,
    /usr/local/cuda and nvcc's install on PATH; None when there is none.  (torch's own
    cpp_extension.CUDA_HOME stays None in a CPU build of torch.)"""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in homes:
        if home and os.path.isfile(os.path.join(home, relative)):
            return os.path.join(home, relative)
    return None


def cuda_include() -> Optional[str]:
    """The CUDA toolkit's include directory (cuda_fp16.h), or None."""
    header = cuda_file(os.path.join("include", "cuda_fp16.h"))
    return os.path.dirname(header) if header else None


def unavailable() -> Optional[str]:
    """Why the emulated kernels cannot be built here (None: they can)."""
    if os.name != "posix":
        return "the emulation's fibers need POSIX ucontext"
    if cuda_include() is None:
        return "CUDA headers (cuda_fp16.h) not found: set CUDA_HOME"
    return _build.compiler_problem()


def sanitized() -> bool:
    """FUSED_ATTN_EMU_ASAN=1: build with AddressSanitizer (`make test-asan` preloads its runtime)."""
    return os.environ.get("FUSED_ATTN_EMU_ASAN", "0") not in ("", "0")


def load():
    """torch.ops.fused_attn_cuda_emu, compiled once (cached like the extension)."""
    if _state["ops"] is None and _state["error"] is None:
        from torch.utils import cpp_extension

        asan = ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if sanitized() else []
        try:
            cpp_extension.load(
                name="fused_attn_cuda_emu" + ("_asan" if asan else ""),
                sources=[str(HERE / "attn_cuda_emu.cpp")],
                extra_cflags=["-O2", "-Wno-attributes", "-Wno-unknown-pragmas", *asan],
                extra_ldflags=["-fsanitize=address"] if asan else [],
                extra_include_paths=[str(_build.source_dir()), cuda_include()],
                is_python_module=False,
                verbose=os.environ.get("FUSED_ATTN_EXT_VERBOSE", "0") not in ("", "0"),
            )
            _state["ops"] = torch.ops.fused_attn_cuda_emu
        except Exception as e:  # noqa: BLE001 - reported as the engine's skip reason
            _state["error"] = f"building the CUDA emulation failed: {str(e).strip()[:300]}"
    if _state["error"] is not None:
        raise RuntimeError(_state["error"])
    return _state["ops"]


NAME = "cuda-emu"


def register() -> str:
    """Register the emulated CUDA kernels as engine "cuda-emu" (CPU tensors, the CUDA kernels'
    tile sizes and head-dim limit); returns its name.  Raises RuntimeError when it cannot build."""
    from fused_attn import backends
    from fused_attn.backends import cpp_backend

    load()
    if NAME not in backends.names():
        cuda = cpp_backend.CUDA
        backends.register(cpp_backend.CppEngine(NAME, "cpu", cuda.blocks, cuda.max_head_dim, load,
                                                features=cuda.features))
    return NAME
