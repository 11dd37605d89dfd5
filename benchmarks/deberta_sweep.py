"""The DeBERTa-v3 sweep (issue 22): HF eager vs fused_attn padded (``patch``) vs padding-free
(``patch(padding_free=True)``), training step and inference, configs xsmall / small / base
(benchmarks/bench_deberta.py's CONFIGS), S in 128 .. 4096, lengths U[1, S], with step time and
peak memory.

One fresh process per cell (config, S, phase), so cells do not pollute each other.  In it the three
models are built from one seed (same weights), then run ``--warmup`` steps each and ``--iters``
timed steps in turn (hf, fused, padding_free, hf, ...: on a shared machine the load drifts, and
interleaving spreads it over every method alike).  Before each step the process's peak RSS is reset
(/proc/self/clear_refs), so ``step_peak_mib`` = VmHWM - RSS before the step is what that method's
step needed (activations, gradients, temporaries; the largest over the timed steps);
MALLOC_MMAP_THRESHOLD_ is lowered so that freed buffers go back to the OS.

B per S: ``B = max(1, --tokens // S)`` (stated in the CSV).  HF is not run where its estimated step
peak exceeds ``--hf-limit-gib``: the estimate is bytes per element of one [B, H, S, S] tensor
(times the layers when training: HF keeps the softmax output, the dropout mask and the dropped
probabilities of every layer for backward), HF_BYTES below, measured on this machine by the
cells that do run (the CSV has both, ``hf_est_mib`` next to the measured ``step_peak_mib``).  Such a
cell is written with ``status=not run (memory)`` and the estimate.

Time: the cells run in the order given; once ``--budget-min`` minutes are spent, the rest are
written as ``not run (time budget)``; a cell that runs past the rest of the budget is stopped.
The CSV is rewritten after every cell, and ``--resume`` skips the cells it already has, so a sweep
can run in pieces (e.g. one ``--configs`` at a time into one file).

    python -m benchmarks.deberta_sweep --out benchmarks/results/cpu_DATE_deberta_sweep.csv
    python -m benchmarks.deberta_sweep --quick --out /tmp/quick.csv      # xsmall, S 128 and 512, 1024 tokens
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.bench_deberta import CONFIGS, METHODS, build, prepare
from benchmarks.bench_hf import bert_batch, step_fn, versions

# HF's step peak in bytes per element of one [B, H, S, S] fp32 tensor ("train": per element and
# layer).  From this machine's runs: xsmall B=2 S=2048 train 5487 MiB over 6 layers x 50.3 M
# elements (benchmarks/results/cpu_2026-12-06_deberta_xsmall_memory.csv) -> 19.1; infer: see the
# sweep CSV's hf_est_mib against step_peak_mib.
HF_BYTES = {"train": 19.5, "infer": 24.0}
VOCAB = 128100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_estimate_mib(config: str, B: int, S: int, phase: str) -> float:
    c = CONFIGS[config]
    elems = B * c["num_attention_heads"] * S * S
    layers = c["num_hidden_layers"] if phase == "train" else 1
    return HF_BYTES[phase] * elems * layers / 2**20


def batch_size(S: int, tokens: int) -> int:
    return max(1, tokens // S)


# --------------------------------------------------------------------------------------------
# the cell, in its own process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # VmHWM := the current RSS


def run_cell(config: str, S: int, phase: str, B: int, methods, warmup: int, iters: int, seed: int,
             backend: str, lengths: str) -> dict:
    """{method: {"ms": [..], "step_peak_mib": x}} of one cell, methods interleaved."""
    import copy
    cpu = torch.device("cpu")
    base = build(config, seed)
    batch, _ = bert_batch(B, S, VOCAB, seed, cpu, lengths)
    fns = {m: step_fn(prepare(copy.deepcopy(base), m, backend), batch, phase, cpu) for m in methods}
    del base
    res = {m: {"ms": [], "step_peak_mib": 0.0} for m in methods}
    for i in range(warmup + iters):
        for m, fn in fns.items():
            before = _status_kib("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            peak = (_status_kib("VmHWM") - before) / 1024
            if i >= warmup:                            # the optimizer state exists from the first step on
                res[m]["ms"].append(round(ms, 1))
                res[m]["step_peak_mib"] = round(max(res[m]["step_peak_mib"], peak), 1)
    return res


def _child(args) -> None:
    config, S, phase = args.cell.split(",")
    S = int(S)
    res = run_cell(config, S, phase, batch_size(S, args.tokens), args.methods.split(","), args.warmup,
                   args.iters, args.seed, args.backend, args.lengths)
    print(json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# the driver


def _cell_process(config, S, phase, methods, args, timeout):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
    cmd = [sys.executable, "-m", "benchmarks.deberta_sweep", "--cell", f"{config},{S},{phase}",
           "--methods", ",".join(methods), "--tokens", str(args.tokens), "--warmup", str(args.warmup),
           "--iters", str(args.iters), "--seed", str(args.seed), "--backend", args.backend,
           "--lengths", args.lengths, "--threads", str(torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, "not run (time budget)"
    if out.returncode != 0:
        return None, "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:200]
    return json.loads(out.stdout.strip().splitlines()[-1]), "ok"


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def sweep(args) -> list:
    tv, trv, hv = versions()
    rows, done = [], set()
    if args.resume and os.path.exists(args.out):
        with open(args.out, newline="") as f:
            rows = [r for r in csv.DictReader(f) if not r["status"].startswith("not run (time")]
        done = {(r["model"], int(r["seqlen"]), r["phase"]) for r in rows}
    methods = args.methods.split(",")
    start = time.time()
    for config in args.configs.split(","):
        for S in (int(s) for s in args.seqlens.split(",")):
            B = batch_size(S, args.tokens)
            for phase in args.phases.split(","):
                model = f"deberta-v3-{config}"
                if (model, S, phase) in done:
                    continue
                est = hf_estimate_mib(config, B, S, phase)
                run = [m for m in methods if not (m == "hf" and est > args.hf_limit_gib * 1024)]
                left = args.budget_min * 60 - (time.time() - start)
                load0 = os.getloadavg()[0]
                t0 = time.time()
                res, status = (None, "not run (time budget)") if left < 5 else \
                    _cell_process(config, S, phase, run, args, left)
                load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
                hf_ms = _median(res["hf"]["ms"]) if res and "hf" in res else None
                hf_mem = res["hf"]["step_peak_mib"] if res and "hf" in res else None
                for m in methods:
                    row = dict(date=datetime.date.today().isoformat(), model=model, phase=phase, method=m,
                               batch=B, seqlen=S, tokens=B * S, dtype="fp32", threads=torch.get_num_threads(),
                               warmup=args.warmup, iters=args.iters, load=load, status=status, ms="", ms_all="",
                               speedup_vs_hf="", step_peak_mib="", mem_vs_hf="",
                               hf_est_mib=round(est) if m == "hf" else "", cell_s=round(time.time() - t0),
                               torch=tv, transformers=hv)
                    if m not in run:
                        row["status"] = f"not run (memory: est. {est / 1024:.1f} GiB > {args.hf_limit_gib:g})"
                    elif res is not None:
                        r = res[m]
                        ms = _median(r["ms"])
                        row.update(ms=round(ms, 1), ms_all=" ".join(str(x) for x in r["ms"]),
                                   step_peak_mib=r["step_peak_mib"])
                        if hf_ms:
                            row["speedup_vs_hf"] = round(hf_ms / ms, 2)
                            row["mem_vs_hf"] = round(r["step_peak_mib"] / hf_mem, 3) if hf_mem else ""
                    rows.append(row)
                    print(", ".join(f"{k}={row[k]}" for k in ("model", "phase", "method", "batch", "seqlen",
                                                              "ms", "speedup_vs_hf", "step_peak_mib",
                                                              "mem_vs_hf", "load", "status")), flush=True)
                print(f"  ({time.time() - t0:.0f} s; {(time.time() - start) / 60:.1f} min of {args.budget_min:g})",
                      flush=True)
                _write(args.out, rows)
    return rows


def _write(path: str, rows: list) -> None:
    if not path or not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="xsmall,small,base")
    ap.add_argument("--seqlens", default="128,512,1024,2048,4096")
    ap.add_argument("--phases", default="infer,train")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch: B = max(1, tokens // S)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--budget-min", type=float, default=45.0, help="minutes for the whole sweep")
    ap.add_argument("--hf-limit-gib", type=float, default=8.0, help="HF is not run above this estimated step peak")
    ap.add_argument("--backend", default="cpu", help="fused_attn engine of the fused methods")
    ap.add_argument("--lengths", choices=("stratified", "random"), default="stratified")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="xsmall, S 128 and 512, 1024 tokens, 1 timed step")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cell:
        return _child(args)
    if args.quick:
        args.configs, args.seqlens, args.tokens, args.iters = "xsmall", "128,512", 1024, 1
    return sweep(args)


if __name__ == "__main__":
    main()
