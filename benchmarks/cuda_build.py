"""The optimised build of the CUDA kernels, timed (issue 24): each translation unit of csrc/cuda/
compiled for sm_90 with the extension's own nvcc flags (fused_attn._build.nvcc_flags(), -O3), as
ninja compiles them: in parallel, --jobs at a time.  No GPU needed, only nvcc.

    python -m benchmarks.cuda_build --jobs 2 --out benchmarks/results/cpu_<date>_cuda_build.csv
    python -m benchmarks.cuda_build --device-o0          # the quick check of tests/test_cuda_sources.py

One CSV row per file: wall and CPU seconds (user + sys of nvcc and its children: on a shared machine
the CPU time says more than the wall time), and one row per kernel with ptxas's registers, spill
stores / loads and stack frame (-Xptxas -v).  The load average before and after goes into every row.
tests/test_cuda_sources.py compiles the same files with the same command, device code at -O0
(--device-o0): the suite stays short, and -O3 is this script's job (docs/build.md).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

from fused_attn import _build

ARCH = "sm_90"
DEVICE_O0 = ["-Xcicc", "-O0", "-Xptxas", "-O0"]


def cuda_sources() -> List[str]:
    """The extension's CUDA translation units (what _build.sources lists from csrc/cuda/)."""
    return [s for s in _build.sources(with_cuda=True) if s.endswith(".cu")]


def include_dirs(scratch: Path) -> List[str]:
    """csrc/, torch's headers and, for a CPU build of torch, a stand-in for the one header CMake
    generates in CUDA builds (c10/cuda/impl/cuda_cmake_macros.h; it only marks c10_cuda as shared)."""
    from torch.utils import cpp_extension

    dirs = [str(_build.source_dir())] + cpp_extension.include_paths()
    if not os.path.isfile(os.path.join(dirs[1], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        stub = scratch / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(scratch / "stub"))
    return dirs


def nvcc_command(nvcc: str, source: str, out: str, includes: List[str], device_o0: bool = False,
                 verbose_ptxas: bool = False) -> List[str]:
    """Compile one .cu to an object file for sm_90 with the extension's flags."""
    arch = ARCH.split("_")[1]
    return [nvcc, "-c", source, "-o", out, "-std=c++20", "-gencode", f"arch=compute_{arch},code={ARCH}",
            *_build.nvcc_flags(), *(DEVICE_O0 if device_o0 else []), *(["-Xptxas", "-v"] if verbose_ptxas else []),
            *[f"-I{p}" for p in includes]]


_FUNC = re.compile(r"Compiling entry function '(\S+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_usage(log: str) -> List[Dict[str, object]]:
    """Per kernel (mangled name): registers, stack frame, spill stores and loads from ptxas -v."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = {"kernel": m.group(1)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            cur.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return rows


def compile_one(nvcc: str, source: str, scratch: Path, includes: List[str], device_o0: bool) -> Dict[str, object]:
    out = scratch / (Path(source).stem + ".o")
    cmd = nvcc_command(nvcc, source, str(out), includes, device_o0=device_o0, verbose_ptxas=True)
    # CPU time of this nvcc and its children: from /usr/bin/time when present, else from this process'
    # children totals (exact only with --jobs 1).
    timer = "/usr/bin/time"
    t0 = time.perf_counter()
    if os.path.exists(timer):
        res = subprocess.run([timer, "-f", "CPU_SECONDS %U %S", *cmd], capture_output=True, text=True)
        m = re.search(r"CPU_SECONDS ([\d.]+) ([\d.]+)", res.stderr)
        cpu = float(m.group(1)) + float(m.group(2)) if m else None
    else:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = subprocess.run(cmd, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall = time.perf_counter() - t0
    return {"source": Path(source).name, "rc": res.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1) if cpu is not None else None, "log": res.stdout + res.stderr,
            "kernels": ptxas_usage(res.stdout + res.stderr)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="files compiled at once (ninja: all cores)")
    ap.add_argument("--device-o0", action="store_true", help="device code at -O0 (the test suite's quick check)")
    ap.add_argument("--sources", nargs="*", help="file names of csrc/cuda/ (default: all)")
    ap.add_argument("--out", help="CSV to write (default: print only)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _cuda_emu import cuda_file   # finds nvcc without a CUDA build of torch

    nvcc = cuda_file(os.path.join("bin", "nvcc"))
    if nvcc is None:
        print("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)", file=sys.stderr)
        return 2
    sources = cuda_sources()
    if args.sources:
        sources = [s for s in sources if Path(s).name in set(args.sources)]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    import torch

    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        includes = include_dirs(scratch)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda s: compile_one(nvcc, s, scratch, includes, args.device_o0), sources))
    total_wall = time.perf_counter() - t0
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())

    common = {"date": datetime.date.today().isoformat(), "host_cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "jobs": args.jobs, "nvcc": version, "torch": torch.__version__,
              "arch": ARCH, "device_opt": "O0" if args.device_o0 else "O3", "load_before": load0, "load_after": load1}
    rows = []
    for r in results:
        rows.append({**common, "row": "file", "source": r["source"], "rc": r["rc"], "wall_s": r["wall_s"],
                     "cpu_s": r["cpu_s"]})
        for k in r["kernels"]:
            rows.append({**common, "row": "kernel", "source": r["source"], **k})
    rows.append({**common, "row": "total", "wall_s": round(total_wall, 1),
                 "cpu_s": round(sum(r["cpu_s"] or 0 for r in results), 1)})
    fields = list(common) + ["row", "source", "rc", "wall_s", "cpu_s", "kernel", "registers", "stack_bytes",
                             "spill_stores", "spill_loads"]
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    for r in results:
        spills = sum(k.get("spill_stores", 0) + k.get("spill_loads", 0) for k in r["kernels"])
        regs = max((k.get("registers", 0) for k in r["kernels"]), default=0)
        print(f"{r['source']:22s} rc={r['rc']} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']} s  "
              f"kernels {len(r['kernels'])}  max registers {regs}  spill bytes {spills}")
        if r["rc"] != 0:
            print(r["log"][-3000:], file=sys.stderr)
    print(f"all {len(results)} files, {args.jobs} at a time: wall {total_wall:.1f} s, "
          f"cpu {sum(r['cpu_s'] or 0 for r in results):.1f} s (load average {load0} -> {load1})")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
