"""Local attention (window_size) on the CPU kernel: the windowed call against the same call with no
window, against the call with HF's dense sliding-window mask (what a ModernBERT local layer passes
without the native window: an additive [B, 1, S, S] mask), torch SDPA with that mask, and
FlexAttention's sliding-window BlockMask (torch.compile'd flex_attention) where it runs.

    .venv/bin/python -m benchmarks.bench_window [--seq 4096 --heads 12 --dim 64 --window 64 --reps 5]

Calls are timed round-robin (one call of each method per round, median over rounds), so a load
change on a shared machine hits every method alike; the CSV records the load average before and
after, the CPU model and the thread count.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fused_attn


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hf_sliding_mask(S: int, left: int, right: int, dtype) -> torch.Tensor:
    """HF's dense sliding-window mask as ModernBERT builds it: additive [1, 1, S, S], 0 inside the
    band, finfo.min outside."""
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    inside = (j - i >= -left) & (j - i <= right)
    return torch.zeros(S, S, dtype=dtype).masked_fill(~inside, torch.finfo(dtype).min)[None, None]


def flex_method(q, k, v, left: int, right: int):
    """FlexAttention with a sliding-window BlockMask, compiled; (fn, None) or (None, why not)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:  # noqa: BLE001
        return None, f"flex_attention not importable: {e}"

    def window(b, h, qi, kv):
        return (kv - qi >= -left) & (kv - qi <= right)

    try:
        S = q.shape[2]
        bm = create_block_mask(window, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        out = flex(q, k, v, block_mask=bm)
        compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - reported in the CSV
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(f"flex: compiled in {compile_s:.1f} s")
    return (lambda: flex(q, k, v, block_mask=bm)), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=64, help="left = right = WINDOW")
    ap.add_argument("--reps", type=int, default=5, help="rounds (one call of each method per round)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/cpu_<date>_window.csv)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    B, H, S, D, w = args.batch, args.heads, args.seq, args.dim, args.window
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    mask = hf_sliding_mask(S, w, w, torch.float32)
    load_before = os.getloadavg()

    fused_attn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="cpu")   # builds the extension
    t0 = time.perf_counter()
    red = fused_attn.reduce_mask(mask, B, H, S, S)
    red.block_map(64, 64, False)                    # what the CPU kernel asks for
    reduce_ms = (time.perf_counter() - t0) * 1e3    # HF builds a new mask per forward: this per forward

    methods = {
        "fused_window": lambda: fused_attn.attention(q, k, v, window_size=(w, w), backend="cpu"),
        "fused_no_window": lambda: fused_attn.attention(q, k, v, backend="cpu"),
        "fused_hf_dense_mask": lambda: fused_attn.attention(q, k, v, red, backend="cpu"),
        "sdpa_hf_dense_mask": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    notes = {"fused_hf_dense_mask": f"mask reduced once ({reduce_ms:.0f} ms, not in ms)"}
    # correctness of what is timed: the windowed kernel equals SDPA with the dense band mask
    want = methods["sdpa_hf_dense_mask"]()
    errs = {"fused_window": (methods["fused_window"]() - want).abs().max().item(),
            "fused_hf_dense_mask": (methods["fused_hf_dense_mask"]() - want).abs().max().item()}
    if not args.no_flex:
        fn, res = flex_method(q, k, v, w, w)
        if fn is None:
            notes["flex_sliding_window"] = f"not run: {res}"
        else:
            methods["flex_sliding_window"] = fn
            errs["flex_sliding_window"] = (res - want).abs().max().item()

    times = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    load_after = os.getloadavg()

    base = statistics.median(times["fused_window"])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = Path(args.out or f"benchmarks/results/cpu_{date[:10]}_window.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["method", "B", "H", "S", "D", "window", "dtype", "mode", "ms_median", "ms_min", "ms_max", "rounds",
            "fused_window_speedup", "max_abs_err_vs_sdpa_mask", "note", "cpu", "threads", "load_before", "load_after",
            "shared_machine", "torch", "fused_attn", "date"]
    with out.open("w", newline="") as f:
        wr = csv.DictWriter(f, cols)
        wr.writeheader()
        for name, ts in times.items():
            med = statistics.median(ts)
            wr.writerow(dict(method=name, B=B, H=H, S=S, D=D, window=f"({w}, {w})", dtype="fp32", mode="fwd",
                             ms_median=f"{med:.1f}", ms_min=f"{min(ts):.1f}", ms_max=f"{max(ts):.1f}",
                             rounds=len(ts), fused_window_speedup=f"{med / base:.2f}",
                             max_abs_err_vs_sdpa_mask=f"{errs[name]:.2e}" if name in errs else "",
                             note=notes.get(name, ""), cpu=cpu_model(), threads=torch.get_num_threads(),
                             load_before="/".join(f"{x:.1f}" for x in load_before),
                             load_after="/".join(f"{x:.1f}" for x in load_after), shared_machine="yes",
                             torch=torch.__version__, fused_attn=fused_attn.__version__, date=date))
        for name, note in notes.items():
            if name not in times:
                wr.writerow(dict(method=name, B=B, H=H, S=S, D=D, window=f"({w}, {w})", dtype="fp32", mode="fwd",
                                 note=note, cpu=cpu_model(), threads=torch.get_num_threads(), shared_machine="yes",
                                 torch=torch.__version__, fused_attn=fused_attn.__version__, date=date))
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med:9.1f} ms  ({med / base:5.1f}x the windowed call)  err {errs.get(name, float('nan')):.1e}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    print(f"load {load_before} -> {load_after}; wrote {out}")


if __name__ == "__main__":
    main()
