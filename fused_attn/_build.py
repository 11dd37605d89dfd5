"""Building and loading the C++/CUDA extension (csrc/).

Two paths, one set of sources and flags:

* ahead of time: ``FUSED_ATTN_BUILD_EXT=1 pip install .`` -- setup.py calls
  :func:`extension_kwargs`, which returns a ``torch.utils.cpp_extension`` extension named
  ``fused_attn._C`` (CUDA sources included when nvcc and a CUDA build of torch are present, or
  ``TORCH_CUDA_ARCH_LIST`` is set);
* on first use: :func:`load` compiles the same sources with ``torch.utils.cpp_extension.load``
  (ninja), cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), and
  loads the library, which registers the ``torch.ops.fused_attn`` ops.

Nothing here runs at import time.  This module imports nothing from fused_attn, so setup.py can
load it by path before the package is installed.

The JIT build's cache name (:func:`ext_name`) carries a hash of everything ninja's build file holds:
the sources, the build flags, torch's version, and the absolute paths it names (the checkout's csrc/,
torch's and Python's include and library directories, the compilers, the CUDA architectures).  Two
checkouts, two Python environments or two torch versions sharing one TORCH_EXTENSIONS_DIR therefore
each own a build directory: each builds once, then starts without compiling (before, they rewrote
one build file in turn, and each process rebuilt the other's library).  A build announces itself on
stderr with the time it took (it takes ~20 s on two cores), also when ninja rebuilds a library that
exists (sources touched since).

Environment:
  FUSED_ATTN_CUDA_EXT=0    build the CPU kernel only, even with nvcc and CUDA torch present
  FUSED_ATTN_PORTABLE=1    JIT build without -march=native (e.g. a shared cache across CPUs)
  FUSED_ATTN_EXT_VERBOSE=1 show the compiler's output
  FUSED_ATTN_ASAN=1        JIT build under AddressSanitizer, cached under its own name (`make
                           test-asan`: the process must preload libasan)
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import List, Optional

NAME = "fused_attn_ext"
# The C++ translation units of csrc/ (the ops and the CPU kernel); the CUDA ones: csrc/cuda/*.cu.
CPP_SOURCES = ("fused_attn.cpp", "cpu_forward.cpp", "cpu_backward.cpp")
_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_state = {"loaded": None, "error": None}   # loaded: "cpu" | "cuda" (which kernels are in it)


def source_dir() -> Optional[Path]:
    """csrc/ of an installed package (fused_attn/csrc) or of a source checkout (../csrc)."""
    for cand in (_HERE / "csrc", _HERE.parent / "csrc"):
        if (cand / "fused_attn.cpp").is_file():
            return cand
    return None


def sources(with_cuda: bool) -> List[str]:
    src = source_dir()
    if src is None:
        raise FileNotFoundError(f"fused_attn: C++ sources (csrc/fused_attn.cpp) not found next to {_HERE}")
    out = [str(src / name) for name in CPP_SOURCES]
    if with_cuda:
        out += sorted(str(p) for p in (src / "cuda").glob("*.cu"))
    return out


def cuda_toolchain() -> Optional[str]:
    """None when the CUDA kernels can be built here, else why not."""
    if os.environ.get("FUSED_ATTN_CUDA_EXT", "1") == "0":
        return "FUSED_ATTN_CUDA_EXT=0"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def compiler_problem() -> Optional[str]:
    """None when a JIT build can run, else why not (no compiler, no ninja)."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (f"no C++ compiler: {cxx!r} is not on PATH (install g++, set CXX, or build ahead of time "
                f"with FUSED_ATTN_BUILD_EXT=1 pip install .)")
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja), needed to compile the C++ extension"
    return None


def asan() -> bool:
    """FUSED_ATTN_ASAN=1: build with AddressSanitizer (`make test-asan`), under its own name."""
    return os.environ.get("FUSED_ATTN_ASAN", "0") not in ("", "0")


def cflags(portable: bool) -> List[str]:
    flags = ["-O3", "-fopenmp"]   # the C++ standard: cpp_extension picks what its torch needs
    if not portable:
        flags.append("-march=native")
    if asan():
        flags += ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    return flags


def ldflags() -> List[str]:
    return ["-fopenmp"] + (["-fsanitize=address"] if asan() else [])


def nvcc_flags() -> List[str]:
    return ["-O3", "--use_fast_math", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]


def build_environment(with_cuda: bool) -> tuple:
    """The absolute paths and settings that cpp_extension writes into ninja's build file besides our
    flags: the source directory, torch's and Python's include directories, torch's library directories,
    the compilers and (CUDA) the architectures.  Part of the cache name, so that two environments (or
    checkouts) never share -- and rewrite in turn -- one build file."""
    from torch.utils import cpp_extension

    def call(fn, cuda):
        try:
            return fn("cuda" if cuda else "cpu")
        except TypeError:       # older torch: fn(cuda=...)
            return fn(cuda=cuda)

    paths = []
    for fn in (cpp_extension.include_paths, cpp_extension.library_paths):
        try:
            paths.append(call(fn, with_cuda))
        except OSError:         # no CUDA_HOME: such a build fails anyway; name it all the same
            paths.append(call(fn, False) + ["no CUDA_HOME"])
    py_include = sysconfig.get_path("include", scheme="nt" if os.name == "nt" else "posix_prefix")
    cuda = None
    if with_cuda:
        try:
            arch = cpp_extension._get_cuda_arch_flags(nvcc_flags())   # private; stable since torch 1.x
        except Exception:  # noqa: BLE001 - fall back to what decides it
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        cuda = (cpp_extension.CUDA_HOME, arch)
    return (str(source_dir()), paths, py_include, os.environ.get("CXX", "c++"), os.environ.get("CC"), cuda)


