"""The CUDA sources compile (nvcc, compile only): a broken .cu fails the suite on machines that
have the CUDA toolkit but no GPU, like CI.  Running the CUDA kernels is the job of the
parametrized suite's cuda-ext engine on a GPU, and of its cuda-emu engine (the same source under an
emulation of CUDA, tests/_cuda_emu.py) everywhere else.

The device code is compiled without optimisation (-Xcicc -O0 -Xptxas -O0): the source is parsed,
instantiated and lowered to SASS for sm_90 all the same, in about a minute on a 2-core machine,
where NVVM's -O3 of attn_cuda.cu took over 15 minutes (2026-12-06).  The optimised build is what
the cuda-ext engine JIT-compiles on a GPU."""
import os
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fused_attn import _build
from _cuda_emu import cuda_file

NVCC = cuda_file(os.path.join("bin", "nvcc"))
SOURCES = [s for s in _build.sources(with_cuda=True) if s.endswith(".cu")]


def test_cuda_sources_listed():
    """The ops, and each kernel for each dtype in a file of its own (a parallel build compiles them
    side by side: docs/build.md)."""
    kernels = [f"{k}_{t}.cu" for k in ("bwd_dkdv", "bwd_dq", "fwd") for t in ("bf16", "f16", "f32")]
    assert [Path(s).name for s in SOURCES] == sorted(["attn_cuda.cu", *kernels])


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: Path(s).name)
def test_cuda_source_compiles(source, tmp_path):
    includes = [str(_build.source_dir())] + cpp_extension.include_paths()
    # A CPU build of torch ships the c10/cuda headers without the one CMake generates for CUDA
    # builds; supply it (it only marks c10_cuda as a shared library).
    torch_include = cpp_extension.include_paths()[0]
    if not os.path.isfile(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20",
           "-gencode", "arch=compute_90,code=sm_90",
           *_build.nvcc_flags(), "-Xcicc", "-O0", "-Xptxas", "-O0", *[f"-I{p}" for p in includes]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
