"""End-to-end benchmark of the modern encoders (transformers 5): ModernBERT, GTE, NomicBERT.
HF eager vs HF sdpa vs fused_attn on the padded batch vs padding-free, same weights, random init
(nothing is downloaded).

Modes:
  eager, sdpa    HF's attn_implementation
  fused_attn     ``attn_implementation="fused_attn"`` (``fused_attn.register()``): the padded batch,
                 fused attention (local layers through HF's sliding-window mask or window)
  padding_free   ``fused_attn.patch(model, padding_free=True)``: the model runs on the real tokens
                 only (integrations/packed_interface.py), local layers on the windowed varlen kernel
  padding_free_rows64  (not in the default --modes) padding_free with the CPU kernel's query tiles
                 held at 64 rows (FUSED_ATTN_CPU_QUERY_ROWS=64 around each step): the kernel as it
                 was before narrow bands got shorter tiles

Models (--models):
  modernbert-small  hidden 384, 6 layers, 6 heads of 64, intermediate 576, local_attention 128, a
                    global layer every 3rd
  modernbert-base   ModernBertConfig's defaults (ModernBERT-base: hidden 768, 22 layers, 12 heads)
  gte-base          GteConfig's defaults (gte-base-en-v1.5-like: hidden 768, 12 layers)
  nomic-base        NomicBertConfig's defaults (nomic-embed-text-v1.5-like: hidden 768, 12 layers)

Phases: "infer" (the base model's forward under inference_mode, eval) and "train" (the
sequence-classification model: forward, backward, AdamW step; dropout 0.1 in attention and MLP).
Lengths U[1, S], stratified as in bench_hf.py (~50% real tokens), right padding.  On CPU the modes
are timed in turn (interleaved), so the ratios come from one run under the same load; the CSV
records the load average around each case.

    python benchmarks/bench_modern.py --device cpu --models modernbert-small --batch 8 --seqlen 1024 \\
        --out benchmarks/results/modern.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hf import draw_lengths, time_interleaved, time_it, versions  # noqa: E402

MODES = ("eager", "sdpa", "fused_attn", "padding_free")
DROPOUT = 0.1


def config(name: str, train: bool):
    import transformers as tr
    p = DROPOUT if train else 0.0
    if name.startswith("modernbert"):
        kw = dict(attention_dropout=p, mlp_dropout=p, num_labels=2)
        if name == "modernbert-small":
            kw.update(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=576,
                      local_attention=128, global_attn_every_n_layers=3)
        return tr.ModernBertConfig(**kw), "ModernBert"
    if name == "gte-base":
        return tr.GteConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=2), "Gte"
    if name == "nomic-base":
        return tr.NomicBertConfig(hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=2), "NomicBert"
    raise SystemExit(f"--models: unknown model {name!r}")


def build(name: str, mode: str, phase: str, device, seed: int = 0):
    import transformers as tr

    import fused_attn
    cfg, prefix = config(name, phase == "train")
    cfg._attn_implementation = "eager" if mode == "fused_attn" or mode.startswith("padding_free") else mode
    cls = getattr(tr, prefix + ("ForSequenceClassification" if phase == "train" else "Model"))
    torch.manual_seed(seed)
    model = cls(cfg).to(device)
    if mode == "fused_attn":
        fused_attn.register()
        model.set_attn_implementation("fused_attn")
    elif mode.startswith("padding_free"):
        fused_attn.patch(model, padding_free=True)
        from fused_attn.integrations.packed_interface import is_packed
        assert is_packed(model), f"{name} did not become padding-free"
    return model


def make_batch(B: int, S: int, vocab: int, seed: int, device, lengths: str):
    g = torch.Generator().manual_seed(seed)
    n = draw_lengths(B, S, lengths, g)
    ids = torch.randint(10, vocab, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < n[:, None]).long()
    labels = torch.randint(0, 2, (B,), generator=g)
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def step_fn(model, batch, phase: str, checkpointing: bool = False):
    if phase == "train":
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step():
        with torch.inference_mode():
            model(**inputs)
    return step


def with_env(fn, name: str, value: str):
    """fn with os.environ[name] = value during each call (restored after)."""
    def step():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="modernbert-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--phases", default="infer,train")
    ap.add_argument("--lengths", choices=("stratified", "random"), default="stratified")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true",
                    help="train: gradient checkpointing in every mode (keeps ModernBERT-base at B=8 S=1024 in memory)")
    ap.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    args = ap.parse_args()
    dev = torch.device(args.device)
    tv, trv, hv = versions()
    meta = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                date=datetime.datetime.now().isoformat(timespec="seconds"), torch=tv, triton=trv, transformers=hv,
                dtype="fp32", cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    modes = args.modes.split(",")
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new = not (args.append and os.path.exists(args.out))
    for name in args.models.split(","):
        for phase in args.phases.split(","):
            cfg, _ = config(name, phase == "train")
            batch = make_batch(args.batch, args.seqlen, cfg.vocab_size, seed=args.seqlen, device=dev,
                               lengths=args.lengths)
            mask = batch["attention_mask"]
            load0 = os.getloadavg()
            models = {m: build(name, m, phase, dev) for m in modes}
            fns = {m: step_fn(models[m], batch, phase, args.checkpointing) for m in modes}
            if "padding_free_rows64" in fns:
                fns["padding_free_rows64"] = with_env(fns["padding_free_rows64"], "FUSED_ATTN_CPU_QUERY_ROWS", "64")
            if dev.type == "cuda":
                stats = {m: time_it(fns[m], args.warmup, args.iters, dev) for m in modes}
            else:
                stats = time_interleaved(fns, args.warmup, args.iters, dev)
            del models, fns
            load1 = os.getloadavg()
            for mode in modes:
                med, p10, p90, _ = stats[mode]
                row = dict(meta, model=name, phase=phase, mode=mode, batch=args.batch, seqlen=args.seqlen,
                           real_token_share=round(mask.float().mean().item(), 3), lengths=args.lengths,
                           dropout=DROPOUT if phase == "train" else 0.0,
                           checkpointing=bool(args.checkpointing and phase == "train"), timing="interleaved",
                           iters=args.iters, load_avg_1m=f"{load0[0]:.1f}-{load1[0]:.1f}",
                           median_ms=round(med, 1), p10_ms=round(p10, 1), p90_ms=round(p90, 1))
                for b in ("eager", "sdpa", "fused_attn") + tuple(m for m in ("padding_free_rows64",) if m in stats):
                    row[f"speedup_vs_{b}"] = round(stats[b][0] / med, 3) if b in stats else ""
                rows.append(row)
                with open(args.out, "w" if new else "a", newline="") as f:     # each row as it comes
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                new = False
                print(f"{name:16s} {phase:5s} {mode:>12s} load {row['load_avg_1m']}: {med:9.1f} ms "
                      f"(p10 {p10:.1f}, p90 {p90:.1f})  x{row['speedup_vs_sdpa'] or '-'} vs sdpa, "
                      f"x{row['speedup_vs_eager'] or '-'} vs eager"
                      + (f", x{row['speedup_vs_padding_free_rows64']} vs rows64" if "padding_free_rows64" in stats else ""),
                      flush=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
