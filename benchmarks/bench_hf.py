"""End-to-end BERT-base benchmark on a GPU: HF eager vs sdpa vs fused_attn (patched).

BERT-base from its config (random init, no download), batch 32, sequence length S in {128, 512},
lengths uniform in [1, S] (right padding), fp16 autocast, attention dropout 0.1.  Phases:
"train" = forward + backward + AdamW step (classification head), "infer" = forward under
torch.inference_mode in eval mode.  Timed with CUDA events, median of --iters after --warmup.

    python benchmarks/bench_hf.py --out benchmarks/results/bench_hf_h100.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def versions():
    import transformers
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return torch.__version__, tv, transformers.__version__


def build(mode: str, seed: int = 0):
    import fused_attn
    from transformers import BertConfig, BertForSequenceClassification
    from fused_attn.integrations.hf import TRANSFORMERS_5
    cfg = BertConfig(num_labels=2, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1,
                     attn_implementation="eager" if mode == "fused_attn" else mode)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).cuda()
    if mode == "fused_attn":
        fused_attn.patch(model)
    elif TRANSFORMERS_5:
        model.set_attn_implementation(mode)
    return model


def make_batch(B: int, S: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    ids = torch.randint(1000, vocab, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, 2, (B,), generator=g)
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()}, lengths


def time_it(fn, warmup: int, iters: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[-2], torch.cuda.max_memory_allocated() / 2**20


def bench_mode(mode, batch, phase, warmup, iters):
    model = build(mode)
    if phase == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                model(**inputs)
    out = time_it(step, warmup, iters)
    del model
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="CSV file to write")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seqlens", default="128,512")
    ap.add_argument("--modes", default="eager,sdpa,fused_attn")
    ap.add_argument("--phases", default="train,infer")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_hf.py needs a CUDA GPU")
    tv, trv, hv = versions()
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    for S in (int(s) for s in args.seqlens.split(",")):
        batch, lengths = make_batch(args.batch, S, 30522, seed=S)
        for phase in args.phases.split(","):
            base = {}
            for mode in args.modes.split(","):
                med, p10, p90, mem = bench_mode(mode, batch, phase, args.warmup, args.iters)
                base[mode] = med
                row = dict(device=dev, date=date, torch=tv, triton=trv, transformers=hv, phase=phase, mode=mode,
                           batch=args.batch, seqlen=S, mean_len=round(lengths.float().mean().item(), 1),
                           median_ms=round(med, 3), p10_ms=round(p10, 3), p90_ms=round(p90, 3),
                           peak_mem_mb=round(mem, 1),
                           speedup_vs_eager=round(base["eager"] / med, 3) if "eager" in base else "",
                           speedup_vs_sdpa=round(base["sdpa"] / med, 3) if "sdpa" in base else "")
                rows.append(row)
                print(f"S={S:4d} {phase:5s} {mode:>10s}: {med:8.2f} ms (p10 {p10:.2f}, p90 {p90:.2f}) "
                      f"peak {mem:7.0f} MiB  x{row['speedup_vs_eager'] or '-'} vs eager", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