def ext_name(with_cuda: bool, portable: bool) -> str:
    """The JIT build's name (its directory under TORCH_EXTENSIONS_DIR): kind, portability and a hash
    of everything that goes into the library and its build file -- every file of csrc/, the flags,
    torch's version, :func:`build_environment` (where the sources, torch and Python live)."""
    import torch

    h = hashlib.sha256()
    src = source_dir()
    if src is not None:
        for path in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr((with_cuda, cflags(portable), nvcc_flags() if with_cuda else None, ldflags(),
                   torch.__version__, torch.version.cuda, build_environment(with_cuda))).encode())
    kind = ("cuda" if with_cuda else "cpu") + ("_portable" if portable else "") + ("_asan" if asan() else "")
    return f"{NAME}_{kind}_{h.hexdigest()[:12]}"


def _built_library(name: str) -> Optional[str]:
    """Path of an existing JIT build of `name`, or None when a load would compile it."""
    from torch.utils import cpp_extension

    try:  # the directory cpp_extension.load builds in (private helper, stable since torch 1.x)
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - unknown: say nothing rather than something wrong
        return "unknown"
    lib = os.path.join(build_dir, name + ".so")
    return lib if os.path.exists(lib) else None


def _mtime(path: Optional[str]) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _stale_sources(lib: str) -> bool:
    """A file of csrc/ is newer than the built library: ninja will recompile (e.g. after a checkout
    rewrote files with the same content; the cache name follows the content, ninja the times)."""
    built, src = _mtime(lib), source_dir()
    if built is None or src is None:
        return False
    return any((_mtime(str(p)) or 0) > built for p in src.rglob("*") if p.is_file())


def _prebuilt() -> Optional[str]:
    libs = sorted(glob.glob(str(_HERE / "_C*.so")) + glob.glob(str(_HERE / "_C*.pyd")))
    return libs[0] if libs else None


def load() -> str:
    """Load the extension (prebuilt, or compile it once); returns "cpu" or "cuda" (the kernels it
    holds).  Raises RuntimeError with the reason when it cannot; the failure is remembered."""
    if _state["loaded"] is not None:    # fast path, lock-free (torch.compile traces through it)
        return _state["loaded"]
    if _state["error"] is not None:
        raise RuntimeError(_state["error"])
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        try:
            _state["loaded"] = _load()
        except Exception as e:  # noqa: BLE001 - remember why, report it as a backend reason
            _state["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not isinstance(e, RuntimeError):
                _state["error"] = f"{type(e).__name__}: {_state['error']}"
            raise RuntimeError(_state["error"]) from e
        return _state["loaded"]


def _load() -> str:
    import torch

    pre = _prebuilt()
    if pre is not None:
        torch.ops.load_library(pre)
        return "cuda" if _has_cuda_kernels() else "cpu"
    why = compiler_problem()
    if why is not None:
        raise RuntimeError(why)
    from torch.utils import cpp_extension

    with_cuda = cuda_toolchain() is None
    portable = os.environ.get("FUSED_ATTN_PORTABLE", "0") not in ("", "0")
    verbose = os.environ.get("FUSED_ATTN_EXT_VERBOSE", "0") not in ("", "0")
    name = ext_name(with_cuda, portable)
    lib = _built_library(name)
    before = _mtime(lib) if lib != "unknown" else None
    why = None if lib == "unknown" else "once per version of it and environment" if lib is None else \
        "its sources are newer than the cached build" if _stale_sources(lib) else None
    if why:
        print(f"fused_attn: compiling the C++ extension ({'CPU + CUDA kernels, minutes' if with_cuda else 'CPU kernel, ~20 s'}"
              f"), {why}: cached as {name} under TORCH_EXTENSIONS_DIR", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        cpp_extension.load(
            name=name,
            sources=sources(with_cuda),
            extra_cflags=cflags(portable),
            extra_cuda_cflags=nvcc_flags(),
            extra_ldflags=ldflags(),
            extra_include_paths=[str(source_dir())],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise RuntimeError(f"building the C++ extension failed ({msg[0] if msg else type(e).__name__}); "
                           f"rerun with FUSED_ATTN_EXT_VERBOSE=1 to see the compiler output") from e
    if lib != "unknown" and (why or _mtime(_built_library(name)) != before):   # also a rebuild ninja chose
        print(f"fused_attn: built {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return "cuda" if with_cuda else "cpu"


def _has_cuda_kernels() -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fused_attn::fwd", "CUDA")
    except Exception:  # noqa: BLE001 - private API; assume CPU only
        return False


def extension_kwargs() -> dict:
    """setup() keyword arguments that build ``fused_attn._C`` ahead of time (setup.py)."""
    from torch.utils import cpp_extension

    with_cuda = cuda_toolchain() is None or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    src_dir = source_dir()
    if src_dir is None:
        raise FileNotFoundError("csrc/fused_attn.cpp not found")
    root = Path(os.getcwd())
    rel = [os.path.relpath(p, root) for p in sources(with_cuda)]
    kwargs = dict(sources=rel, include_dirs=[str(src_dir)], extra_link_args=ldflags(),
                  extra_compile_args={"cxx": cflags(portable=True)})
    if with_cuda:
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags()
        ext = cpp_extension.CUDAExtension("fused_attn._C", **kwargs)
    else:
        ext = cpp_extension.CppExtension("fused_attn._C", **kwargs)
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}}
