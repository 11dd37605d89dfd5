"""The C++ extension's build: a cache name that changes with the sources, flags, torch version and
the paths ninja's build file names (so two checkouts or two Python environments sharing one cache
never rebuild each other's copy), a build that says it is building, and an ahead-of-time build that
is portable."""
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from fused_attn import _build

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A private copy of csrc/ that ext_name hashes."""
    src = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), src)
    monkeypatch.setattr(_build, "source_dir", lambda: src)
    return src


@pytest.mark.parametrize("with_cuda,portable", [(False, False), (False, True), (True, False)])
def test_name_follows_every_source_byte(sources, with_cuda, portable):
    name = _build.ext_name(with_cuda, portable)
    assert name.startswith(_build.NAME + ("_cuda" if with_cuda else "_cpu") + ("_portable" if portable else ""))
    for rel in ("fused_attn.cpp", "cpu_forward.cpp", "cpu_backward.cpp", "cpu_attn.h", "mask_desc.h", "cuda/attn_cuda.cu",
                "cuda/attn_kernels.cuh", "cuda/fwd.cuh", "cuda/fwd_f16.cu", "cuda/bwd_dkdv_bf16.cu", "cuda/bwd_dq_f32.cu"):
        path = sources / rel
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))        # one bit of one byte
        assert _build.ext_name(with_cuda, portable) != name, rel
        path.write_bytes(data)
        assert _build.ext_name(with_cuda, portable) == name, rel
    (sources / "new_header.h").write_text("// a file the build could include\n")
    assert _build.ext_name(with_cuda, portable) != name


def test_every_translation_unit_is_compiled():
    """A .cpp added to csrc/ (or a .cu to csrc/cuda/) is in the source list of both build paths."""
    src = _build.source_dir()
    listed = {Path(p).relative_to(src).as_posix() for p in _build.sources(with_cuda=True)}
    on_disk = {p.relative_to(src).as_posix() for p in [*src.glob("*.cpp"), *src.glob("cuda/*.cu")]}
    assert listed == on_disk
    assert set(_build.sources(with_cuda=False)) == {str(src / name) for name in _build.CPP_SOURCES}


def test_each_checkout_and_environment_owns_its_build(sources, monkeypatch):
    """ninja's build file holds the absolute paths of the sources and of torch's and Python's headers:
    two checkouts (or environments) that shared a name would rewrite it in turn and rebuild."""
    from torch.utils import cpp_extension

    here = _build.ext_name(False, False)
    assert _build.ext_name(False, False) == here                          # stable
    monkeypatch.undo()
    assert _build.ext_name(False, False) != here                          # another checkout
    base = _build.ext_name(False, False)
    for fn in ("include_paths", "library_paths"):
        real = getattr(cpp_extension, fn)
        monkeypatch.setattr(cpp_extension, fn, lambda *a, real=real, **kw: ["/other/venv" + p for p in real(*a, **kw)])
        assert _build.ext_name(False, False) != base, fn                  # another environment
        monkeypatch.undo()
    real = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda *a, **kw: "/other/python" + real(*a, **kw))
    assert _build.ext_name(False, False) != base                          # another interpreter
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++")
    assert _build.ext_name(False, False) != base
    monkeypatch.undo()
    assert _build.ext_name(False, False) == base


@pytest.fixture
def tiny_extension(tmp_path, monkeypatch):
    """The real JIT build path (_build._load -> cpp_extension.load -> ninja) on a one-line source that
    compiles in a fraction of a second, in a private TORCH_EXTENSIONS_DIR.  Returns build(env): load it
    as environment / checkout `env` would (its csrc/ and its torch include directory at their own
    absolute paths, the latter a symlink to the real one), and return the library's path."""
    from torch.utils import cpp_extension

    if _build.compiler_problem() is not None:
        pytest.skip(_build.compiler_problem())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_ATTN_ASAN", raising=False)
    monkeypatch.setattr(_build, "CPP_SOURCES", ("fused_attn.cpp",))
    monkeypatch.setattr(_build, "_prebuilt", lambda: None)
    monkeypatch.setattr(_build, "cuda_toolchain", lambda: "test: CPU only")
    real_include = cpp_extension.include_paths
    torch_root = str(Path(torch.__file__).resolve().parent)
    env = {}

    def include_paths(*a, **kw):
        return [p.replace(torch_root, env["torch"]) for p in real_include(*a, **kw)]

    monkeypatch.setattr(cpp_extension, "include_paths", include_paths)

    def build(name):
        root = tmp_path / name
        if not root.exists():
            (root / "csrc").mkdir(parents=True)
            (root / "csrc" / "fused_attn.cpp").write_text("int fused_attn_build_test() { return 1; }\n")
            (root / "torch").symlink_to(torch_root)
        env["torch"] = str(root / "torch")
        monkeypatch.setattr(_build, "source_dir", lambda: root / "csrc")
        assert _build._load() == "cpu"
        return _build._built_library(_build.ext_name(False, False))

    build.root = tmp_path
    return build


