"""The CPU kernel's query-tile height under a local window: calls with 64-, 32- and 16-row query tiles
(``FUSED_ATTN_CPU_QUERY_ROWS``, read per call), the default rule (``query_tile_rows`` in
csrc/cpu_attn.h), and optionally the kernel of another source tree (``--old-src``: e.g. ``git
archive <commit>`` unpacked), each in its own worker process with its own extension build.

Every round runs each method once per case, in turn (one process works at a time), so a load
change on the shared machine hits every method alike; the CSV records the load average around each
case, the thread count and the versions.  Besides wall time it records the worker's CPU time
(process_time: all its threads; preemption by other jobs does not count), the steadier of the two
on a loaded machine.

    .venv/bin/python -m benchmarks.cpu_query_tiles --out benchmarks/results/cpu_DATE_query_tiles.csv \\
        [--old-src /tmp/old_src] [--seq 1024,2048] [--windows 64,-1] [--threads 1,2] [--reps 7]

Shapes: B=1, H=6 heads of D=64 (ModernBERT-small's attention), fp32, window (w, w) (w = -1: no
window, the dense path), modes fwd and fwd+bwd (backward from a fixed grad_out).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker():
    """Reads one JSON case per line on stdin, runs it once, answers {"ms": ...} on stdout."""
    import torch

    import fused_attn
    cache = {}
    for line in sys.stdin:
        c = json.loads(line)
        torch.set_num_threads(c["threads"])
        if c["rows"]:
            os.environ["FUSED_ATTN_CPU_QUERY_ROWS"] = str(c["rows"])
        else:
            os.environ.pop("FUSED_ATTN_CPU_QUERY_ROWS", None)
        key = (c["S"], c["H"], c["D"])
        if key not in cache:
            g = torch.Generator().manual_seed(0)
            cache = {key: [torch.randn(1, c["H"], c["S"], c["D"], generator=g) for _ in range(4)]}
        q, k, v, go = cache[key]
        w = (c["window"], c["window"])
        if c["mode"] != "fwd":
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        t0, c0 = time.perf_counter(), time.process_time()
        out = fused_attn.attention(q, k, v, window_size=w, backend="cpu")
        if c["mode"] != "fwd":
            out.backward(go)
        ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        # a checksum so that the methods can be compared for the same case
        print(json.dumps({"ms": ms, "cpu_ms": cpu_ms, "sum": float(out.detach().double().abs().sum())}), flush=True)


def start(src: str, ext_dir: str):
    env = dict(os.environ, PYTHONPATH=src, TORCH_EXTENSIONS_DIR=ext_dir)
    env.pop("FUSED_ATTN_CPU_QUERY_ROWS", None)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=src)


def ask(proc, case: dict) -> dict:
    proc.stdin.write(json.dumps(case) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("a worker died (see its stderr above)")
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    ap.add_argument("--old-src", help="a source tree whose fused_attn is the 'old' method")
    ap.add_argument("--seq", default="1024,2048")
    ap.add_argument("--windows", default="64", help="w of window (w, w); -1: no window")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--rows", default="64,32,16,rule", help="query-tile heights forced on the new kernel")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    if args.worker:
        return worker()
    if not args.out:
        ap.error("--out is required")
    import torch

    import fused_attn
    sys.path.insert(0, HERE)
    from timing import _cpu_name
    new_src = os.path.dirname(HERE)
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(new_src, ".ext-cache"))
    procs = {}
    for r in args.rows.split(","):
        procs[f"rows{r}" if r != "rule" else "new_rule"] = (start(new_src, ext), None if r == "rule" else int(r))
    if args.old_src:
        procs["old"] = (start(os.path.abspath(args.old_src), os.path.join(os.path.abspath(args.old_src), ".ext-cache")),
                        None)
    meta = dict(cpu=_cpu_name(), torch=torch.__version__, fused_attn=fused_attn.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                shared_machine="yes", B=1, H=args.heads, D=args.dim, dtype="fp32")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for S in (int(s) for s in args.seq.split(",")):
            for w in (int(x) for x in args.windows.split(",")):
                for mode in args.modes.split(","):
                    case = dict(S=S, H=args.heads, D=args.dim, window=w, mode=mode, threads=threads)
                    load0 = os.getloadavg()
                    times = {m: [] for m in procs}
                    cpu_times = {m: [] for m in procs}
                    sums = {}
                    for rep in range(args.reps + 1):          # round 0: warm-up (and the first build)
                        for m, (p, r) in procs.items():
                            res = ask(p, dict(case, rows=r))
                            sums[m] = res["sum"]
                            if rep:
                                times[m].append(res["ms"])
                                cpu_times[m].append(res["cpu_ms"])
                    load1 = os.getloadavg()
                    first = "old" if "old" in procs else next(iter(procs))
                    base, cpu_base = statistics.median(times[first]), statistics.median(cpu_times[first])
                    for m, ts in times.items():
                        med, cpu_med = statistics.median(ts), statistics.median(cpu_times[m])
                        row = dict(meta, method=m, S=S, window=f"({w}, {w})", mode=mode, threads=threads,
                                   ms_median=round(med, 2), ms_min=round(min(ts), 2), ms_max=round(max(ts), 2),
                                   rounds=len(ts), speedup_vs_first=round(base / med, 3),
                                   cpu_ms_median=round(cpu_med, 2), cpu_speedup_vs_first=round(cpu_base / cpu_med, 3),
                                   rel_checksum_diff=f"{abs(sums[m] - sums[next(iter(sums))]) / sums[m]:.1e}",
                                   load_before="/".join(f"{x:.1f}" for x in load0),
                                   load_after="/".join(f"{x:.1f}" for x in load1))
                        rows.append(row)
                        print(f"threads {threads} S {S:5d} w {w:4d} {mode:8s} {m:9s} {med:9.2f} ms "
                              f"x{row['speedup_vs_first']:.3f}  cpu {cpu_med:9.2f} ms x{row['cpu_speedup_vs_first']:.3f}  "
                              f"load {row['load_before']}", flush=True)
                    with open(args.out, "w", newline="") as f:
                        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                        wr.writeheader()
                        wr.writerows(rows)
    for p, _ in procs.values():
        p.stdin.close()
        p.wait()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
