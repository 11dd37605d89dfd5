"""DeBERTa's disentangled attention, kernel level: fused_attn.attention(rel_bias=...) against HF's
math (DisentangledSelfAttention's score path: bmm, two gathers of the position tables, softmax,
bmm), forward and forward + backward, on the same inputs.

Both sides start from q, k, v [B, H, S, D] and the projected relative embeddings pos_key /
pos_query [H, 2 span, D] (deberta-v3: position_buckets 256 -> span 256, P = 512), and both
compute the tables c2p = q · pos_keyᵀ and p2c = k · pos_queryᵀ with the same bmm; they differ
in what follows: HF gathers them into two [B, H, S, S] tensors next to the [B, H, S, S] scores,
fused_attn gathers per tile inside the kernel.

    python -m benchmarks.deberta_kernel [--device cpu] [--seq 512 2048] [--out FILE.csv]

--dtype fp16 (GPU): q, k, v and the position embeddings in fp16 and both sides under fp16 autocast,
as an fp16-autocast DeBERTa runs them (HF's softmax then runs in fp32).  The gpu_check "deberta"
step runs the issue's forward target with it:

    python -m benchmarks.deberta_kernel --device cuda --dtype fp16 --heads 12 --seq 4096 --tokens 32768 \
        --modes inference --backend triton
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys

import torch

import fused_attn
from benchmarks.timing import bench, environment, pick_device


def hf_index(S: int, span: int, buckets: int, max_pos: int, device) -> torch.Tensor:
    """fused_attn's index for HF DeBERTa-v2/v3 (docs/design.md, "Disentangled score")."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
    d = torch.arange(-(S - 1), S, device=device)
    rel = make_log_bucket_position(d, buckets, max_pos).long() if buckets > 0 else d
    return torch.clamp(rel + span, 0, 2 * span - 1)


def hf_attention(q, k, v, pos_key, pos_query, relative_pos, span, scale):
    """HF's DisentangledSelfAttention score path (c2p and p2c), on [B * H, S, D] as HF runs it."""
    B, H, S, D = q.shape
    ql, kl, vl = (t.reshape(B * H, S, D) for t in (q, k, v))
    pk = pos_key.repeat(B, 1, 1)          # HF: transpose_for_scores(...).repeat(B, 1, 1)
    pq = pos_query.repeat(B, 1, 1)
    scores = torch.bmm(ql, kl.transpose(-1, -2) * scale)
    c2p = torch.bmm(ql, pk.transpose(-1, -2))
    c2p_pos = torch.clamp(relative_pos + span, 0, 2 * span - 1)
    c2p = torch.gather(c2p, -1, c2p_pos.squeeze(0).expand(B * H, S, S))
    p2c = torch.bmm(kl, pq.transpose(-1, -2))
    p2c_pos = torch.clamp(-relative_pos + span, 0, 2 * span - 1)
    p2c = torch.gather(p2c, -1, p2c_pos.squeeze(0).expand(B * H, S, S)).transpose(-1, -2)
    scores = scores + (c2p + p2c) * scale
    probs = torch.softmax(scores, -1)
    return torch.bmm(probs, vl).view(B, H, S, D)


def fused(q, k, v, pos_key, pos_query, index, scale, backend):
    c2p = torch.matmul(q, pos_key.transpose(-1, -2))        # [B, H, S, P], the same bmm as HF's
    p2c = torch.matmul(k, pos_query.transpose(-1, -2))
    return fused_attn.attention(q, k, v, scale=scale, backend=backend,
                                rel_bias=fused_attn.DisentangledBias(c2p, p2c, index))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096, help="B = tokens // S (at least 1)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="fp16: under fp16 autocast")
    ap.add_argument("--modes", default="inference,train", help="inference (forward), train (forward + backward)")
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    device = pick_device(args.device, args.threads)
    env = environment(device)
    buckets, max_pos, span = 256, 512, 256       # deberta-v3: position_buckets 256, max_relative_positions 512
    H, D = args.heads, args.head_dim
    scale = 1.0 / math.sqrt(D * 3)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    modes = args.modes.split(",")

    def amp():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)
    rows = []
    for S in args.seq:
        B = max(1, args.tokens // S)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(3))
        pos_key, pos_query = (torch.randn(H, 2 * span, D, generator=g).to(device, dtype) for _ in range(2))
        layer = torch.empty(1, S, 1, device=device)
        relative_pos = build_relative_position(layer, layer, bucket_size=buckets, max_position=max_pos)
        index = hf_index(S, span, buckets, max_pos, device)
        with torch.no_grad(), amp():
            ref = hf_attention(q, k, v, pos_key, pos_query, relative_pos, span, scale)
            got = fused(q, k, v, pos_key, pos_query, index, scale, args.backend)
        err = (got.float() - ref.float()).abs().max().item()
        del ref, got
        leaves = [t.requires_grad_() for t in (q, k, v, pos_key, pos_query)]
        go = torch.randn_like(q)

        def hf():
            return hf_attention(q, k, v, pos_key, pos_query, relative_pos, span, scale)

        def fu():
            return fused(q, k, v, pos_key, pos_query, index, scale, args.backend)

        def infer(f):
            def call():
                with torch.no_grad(), amp():
                    f()
            return call

        def train(f):
            def call():
                with amp():
                    out = f()
                torch.autograd.grad(out, leaves, go.to(out.dtype))
            return call

        timed = []
        if "inference" in modes:
            timed.append(("inference", bench(infer(hf), device)[0], bench(infer(fu), device)[0]))
        if "train" in modes:
            timed.append(("train", bench(train(hf), device)[0], bench(train(fu), device)[0]))
        for mode, h, f in timed:
            rows.append(dict(S=S, B=B, H=H, D=D, P=2 * span, mode=mode, dtype=args.dtype, hf_ms=round(h, 2),
                             fused_ms=round(f, 2), speedup=round(h / f, 2), max_abs_err=f"{err:.2e}",
                             load=" ".join(f"{x:.2f}" for x in os.getloadavg()), **env))
            print(f"S={S} B={B} {mode}: HF {h:.1f} ms, fused {f:.1f} ms, {h / f:.2f}x (max |err| {err:.1e})",
                  flush=True)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
