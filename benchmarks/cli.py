"""``python -m benchmarks``: run a preset, write CSV + PNG plots, print a summary table.

    python -m benchmarks --list
    python -m benchmarks --preset fwd-target --out results/h100
    python -m benchmarks --preset cpu-small --out /tmp/bench
    python -m benchmarks --plot results/h100/fwd-target.csv      # redraw PNGs from a CSV
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch

from . import report
from .presets import METHODS, MODES, PRESETS, Case, Preset, select
from .timing import bench, environment, peak_memory_mb, pick_device, sync
from .workloads import (FUSED_ENGINES, Inputs, Skip, build_method, dtype_name, flops, fused_methods,
                        make_inputs, max_error, oracle, resolve_dtype, runners, tolerance)


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="what to run (see --list)")
    ap.add_argument("--list", action="store_true", help="list the presets and exit")
    ap.add_argument("--out", default="out/bench",
                    help="output folder for <preset>.csv and the PNGs (default out/bench, git-ignored)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--modes", help=f"comma list replacing the preset's modes ({', '.join(MODES)})")
    ap.add_argument("--methods", help="comma list replacing the preset's methods: fused (every available "
                    "engine), fused_triton, fused_cuda, fused_cpu, " + ", ".join(METHODS[1:]))
    ap.add_argument("--cases", help="keep the cases whose fields match KEY=VALUE[,KEY=VALUE...] "
                    "(e.g. S=512,fill=uniform,D=64), after --modes")
    ap.add_argument("--layout", default="bshd", choices=("bshd", "bhsd"),
                    help="bshd: q/k/v are HF's transposed [B,S,H,D] views (default); bhsd: contiguous")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU: torch intra-op threads (default: torch's)")
    ap.add_argument("--min-time", type=float, help="CPU: seconds per measurement (default: the preset's)")
    ap.add_argument("--warmup-ms", type=int, default=25, help="GPU: do_bench warm-up (ms)")
    ap.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench measurement time (ms)")
    ap.add_argument("--no-check", action="store_true", help="skip the check against fused_attn.reference")
    ap.add_argument("--no-plot", action="store_true", help="write the CSV only")
    ap.add_argument("--force", action="store_true", help="run a GPU-sized preset on CPU anyway")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--plot", nargs="+", metavar="CSV", help="only redraw the PNGs of these CSV files into --out")
    return ap.parse_args(argv)


class _Progress:
    """tqdm on a terminal when installed, else one plain line per measurement (stderr): a bar
    redrawn into a log file or CI output would flood it."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.n, self.total, self.quiet, self.bar = 0, total, quiet, None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def step(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        elif not self.quiet:
            print(f"[{self.n:>{len(str(self.total))}}/{self.total}] {what}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _methods_for(case: Case, requested: Tuple[str, ...], explicit: bool, device: torch.device,
                 notes: Dict[str, str]) -> List[str]:
    """Concrete method names for a case; device-wide skips become one note, not rows."""
    probe = torch.empty(1, 1, 1, case.D, device=device, dtype=resolve_dtype(case.dtype, device))
    out = []
    for name in requested:
        if name in ("fused", "varlen"):
            for m, why in fused_methods(probe, name):
                if why:
                    notes[m] = why
                else:
                    out.append(m)
        elif name.split("_", 1)[0] in ("fused", "varlen") and name.split("_", 1)[-1] in FUSED_ENGINES:
            out.append(name)
        elif name == "reference" and device.type == "cuda" and not explicit:
            notes[name] = "timed on CPU only (ask with --methods ...,reference)"
        elif name in ("flex", "flex_doc") and device.type != "cuda":
            notes[name] = "FlexAttention is only benchmarked on CUDA"
        elif name in METHODS:
            out.append(name)
        else:
            raise SystemExit(f"--methods: unknown method {name!r}")
    return out


def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:240]}"


def _case_row(preset: str, case: Case, inp: Inputs, layout: str, method: str, env: Dict) -> Dict:
    S = case.S
    return dict(preset=preset, panel=case.panel, x=case.x, x_value=case.x_value, mode=case.mode, method=method,
                B=case.B, H=case.H, S=S, D=case.D, dtype=dtype_name(inp.dtype), fill=case.fill, causal=case.causal,
                dropout=float(case.dropout), layout=layout, mean_len=float(inp.lengths.float().mean()),
                useful_frac=inp.pairs / (case.B * case.H * S * S), status="ok",
                timer="triton.testing.do_bench" if inp.device.type == "cuda" else "torch.utils.benchmark",
                device=inp.device.type, **env)


