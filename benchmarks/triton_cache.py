"""Triton's on-disk kernel cache, built on a machine without a GPU for the GPU machine's Triton.

    python -m benchmarks.triton_cache keys                     # this machine's cache-key components (JSON)
    python -m benchmarks.triton_cache build --out .triton-prebuilt.tar.gz
    python -m benchmarks.triton_cache install TARBALL CACHE_DIR   # what benchmarks/gpu_check.py does
    python -m benchmarks.triton_cache replay                   # the build's calls again (hit test)

``build`` (TRITON_INTERPRET unset; Triton of the GPU machine's version, 3.6.0 today) runs the
calls of the GPU steps (benchmarks/gpu_check.py's kernels, host, sanitizer, flex, local, deberta
and hf steps: benchmarks/triton_cache_steps.py, one workload per step, ``--workload`` picks some)
on Triton's real launch path with the stand-in sm_90 driver of benchmarks/triton_offline.py and
the tiles an H100 gets, so that every kernel variant they reach is compiled for sm_90 by Triton's
own compiler and ptxas.  The cache is pruned to what
a hit loads (the metadata .json and the .cubin) and packed with a manifest of the key components.

What decides a hit (triton/runtime/cache.py ``get_cache_key``, Triton 3.6/3.8):
``sha256(triton_key() - source hash - backend hash - options hash - env vars)``, where
  * ``triton_key()`` = Triton's version + sha256 of its Python sources (frontend, compiler,
    backends, language) + sha256 of ``_C/libtriton.so``.  libtriton.so is built per Python version:
    the PyPI wheels of triton 3.6.0 for cp311 and cp312 have identical Python files but different
    libtriton.so, so a cache built by Python 3.11 is never hit by the GPU machine's Python 3.12.
    ``--libtriton-sha256`` (default: the cp312 manylinux wheel of triton 3.6.0) makes the build
    file its kernels under the key the GPU machine computes; the code generated is the same (one
    C++ source, one LLVM) -- the GPU run's hit counts are the test of that.
  * the source hash: the kernel's source and dependencies, its signature (dtypes), constexprs and
    specialisation (16-byte alignment of pointers, ==1 / %16 of integers): the same calls on the
    same shapes give the same hash; a kernel edit, or a shape whose integers divide differently,
    misses.
  * the backend hash: ``ptxas --version`` of the ptxas Triton uses (its bundled one unless
    $TRITON_PTXAS_PATH) and the arch (sm90); the options hash: num_warps, num_stages, ... and the
    sha256 of libdevice; env vars: those of Triton's list that are set (none, normally).
Triton's compiled launchers (one small C module per kernel signature, built with the host's
compiler against the host's Python) cannot be prebuilt here; the GPU machine compiles them (~1 s
each).  The group files of the cache name their files by absolute path: ``install`` rewrites them
for the cache directory they land in.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sha256 of triton/_C/libtriton.so in PyPI's triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
# (measured 2026-12-06): the GPU machine's Python is 3.12 with triton 3.6.0
GPU_LIBTRITON_SHA256 = "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87"
MANIFEST = "manifest.json"
KEEP_SUFFIXES = (".json", ".cubin")       # what a cache hit reads (CompiledKernel: metadata + binary)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def libtriton_sha256() -> str:
    import sysconfig

    import triton
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    with open(os.path.join(os.path.dirname(triton.__file__), "_C", f"libtriton.{ext}"), "rb") as f:
        return _sha(f.read())


def kernel_sources_sha256() -> str:
    """sha256 over fused_attn's Triton kernel files: a change means the prebuilt kernels miss."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "fused_attn", "backends", "triton_*.py"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()


