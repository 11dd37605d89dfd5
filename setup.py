"""Build script.  A plain `pip install .` is pure Python (Triton needs no compiler); the C++/CUDA
sources (csrc/) are shipped inside the package (fused_attn/csrc) so that an installed fused_attn
can compile its extension on first use (torch.utils.cpp_extension.load, ninja).

FUSED_ATTN_BUILD_EXT=1 builds the extension ahead of time instead (BuildExtension; the CUDA part
too when nvcc and a CUDA build of torch are present, or TORCH_CUDA_ARCH_LIST is set):

    FUSED_ATTN_BUILD_EXT=1 pip install --no-build-isolation .
"""
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ to fused_attn/csrc in the build tree."""

    def run(self):
        super().run()
        if not self.dry_run:
            shutil.copytree(os.path.join(HERE, "csrc"), os.path.join(self.build_lib, "fused_attn", "csrc"),
                            dirs_exist_ok=True)


def _build_module():
    """fused_attn/_build.py, loaded by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("fused_attn_build", os.path.join(HERE, "fused_attn", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup_kwargs():
    kwargs = {"cmdclass": {"build_py": BuildPyWithSources}}
    if os.environ.get("FUSED_ATTN_BUILD_EXT", "0") not in ("", "0"):
        ext = _build_module().extension_kwargs()     # needs torch at build time
        kwargs["ext_modules"] = ext["ext_modules"]
        kwargs["cmdclass"].update(ext["cmdclass"])
    return kwargs


setup(**setup_kwargs())
