"""The CUDA sources compile (nvcc, compile only): a broken .cu fails the suite on machines that
have the CUDA toolkit but no GPU, like CI.  Running the CUDA kernels is the job of the
parametrized suite's cuda-ext engine on a GPU, and of its cuda-emu engine (the same source under an
emulation of CUDA, tests/_cuda_emu.py) everywhere else.

The device code is compiled without optimisation (-Xcicc -O0 -Xptxas -O0): the source is parsed,
instantiated and lowered to SASS for sm_90 all the same, in seconds per kernel file, where NVVM's
-O3 of the kernels takes minutes of CPU per file on a 2-core machine (docs/build.md).  The optimised
build is what the cuda-ext engine JIT-compiles on a GPU; `python -m benchmarks.cuda_build` times it
with the same command (benchmarks/cuda_build.py), registers and spills included."""
import os
import subprocess
from pathlib import Path

import pytest

from _cuda_emu import cuda_file
from benchmarks import cuda_build

NVCC = cuda_file(os.path.join("bin", "nvcc"))
SOURCES = cuda_build.cuda_sources()


def test_cuda_sources_listed():
    """The ops, and each kernel for each dtype in a file of its own (a parallel build compiles them
    side by side: docs/build.md)."""
    kernels = [f"{k}_{t}.cu" for k in ("bwd_dkdv", "bwd_dq", "fwd") for t in ("bf16", "f16", "f32")]
    assert [Path(s).name for s in SOURCES] == sorted(["attn_cuda.cu", *kernels])


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: Path(s).name)
def test_cuda_source_compiles(source, tmp_path):
    cmd = cuda_build.nvcc_command(NVCC, source, str(tmp_path / "out.o"), cuda_build.include_dirs(tmp_path),
                                  device_o0=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