def _measure(row: Dict, name: str, inp: Inputs, args, min_time: float, checks: Dict, progress: _Progress) -> None:
    case, dev = inp.case, inp.device
    try:
        m = build_method(name, inp)
        run, full = runners(m, inp, case.mode)
        run()                            # compile / JIT / autotune outside the timing; errors surface here
        sync(dev)
        ms, lo, hi = bench(run, dev, min_time=min_time, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        mem = peak_memory_mb(full, dev)
        del run, full
    except Skip as e:
        row["status"] = f"skipped: {e}"
        return
    except Exception as e:  # noqa: BLE001 - one failing method must not stop the sweep
        row["status"] = "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else f"error: {_short(e)}"
        progress.write(f"{name} {case}: {row['status']}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return
    row.update(ms=ms, ms_q20=lo, ms_q80=hi, tflops=flops(case, inp.pairs) / ms / 1e9, peak_mem_mb=mem,
               mask_build_ms=m.build_ms)
    if args.no_check or case.dropout > 0.0:
        return
    if not m.masked:
        row["check"] = "n/a"
        return
    key = (case.data_key(), name)
    if key not in checks:
        if "ref" not in checks or checks["ref"][0] != case.data_key():
            ref = oracle(inp)
            checks["ref"] = (case.data_key(), ref, tolerance(inp, ref))
        _, ref, tol = checks["ref"]
        q, k, v, _, _ = m.args(inp)
        with torch.no_grad():
            out = m.fn(q, k, v)
            err = max_error(*m.packed.to_padded_rows(out, ref)) if m.packed is not None else max_error(out, ref)
        checks[key] = (err, tol, "PASS" if err <= tol else "FAIL")   # NaN compares False: FAIL
    row["max_err"], row["tol"], row["check"] = checks[key]


def run_preset(preset: Preset, args, device: torch.device) -> Tuple[List[Dict], Dict[str, str]]:
    cases = list(preset.cases)
    if args.modes:                       # replaces the preset's modes: every data case x each mode
        modes = args.modes.split(",")
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise SystemExit(f"--modes: unknown mode(s) {bad}; expected {', '.join(MODES)}")
        base = list(dict.fromkeys(replace(c, mode="fwd") for c in cases))
        cases = [replace(c, mode=m) for m in modes for c in base]
    if getattr(args, "cases", None):
        try:
            cases = select(cases, args.cases)
        except ValueError as e:
            raise SystemExit(str(e))
        if not cases:
            raise SystemExit(f"--cases {args.cases}: no case of preset {preset.name!r} matches")
    requested = tuple(args.methods.split(",")) if args.methods else preset.methods
    env = environment(device)
    print(f"fused_attn benchmarks: preset {preset.name!r} on {env['device_name']} ({device.type}); torch "
          f"{env['torch']}, triton {env['triton'] or '-'}, fused_attn {env['fused_attn']}; {len(cases)} cases",
          flush=True)
    notes: Dict[str, str] = {}
    t0 = time.perf_counter()             # probing the C++ engines builds the extension on first use
    plan = [(c, _methods_for(c, requested, bool(args.methods), device, notes)) for c in cases]
    if time.perf_counter() - t0 > 5:
        print(f"  (probing the engines took {time.perf_counter() - t0:.0f} s: first use of the C++ extension)")
    min_time = args.min_time if args.min_time is not None else preset.cpu_min_time
    os.makedirs(args.out, exist_ok=True)
    path = report.csv_path(args.out, preset.name)
    for m, why in notes.items():
        print(f"  {m}: not run ({why[:200] + ' ...' if len(why) > 200 else why})")
    progress = _Progress(sum(len(ms) for _, ms in plan), preset.name, args.quiet)
    rows: List[Dict] = []
    checks: Dict = {}
    try:
        for case, methods in plan:
            inp = make_inputs(case, device, args.layout, args.seed)
            for name in methods:
                row = _case_row(preset.name, case, inp, args.layout, name, env)
                _measure(row, name, inp, args, min_time, checks, progress)
                rows.append(row)
                progress.step(f"{case.panel} {case.x}={case.x_value} {case.mode} {name}")
            del inp
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report.add_speedups(rows)
            report.write_csv(path, rows)          # rewritten after every case: partial runs keep results
    finally:
        progress.close()
    return rows, notes


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    if args.list or (not args.preset and not args.plot):
        print("presets (python -m benchmarks --preset NAME --out DIR):")
        for p in PRESETS.values():
            print(f"  {p.name:<13} [{'GPU' if p.device == 'cuda' else 'CPU/GPU'}, {len(p.cases)} cases] {p.help}")
        return 0 if args.list else 2
    if args.plot:
        os.makedirs(args.out, exist_ok=True)
        rows = [r for path in args.plot for r in report.read_csv(path)]
        paths = report.plot(rows, args.out)
        print("\n".join(paths) if paths else "matplotlib is not installed: no plots")
        return 0 if paths else 1
    if args.preset not in PRESETS:
        print(f"--preset: unknown preset {args.preset!r}; one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    device = pick_device(args.device, args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if preset.device == "cuda" and device.type != "cuda" and not args.force:
        print(f"preset {preset.name!r} has GPU sizes; on CPU use cpu-small, cpu-target, demo or tiny (or --force)",
              file=sys.stderr)
        return 2
    rows, _ = run_preset(preset, args, device)
    csv_file = report.csv_path(args.out, preset.name)
    pngs = [] if args.no_plot else report.plot(rows, args.out)
    print(report.summary(rows))
    print(f"wrote {csv_file}" + (f" and {len(pngs)} PNG(s) in {args.out}" if pngs else
                                 "" if args.no_plot else " (no PNG: matplotlib is not installed; "
                                 "redraw later with --plot)"))
    bad = report.problems(rows)
    for line in bad:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if bad else 0