def key_parts(libtriton: Optional[str] = None) -> Dict[str, object]:
    """The components of Triton's cache key that do not depend on the kernel, for an sm_90 target.
    ``libtriton``: compute triton_key() as a Triton whose libtriton.so has this sha256 would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import cache
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        env_vars = get_cache_invalidating_env_vars()
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        env_vars = {"error": repr(e)}
    local = libtriton_sha256()
    key = cache.triton_key()
    if libtriton and libtriton != local:
        if local not in key:
            raise RuntimeError("triton_key() does not hold libtriton.so's sha256: this Triton's key differs")
        key = key.replace(local, libtriton)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    bhash = backend.hash()                       # `ptxas --version` output + "-90"
    ptxas = [line for line in bhash.splitlines() if "release" in line]
    return {"triton": triton.__version__, "python": sys.version.split()[0],
            "libtriton_sha256": libtriton or local, "triton_key_sha256": _sha(key.encode()),
            "backend_hash": _sha(bhash.encode()), "ptxas": ptxas[0].strip() if ptxas else bhash[:80],
            "options_hash": backend.parse_options({}).hash(),
            "env_vars": env_vars, "ptxas_path_env": os.environ.get("TRITON_PTXAS_PATH", ""),
            "kernel_sources_sha256": kernel_sources_sha256()}


def compare(manifest: Dict, here: Dict) -> Dict[str, str]:
    """{component: 'built X, here Y'} for every component that differs (empty: hits expected)."""
    out = {}
    for k in ("triton", "triton_key_sha256", "backend_hash", "options_hash", "env_vars", "kernel_sources_sha256"):
        a, b = manifest.get("keys", {}).get(k), here.get(k)
        if a != b:
            out[k] = f"built {str(a)[:80]}, here {str(b)[:80]}"
    return out


# -- install: extract a packed cache into a cache dir, group files pointed at their new place

def install(tarball: str, cache_dir: str) -> Dict:
    """Extract ``tarball`` into ``cache_dir`` (merging), rewrite each group file's absolute paths to
    the files it lists there (dropping pruned ones); returns the manifest."""
    os.makedirs(cache_dir, exist_ok=True)
    manifest: Dict = {}
    with tarfile.open(tarball) as tar:
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name.split("/"):
                continue                          # nothing outside cache_dir
            if m.name == MANIFEST:
                manifest = json.load(tar.extractfile(m))
                continue
            tar.extract(m, cache_dir)
    n = relocate(cache_dir)
    manifest["installed_groups"] = n
    return manifest


def relocate(cache_dir: str) -> int:
    """Point every group file (__grp__*.json) under cache_dir at the files beside it; returns how many."""
    n = 0
    for grp in glob.glob(os.path.join(cache_dir, "*", "__grp__*.json")):
        d = os.path.dirname(grp)
        with open(grp) as f:
            data = json.load(f)
        children = data.get("child_paths")
        if not isinstance(children, dict):
            continue
        new = {c: os.path.join(d, c) for c in children if os.path.exists(os.path.join(d, c))}
        tmp = grp + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"child_paths": new}, f)
        os.replace(tmp, grp)
        n += 1
    return n


def pack(cache_dir: str, out: str, manifest: Dict, keep_all: bool = False) -> Dict[str, int]:
    """tar.gz of cache_dir's kernel entries (json + cubin unless keep_all) and the manifest."""
    files = entries = 0
    with tarfile.open(out, "w:gz") as tar:
        for d in sorted(os.listdir(cache_dir)):
            names = sorted(os.listdir(os.path.join(cache_dir, d)))
            if not any(n.startswith("__grp__") and n.endswith(".json") for n in names):
                continue                          # launchers (.so) and other non-kernel entries
            entries += 1
            for name in names:
                if keep_all or name.startswith("__grp__") or name.endswith(KEEP_SUFFIXES):
                    tar.add(os.path.join(cache_dir, d, name), arcname=f"{d}/{name}")
                    files += 1
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return {"entries": entries, "files": files, "bytes": os.path.getsize(out)}


# -- build: the GPU steps' calls, compiled offline

def _as_on_h100() -> None:
    """The stand-in driver, the tile tables' choice for an H100 whatever the tensors' device, and
    backend="auto" choosing as for CUDA tensors (Triton)."""
    import torch

    from benchmarks import triton_offline
    from fused_attn import backends
    triton_offline.install()
    backends.AUTO["cpu"] = backends.AUTO["cuda"][:1]
    from fused_attn.backends import triton_backend as tb
    gpu = torch.device("cuda", 0)
    fwd, bwd = tb.fwd_config, tb.bwd_config
    tb._capability = lambda index: (9, 0)
    tb.fwd_config = lambda head_dim, dtype, device: fwd(head_dim, dtype, gpu)
    tb.bwd_config = lambda head_dim, dtype, device: bwd(head_dim, dtype, gpu)


def _tiny_calls() -> int:
    """One small padded forward (fp16): the tests' check that a prebuilt cache is hit."""
    import torch

    import fused_attn
    q, k, v = (torch.randn(2, 2, 64, 64, dtype=torch.float16) for _ in range(3))
    pad = torch.arange(64)[None, :] < torch.tensor([64, 40])[:, None]
    with torch.no_grad():
        fused_attn.attention(q, k, v, pad, backend="triton")
    return 1


