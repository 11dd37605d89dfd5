"""Packaging: the wheel ships csrc/ inside fused_attn (so an installed package can compile its
extension on first use), and FUSED_ATTN_BUILD_EXT=1 builds the extension ahead of time."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import torch, fused_attn
from fused_attn import _build
assert fused_attn.__file__.startswith({prefix!r}), fused_attn.__file__
q, k, v = (torch.randn(2, 3, 40, 32) for _ in range(3))
m = torch.ones(2, 40, dtype=torch.bool)
m[0, 30:] = False
out = fused_attn.attention(q, k, v, m, backend="cpu")
torch.testing.assert_close(out, fused_attn.reference.attention(q, k, v, m), atol=1e-5, rtol=1e-5)
assert _build._prebuilt() is not None, "the prebuilt extension was not used"
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_ahead_of_time_wheel_ships_sources_and_extension(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "out", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".hypothesis"))
    env = dict(os.environ, FUSED_ATTN_BUILD_EXT="1", FUSED_ATTN_CUDA_EXT="0")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                          str(src), "-w", str(tmp_path / "dist")], cwd=src, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    wheel = next((tmp_path / "dist").glob("fused_attn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("fused_attn/csrc/fused_attn.cpp", "fused_attn/csrc/cpu_forward.cpp", "fused_attn/csrc/cpu_backward.cpp",
              "fused_attn/csrc/cpu_attn.h", "fused_attn/csrc/mask_desc.h", "fused_attn/csrc/philox.h",
              "fused_attn/csrc/cpu_kernels.h", "fused_attn/csrc/cuda/attn_cuda.cu",
              "fused_attn/csrc/cuda/attn_kernels.cuh", "fused_attn/csrc/cuda/fwd.cuh", "fused_attn/csrc/cuda/fwd_f16.cu"):
        assert f in names, f"{f} missing from {wheel.name}"
    assert any(n.startswith("fused_attn/_C") and n.endswith(".so") for n in names), sorted(names)

    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    env = dict(os.environ, PYTHONPATH=str(target), TORCH_EXTENSIONS_DIR=str(tmp_path / "jit"))
    res = subprocess.run([sys.executable, "-c", CHECK.format(prefix=str(target))], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not (tmp_path / "jit").exists(), "the installed package compiled the extension again"
