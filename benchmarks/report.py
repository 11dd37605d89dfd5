"""Result files: the CSV (one row per case x method, environment in columns), PNG plots in the
manner of triton.testing.perf_report (one figure per panel and mode), and the terminal table."""
from __future__ import annotations

import csv
import math
import os
import re
from typing import Dict, Iterable, List, Sequence

from .presets import BASELINES

CASE_COLUMNS = ["preset", "panel", "x", "x_value", "mode", "method", "B", "H", "S", "D", "dtype", "fill",
                "causal", "dropout", "layout", "mean_len", "useful_frac"]
RESULT_COLUMNS = ["ms", "ms_q20", "ms_q80", "tflops", "peak_mem_mb", "mask_build_ms", "max_err", "tol",
                  "check"] + [f"speedup_vs_{b}" for b in BASELINES] + ["status", "timer"]
ENV_COLUMNS = ["device", "device_name", "cpu_threads", "torch", "cuda", "triton", "fused_attn", "date"]
COLUMNS = CASE_COLUMNS + RESULT_COLUMNS + ENV_COLUMNS
FLOAT_COLUMNS = {"useful_frac", "mean_len", "ms", "ms_q20", "ms_q80", "tflops", "peak_mem_mb", "mask_build_ms",
                 "max_err", "tol", "dropout"} | {f"speedup_vs_{b}" for b in BASELINES}


def add_speedups(rows: List[Dict]) -> None:
    """speedup_vs_<baseline> = baseline ms / this row's ms, both measured on the same case."""
    by_case: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r.get("ms") is not None:
            by_case.setdefault(_case_key(r), {})[r["method"]] = r["ms"]
    for r in rows:
        times = by_case.get(_case_key(r), {})
        for b in BASELINES:
            base = times.get(b)
            r[f"speedup_vs_{b}"] = base / r["ms"] if base is not None and r.get("ms") else None


def _case_key(r: Dict) -> tuple:
    return tuple(str(r[c]) for c in CASE_COLUMNS if c != "method")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: str, rows: Iterable[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in COLUMNS})


def read_csv(path: str) -> List[Dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for c in FLOAT_COLUMNS:
                r[c] = float(r[c]) if r.get(c) not in (None, "") else None
            rows.append(r)
    return rows


# -- plots

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", s).strip("_")


def _groups(rows: Sequence[Dict]) -> Dict[tuple, List[Dict]]:
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["panel"], r["mode"]), []).append(r)
    return groups


def _constant_params(rows: Sequence[Dict]) -> str:
    parts = []
    for c in ("B", "H", "S", "D", "dtype", "fill", "causal", "dropout", "layout"):
        vals = {str(r[c]) for r in rows}
        if len(vals) == 1 and c != rows[0]["x"]:
            parts.append(f"{c}={vals.pop()}")
    return " ".join(parts)


def plot(rows: Sequence[Dict], out_dir: str) -> List[str]:
    """One PNG per (panel, mode): ms (log scale) and TFLOP/s of useful work against the swept
    parameter, one line per method.  Returns the paths; [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for (preset, panel, mode), group in _groups(rows).items():
        ok = [r for r in group if r.get("ms") is not None]
        if not ok:
            continue
        xs = list(dict.fromkeys(str(r["x_value"]) for r in group))
        methods = list(dict.fromkeys(r["method"] for r in ok))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for m in methods:
            val = {str(r["x_value"]): r for r in ok if r["method"] == m}
            style = "-o" if m.startswith(("fused", "varlen")) else "--s"
            for ax, col in zip(axes, ("ms", "tflops")):
                ys = [val[x][col] if x in val and val[x][col] is not None else float("nan") for x in xs]
                ax.plot(range(len(xs)), ys, style, label=m, linewidth=2 if m.startswith(("fused", "varlen")) else 1.2)
        for ax, label in zip(axes, ("time per call [ms] (median)", "TFLOP/s of useful (unmasked) work")):
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels(xs)
            ax.set_xlabel(group[0]["x"])
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=8)
        env = group[0]
        fig.suptitle(f"{preset}: {panel}, {mode}   ({_constant_params(group)})", fontsize=10)
        fig.text(0.01, 0.01, f"{env.get('device_name', '')} | torch {env.get('torch', '')} | triton "
                 f"{env.get('triton', '')} | fused_attn {env.get('fused_attn', '')} | {env.get('date', '')}",
                 fontsize=7, color="gray")
        fig.tight_layout(rect=(0, 0.04, 1, 0.95))
        path = os.path.join(out_dir, _slug(f"{preset}_{panel}_{mode}") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- terminal summary

def _varying(rows: Sequence[Dict]) -> List[str]:
    return [c for c in ("B", "H", "S", "D", "dtype", "fill", "causal", "dropout")
            if len({str(r[c]) for r in rows}) > 1]


def summary(rows: Sequence[Dict]) -> str:
    """One line per case: every method's median ms, then the first fused engine's speed-up over
    each baseline (x > 1: fused is faster) and its correctness check."""
    if not rows:
        return "(no results)"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # the packed-batch API is the subject of the runs that time it: compared with the padded kernel too
    fused = next((m for m in methods if m.startswith("varlen")), None)
    padded = next((m for m in methods if m.startswith("fused")), None)
    bases = ([padded] if fused and padded else []) + [b for b in BASELINES if b in methods]
    fused = fused or padded
    vary = _varying(rows)
    cases: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        cases.setdefault(_case_key(r), {})[r["method"]] = r
    header = ["case", "mode"] + [f"{m} ms" for m in methods]
    if fused:
        header += [f"x {b}" for b in bases] + ["check"]
    table = [header]
    for per_method in cases.values():
        any_row = next(iter(per_method.values()))
        line = [" ".join(f"{c}={any_row[c]}" for c in vary) or "-", any_row["mode"]]
        for m in methods:
            r = per_method.get(m)
            line.append(f"{r['ms']:.4g}" if r and r.get("ms") is not None else ("skip" if r and str(
                r.get("status", "")).startswith("skipped") else "err" if r else ""))
        if fused:
            r = per_method.get(fused, {})
            for b in bases:
                base_ms = per_method.get(b, {}).get("ms")
                line.append(f"{base_ms / r['ms']:.2f}" if base_ms is not None and r.get("ms") else "")
            line.append(str(r.get("check") or ""))
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in table]
    if fused:
        lines.append(f"(x <baseline>: {fused} speed-up over it; per-engine speed-ups, TFLOP/s and memory in the CSV)")
    return "\n".join(lines)


def problems(rows: Sequence[Dict]) -> List[str]:
    """Fused rows that failed their check or errored (the CLI exits non-zero on these)."""
    out = []
    for r in rows:
        if not r["method"].startswith(("fused", "varlen")):
            continue
        if r.get("check") == "FAIL":
            out.append(f"{r['method']} {r['mode']} B={r['B']} S={r['S']} D={r['D']} {r['dtype']} fill={r['fill']}"
                       f" causal={r['causal']}: max error {r['max_err']:.3g} > tolerance {r['tol']:.3g}")
        elif str(r.get("status", "")).startswith("error"):
            out.append(f"{r['method']} {r['mode']} B={r['B']} S={r['S']} D={r['D']}: {r['status']}")
    return out


def csv_path(out_dir: str, preset: str) -> str:
    return os.path.join(out_dir, f"{preset}.csv")
