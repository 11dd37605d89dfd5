"""Build script.  A plain `pip install .` is pure Python (Triton needs no compiler).

The C++/CUDA extension (csrc/) is built ahead of time only when FUSED_ATTN_BUILD_EXT=1;
otherwise fused_attn compiles it on first use with torch.utils.cpp_extension.load (ninja).
"""
import os

from setuptools import setup


def ext_modules():
    if os.environ.get("FUSED_ATTN_BUILD_EXT", "0") in ("", "0"):
        return {}
    from fused_attn_build import extension_kwargs  # noqa: deferred: needs torch at build time
    return extension_kwargs()


setup(**ext_modules())
