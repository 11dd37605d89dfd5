"""DeBERTa-v3 end to end: HF eager vs fused_attn (``patch``, padded) vs padding-free
(``patch(padding_free=True)``), same weights, training step and inference, with peak memory.

Models: DebertaV2ForSequenceClassification from deberta-v3 configs (random init, no download):
xsmall (hidden 384, 6 heads of 64, 6 layers), small (768, 12 x 64, 6 layers), base (768, 12 x 64,
12 layers); position_buckets 256, max_relative_positions 512, share_att_key, norm_rel_ebd
layer_norm, pos_att_type p2c|c2p, vocab 128100.  Dropout 0.1 (hidden and attention).  Lengths
U[1, S] (bench_hf's "stratified" draw: ~50% real tokens in every batch; --lengths random for a
seeded draw), right padding.

Phases: "train" = forward, backward, AdamW step; "infer" = eval forward under inference_mode.
Timing: the methods are timed in turn within one process (A, B, C, A, B, C, ...), median of --iters
after --warmup; the load average of the machine is recorded around each case.  --device cuda: fp16
autocast (bench_hf.step_fn), each step synchronised, ``--backend triton`` for the fused methods (the
gpu_check "deberta" step: deberta-v3-base, B=32, S=512, training step).

Memory (--memory): each (method, phase) in a fresh process (MALLOC_MMAP_THRESHOLD_ lowered so
that freed buffers go back to the OS): after --warmup steps (the optimizer state exists), the
process's peak RSS is reset (/proc/self/clear_refs) and one more step is run; ``step_peak_mib`` is
the peak RSS during that step minus the RSS before it (what the step itself needs: activations,
gradients, temporaries), ``peak_rss_mib`` the process's peak RSS during it.

    python -m benchmarks.bench_deberta --configs xsmall --seqlens 512 --batch 8 --out out/deb.csv
    python -m benchmarks.bench_deberta --memory --configs xsmall --seqlens 2048 --batch 2 --out out/mem.csv
    python -m benchmarks.bench_deberta --device cuda --backend triton --configs base --batch 32 --phases train
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.bench_hf import bert_batch, step_fn, time_interleaved, versions

METHODS = ("hf", "fused", "padding_free")
CONFIGS = {
    "xsmall": dict(hidden_size=384, num_attention_heads=6, num_hidden_layers=6, intermediate_size=1536),
    "small": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=6, intermediate_size=3072),
    "base": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072),
    "tiny": dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64),   # tests
}
V3 = dict(vocab_size=128100, max_position_embeddings=512, relative_attention=True, position_buckets=256,
          max_relative_positions=-1, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
          position_biased_input=False, type_vocab_size=0, hidden_act="gelu", layer_norm_eps=1e-7,
          hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2)


def build(config: str, seed: int = 0):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    torch.manual_seed(seed)
    return DebertaV2ForSequenceClassification(DebertaV2Config(**V3, **CONFIGS[config]))


def synced(fn, device):
    """fn, followed by a device synchronisation on a GPU (what the timer sees is the step's work)."""
    if device.type != "cuda":
        return fn

    def step():
        fn()
        torch.cuda.synchronize(device)
    return step


def prepare(model, method: str, backend: str):
    import fused_attn
    if method != "hf":
        fused_attn.patch(model, backend=backend, padding_free=method == "padding_free")
    return model


# --------------------------------------------------------------------------------------------
# memory: one (method, phase) per process


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args) -> None:
    """Run in a fresh process: print one JSON line with the step's peak memory."""
    model = prepare(build(args.configs), args.child_method, args.backend)
    batch, _ = bert_batch(args.batch, args.seqlens, 128100, args.seed, torch.device("cpu"), args.lengths)
    step = step_fn(model, batch, args.phases, torch.device("cpu"))
    for _ in range(args.warmup):
        step()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # reset the peak RSS (VmHWM) to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"step_peak_mib": round((peak - before) / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
                      "rss_before_mib": round(before / 1024, 1)}))


def memory_case(config, phase, B, S, method, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.bench_deberta", "--child-method", method, "--configs", config,
           "--phases", phase, "--batch", str(B), "--seqlens", str(S), "--warmup", str(args.warmup),
           "--backend", args.backend, "--seed", str(args.seed), "--lengths", args.lengths]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="xsmall", help="comma list of xsmall, small, base")
    ap.add_argument("--seqlens", default="512")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--phases", default="infer,train")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backend", default="cpu", help="fused_attn engine of the fused methods")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (fp16 autocast)")
    ap.add_argument("--lengths", choices=("stratified", "random"), default="stratified")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--memory", action="store_true", help="peak memory, one process per (method, phase)")
    ap.add_argument("--child-method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_method:
        args.seqlens = int(args.seqlens)
        return memory_child(args)

    methods = args.methods.split(",")
    device = torch.device(args.device)
    if args.memory and device.type != "cpu":
        raise SystemExit("--memory measures the process's RSS: CPU only")
    dtype = "fp16 autocast" if device.type == "cuda" else "fp32"
    tv, trv, hv = versions()
    rows = []
    for config in args.configs.split(","):
        base = build(config, args.seed)
        for S in (int(s) for s in args.seqlens.split(",")):
            batch, lengths = bert_batch(args.batch, S, 128100, args.seed, device, args.lengths)
            real = round(float(lengths.sum()) / (args.batch * S), 3)
            for phase in args.phases.split(","):
                load0 = os.getloadavg()[0]
                t0 = time.time()
                if args.memory:
                    res = {m: memory_case(config, phase, args.batch, S, m, args) for m in methods}
                else:
                    fns = {m: synced(step_fn(prepare(copy.deepcopy(base).to(device), m, args.backend), batch, phase,
                                             device), device) for m in methods}
                    res = time_interleaved(fns, args.warmup, args.iters, device)
                    del fns
                load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
                ref = res.get("hf")
                for m in methods:
                    row = dict(date=datetime.date.today().isoformat(), model=f"deberta-v3-{config}", phase=phase,
                               method=m, batch=args.batch, seqlen=S, real_tokens=real, dtype=dtype,
                               threads=torch.get_num_threads(), load=load, torch=tv, transformers=hv,
                               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
                    if args.memory:
                        row.update(res[m])
                        if ref:
                            row["mem_vs_hf"] = round(res[m]["step_peak_mib"] / ref["step_peak_mib"], 3)
                    else:
                        med, p10, p90, _ = res[m]
                        row.update(ms=round(med, 1), p10_ms=round(p10, 1), p90_ms=round(p90, 1),
                                   iters=args.iters)
                        if ref:
                            row["speedup_vs_hf"] = round(ref[0] / med, 2)
                    rows.append(row)
                    print(", ".join(f"{k}={v}" for k, v in row.items() if k not in ("date", "torch", "transformers")),
                          flush=True)
                print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if args.out and rows:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
