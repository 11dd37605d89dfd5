"""Where the time of a modern encoder's forward goes: torch.profiler's per-op self CPU time for
each mode of bench_modern.py (same model, weights and batch), one table per mode.

    python benchmarks/profile_modern.py --models modernbert-small --modes sdpa,padding_free \\
        --batch 8 --seqlen 1024 --iters 2 --top 20

Inference (eval, inference_mode) by default; ``--phase train`` profiles forward + backward.  The
profiler adds overhead per op, so compare the tables' shares, not their totals with bench_modern's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_modern import build, config, make_batch, step_fn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="modernbert-small")
    ap.add_argument("--modes", default="sdpa,padding_free")
    ap.add_argument("--phase", choices=("infer", "train"), default="infer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--lengths", choices=("stratified", "random"), default="stratified")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile
    for name in args.models.split(","):
        cfg, _ = config(name, args.phase == "train")
        batch = make_batch(args.batch, args.seqlen, cfg.vocab_size, seed=args.seqlen, device=torch.device("cpu"),
                           lengths=args.lengths)
        for mode in args.modes.split(","):
            fn = step_fn(build(name, mode, args.phase, torch.device("cpu")), batch, args.phase)
            fn()                                                   # warm-up (and the C++ build, once)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.iters):
                    fn()
            ka = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in ka) / 1e3 / args.iters
            print(f"\n== {name} {args.phase} {mode}: {total:.1f} ms self CPU per step (profiled, "
                  f"load {os.getloadavg()[0]:.1f}) ==")
            print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
