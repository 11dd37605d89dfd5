"""Long inputs without quadratic memory: a ModernBERT-base config (random init) at S=8192, B=1,
forward and backward, padding-free (``fused_attn.patch(model, padding_free=True)``).

Reports, in one CSV row per run:
  * ``peak_rss_mb``: the process's peak resident memory (``resource.getrusage``), and the part of
    it the step added (``step_rss_mb``: peak minus the resident memory after the model and the
    inputs were built);
  * ``largest_tensor``: the shape of the largest tensor any ATen op produced during the step
    (recorded by a TorchDispatchMode; fused_attn's custom ops allocate their outputs through ATen
    too), and ``sxs_tensors``: how many op outputs had two dimensions of size S (an [S, S] score or mask
    tensor) -- 0 means none was formed on this path;
  * the wall time of the step, and its forward (``forward_s``) and backward (``backward_s``,
    with checkpointing: the layers' recomputed forward too) parts.

    python benchmarks/long_memory.py --seqlen 8192 --out benchmarks/results/long_memory.csv

Gradient checkpointing (``--checkpointing``, on by default) keeps the activations of 22 layers at
S=8192 (several GiB in fp32) off a shared machine; it does not change what the attention allocates.

The resident memory counts what glibc's malloc keeps, not only live tensors.  By default glibc
raises its mmap threshold each time a large block is freed, so later [T, hidden] tensors come from
the heap and are not returned: at S=8192 the peak then measured 9.1 GB, while
``--mmap-threshold-mb 1`` (``mallopt(M_MMAP_THRESHOLD)``, as the environment variable
``MALLOC_MMAP_THRESHOLD_=1048576`` would) keeps every block >= 1 MiB in its own mapping, returned
when freed, and the peak close to the live tensors.  The CSV records which was used.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime
import os
import resource
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LargestTensors(TorchDispatchMode):
    """Records the largest op output and the outputs with two dims of size S."""

    def __init__(self, S: int):
        super().__init__()
        self.S, self.largest, self.numel, self.sxs = S, None, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                if t.numel() > self.numel:
                    self.numel, self.largest = t.numel(), (str(func), tuple(t.shape))
                if sum(d == self.S for d in t.shape) >= 2:
                    self.sxs.append((str(func), tuple(t.shape)))
        return out


def set_mmap_threshold(mb: int) -> bool:
    """glibc: serve every allocation of ``mb`` MiB or more by its own mmap (returned on free)."""
    M_MMAP_THRESHOLD = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mb) << 20))
    except (OSError, AttributeError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="default: ModernBERT-base's 22")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--mmap-threshold-mb", type=int, default=0,
                    help="glibc mallopt(M_MMAP_THRESHOLD) in MiB before anything is allocated; 0: glibc's default")
    args = ap.parse_args()
    threshold = "glibc default"
    if args.mmap_threshold_mb > 0:
        threshold = f"{args.mmap_threshold_mb} MiB" if set_mmap_threshold(args.mmap_threshold_mb) else "mallopt failed"

    import transformers as tr

    import fused_attn

    S, B = args.seqlen, args.batch
    kw = {} if args.layers is None else {"num_hidden_layers": args.layers}
    cfg = tr.ModernBertConfig(max_position_embeddings=max(S, 8192), **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tr.ModernBertModel(cfg)
    fused_attn.patch(model, padding_free=True)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(10, cfg.vocab_size, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    base_rss = rss_mb()
    spy = LargestTensors(S)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with spy:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        t1 = time.perf_counter()
        out.float().pow(2).mean().backward()
    wall = time.perf_counter() - t0
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    row = dict(model="modernbert-base", layers=cfg.num_hidden_layers, local_attention=cfg.local_attention,
               batch=B, seqlen=S, dtype="fp32", mode="padding_free", step="forward+backward",
               checkpointing=args.checkpointing, malloc_mmap_threshold=threshold, base_rss_mb=round(base_rss), peak_rss_mb=round(peak_rss_mb()),
               step_rss_mb=round(peak_rss_mb() - base_rss), largest_tensor=f"{spy.largest[1]} from {spy.largest[0]}",
               sxs_tensors=len(spy.sxs), grads_finite=grads_ok, wall_s=round(wall, 1), forward_s=round(t1 - t0, 1),
               backward_s=round(wall - (t1 - t0), 1),
               load_avg_1m=f"{load0:.1f}-{os.getloadavg()[0]:.1f}", cpu_threads=torch.get_num_threads(),
               torch=torch.__version__, transformers=tr.__version__,
               date=datetime.datetime.now().isoformat(timespec="seconds"))
    for k, v in row.items():
        print(f"{k:16s} {v}")
    if spy.sxs:
        print("[S, S]-sized outputs:", spy.sxs[:5])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


if __name__ == "__main__":
    main()