def _stamp(lib):
    st = os.stat(lib)
    return st.st_ino, st.st_mtime_ns


def test_two_environments_sharing_one_cache_each_build_once(tiny_extension, capfd):
    """Issue 23: two venvs with the same torch (or two checkouts of the same sources) under one
    TORCH_EXTENSIONS_DIR used to rebuild each other's library in every process.  Now each builds once,
    says so, and later loads compile nothing."""
    libs = {env: tiny_extension(env) for env in ("venv_a", "venv_b")}
    err = capfd.readouterr().err
    assert err.count("fused_attn: compiling the C++ extension") == 2, err
    assert libs["venv_a"] != libs["venv_b"]
    stamps = {env: _stamp(lib) for env, lib in libs.items()}
    for _ in range(2):
        for env in ("venv_a", "venv_b"):
            assert tiny_extension(env) == libs[env]
            assert _stamp(libs[env]) == stamps[env], f"{env} was rebuilt"
    assert "fused_attn:" not in capfd.readouterr().err


def test_a_rebuild_of_an_existing_library_says_so(tiny_extension, capfd):
    """Files touched since the build (a checkout rewrote them): ninja recompiles, and the user sees why
    the start is slow."""
    lib = tiny_extension("checkout")
    capfd.readouterr()
    src = tiny_extension.root / "checkout" / "csrc" / "fused_attn.cpp"
    os.utime(src, ns=(os.stat(lib).st_mtime_ns + 10**9,) * 2)
    assert tiny_extension("checkout") == lib
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and "sources are newer than the cached build" in err[0], err
    assert err[1].startswith("fused_attn: built "), err


def test_name_follows_flags_and_torch_version(sources, monkeypatch):
    names = {_build.ext_name(False, False), _build.ext_name(False, True), _build.ext_name(True, False)}
    assert len(names) == 3
    base = _build.ext_name(False, False)
    real_cflags = _build.cflags
    monkeypatch.setattr(_build, "cflags", lambda portable: real_cflags(portable) + ["-DFUSED_ATTN_TEST"])
    assert _build.ext_name(False, False) != base
    monkeypatch.setattr(_build, "cflags", real_cflags)
    real_ldflags = _build.ldflags
    monkeypatch.setattr(_build, "ldflags", lambda: real_ldflags() + ["-lm"])
    assert _build.ext_name(False, False) != base
    monkeypatch.setattr(_build, "ldflags", real_ldflags)
    monkeypatch.setenv("FUSED_ATTN_ASAN", "1")
    assert "_asan_" in _build.ext_name(False, False)
    monkeypatch.delenv("FUSED_ATTN_ASAN")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    assert _build.ext_name(False, False) != base
    monkeypatch.setattr(torch, "__version__", torch.__version__[:-len(".post1")])
    assert _build.ext_name(False, False) == base


def test_a_build_says_so_and_how_long_it_took(monkeypatch, capsys):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(_build, "_prebuilt", lambda: None)
    monkeypatch.setattr(_build, "compiler_problem", lambda: None)
    monkeypatch.setattr(_build, "cuda_toolchain", lambda: "test: CPU only")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["name"]))
    monkeypatch.setattr(_build, "_built_library", lambda name: None)          # not built yet
    assert _build._load() == "cpu"
    err = capsys.readouterr().err.splitlines()
    name = calls[0]
    assert name == _build.ext_name(False, False)
    assert len(err) == 2, err
    assert err[0].startswith("fused_attn: compiling the C++ extension") and name in err[0], err
    assert err[1].startswith(f"fused_attn: built {name} in ") and err[1].endswith(" s"), err
    monkeypatch.setattr(_build, "_built_library", lambda name: f"/cache/{name}/{name}.so")   # built before
    assert _build._load() == "cpu"
    assert capsys.readouterr().err == ""


def test_built_library_finds_the_jit_build():
    """_built_library looks where cpp_extension.load builds (so the message is not printed twice)."""
    from fused_attn import backends

    if backends.reasons("cpu", torch.empty(1, 1, 1, 16)):
        pytest.skip("cpu backend unavailable")
    if _build._prebuilt() is not None:
        pytest.skip("a prebuilt extension is used here")
    import os
    name = _build.ext_name(False, os.environ.get("FUSED_ATTN_PORTABLE", "0") not in ("", "0"))
    lib = _build._built_library(name)
    assert lib is not None and lib.endswith(name + ".so") and os.path.exists(lib)


def test_ahead_of_time_build_is_portable(monkeypatch):
    """FUSED_ATTN_BUILD_EXT=1 wheels run on other CPUs: no -march=native, whatever FUSED_ATTN_PORTABLE says."""
    monkeypatch.chdir(ROOT)
    for portable in ("0", "1"):
        monkeypatch.setenv("FUSED_ATTN_PORTABLE", portable)
        (ext,) = _build.extension_kwargs()["ext_modules"]
        flags = ext.extra_compile_args["cxx"]
        assert "-O3" in flags and not any(f.startswith("-march") for f in flags), flags
    assert any(f.startswith("-march") for f in _build.cflags(portable=False))   # the JIT default is native