def _steps_calls(names):
    def calls() -> int:
        from benchmarks import triton_cache_steps
        return triton_cache_steps.run(names)
    return calls


def _workload(spec: str):
    """'gpu-check' (every step's calls), 'tiny', or a comma list of benchmarks/triton_cache_steps.STEPS."""
    from benchmarks.triton_cache_steps import STEPS
    if spec == "tiny":
        return _tiny_calls
    names = list(STEPS) if spec == "gpu-check" else spec.split(",")
    bad = [n for n in names if n not in STEPS]
    if bad:
        raise SystemExit(f"--workload: unknown {bad}; 'gpu-check', 'tiny' or a comma list of {', '.join(STEPS)}")
    return _steps_calls(names)


def _offline(libtriton: Optional[str]) -> Dict:
    """Triton's real launch path with the stand-in sm_90 driver, cache keys as the GPU machine's
    Triton computes them (``libtriton``: its libtriton.so's sha256; None: this machine's)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the offline build takes Triton's real launch path")
    import triton
    from triton.runtime import cache
    if libtriton == GPU_LIBTRITON_SHA256 and triton.__version__ != "3.6.0":
        print(f"triton {triton.__version__} here: the default --libtriton-sha256 is triton 3.6.0's; using this "
              f"Triton's own key (hits only on a machine with the same Triton build)")
        libtriton = None
    keys = key_parts(libtriton)
    if libtriton:
        local, key = libtriton_sha256(), cache.triton_key()
        cache.triton_key = lambda: key.replace(local, libtriton)   # what the GPU machine's Triton computes
    _as_on_h100()
    return keys


def build(out: str, libtriton: Optional[str], keep_all: bool, workload: str) -> int:
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), ".triton-build-cache")
    shutil.rmtree(tmp, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = tmp      # read by Triton on each lookup
    keys = _offline(libtriton)
    t0 = time.time()
    print(f"building the Triton cache for sm_90 with triton {keys['triton']} (libtriton "
          f"{keys['libtriton_sha256'][:12]}, triton_key {keys['triton_key_sha256'][:12]})", flush=True)
    calls = _workload(workload)()
    manifest = {"keys": keys, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workload": workload,
                "calls": calls, "seconds": round(time.time() - t0, 1)}
    stats = pack(tmp, out, manifest, keep_all)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {stats['entries']} kernels, {stats['bytes'] / 2**20:.1f} MiB, {time.time() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys", help="print this machine's cache-key components (JSON)")
    k.add_argument("--libtriton-sha256", default=None)
    b = sub.add_parser("build", help="compile the GPU steps' kernel variants for sm_90 and pack them")
    b.add_argument("--out", default=os.path.join(ROOT, ".triton-prebuilt.tar.gz"))
    b.add_argument("--libtriton-sha256", default=GPU_LIBTRITON_SHA256,
                   help="sha256 of the GPU machine's libtriton.so ('' = this machine's); default: PyPI's "
                        "triton 3.6.0 for CPython 3.12")
    b.add_argument("--keep-all", action="store_true", help="keep every IR file (default: json + cubin)")
    b.add_argument("--workload", default="gpu-check", help="gpu-check (every step below), tiny (one small call, "
                   "the tests'), or a comma list of the steps kernels, local, deberta, hf")
    r = sub.add_parser("replay", help="make a build's calls again (TRITON_CACHE_DIR: the cache they look up)")
    r.add_argument("--libtriton-sha256", default=GPU_LIBTRITON_SHA256)
    r.add_argument("--workload", default="gpu-check")
    i = sub.add_parser("install", help="extract a packed cache into a cache dir and relocate it")
    i.add_argument("tarball")
    i.add_argument("cache_dir")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.cmd == "keys":
        print(json.dumps(key_parts(args.libtriton_sha256), indent=1, sort_keys=True))
        return 0
    if args.cmd == "install":
        m = install(args.tarball, args.cache_dir)
        print(json.dumps(m, indent=1, sort_keys=True))
        return 0
    if args.cmd == "replay":
        _offline(args.libtriton_sha256 or None)
        _workload(args.workload)()
        return 0
    return build(args.out, args.libtriton_sha256 or None, args.keep_all, args.workload)


if __name__ == "__main__":
    sys.exit(main())
