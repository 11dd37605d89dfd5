"""Kernel timings of the newer attention features against SDPA doing the same with a dense mask / bias
(the local and deberta steps of benchmarks/gpu_check.py):

    python -m benchmarks.feature_bench window   --out local.csv     # fused_attn.attention(window_size=)
    python -m benchmarks.feature_bench rel_bias --out deberta.csv   # fused_attn.attention(rel_bias=)

window: sliding-window (local) attention, window (w, w) with key padding, vs SDPA with the band &
padding bool mask [B, 1, S, S].  rel_bias: DeBERTa's disentangled score (c2p + p2c tables of P
relative positions, index [2S-1]) with key padding, vs SDPA with the additive bias gathered from
the tables on every call as HF's eager DeBERTa does (its gather is in the timed region, and the
tables get gradients through it).  fp16, lengths U[1, S], fwd and fwd+bwd; the forward of each is
checked against SDPA in fp32 (docs/design.md's rule: error <= 2 x fp16 SDPA's error + 1e-4).
A feature that fused_attn does not have yet is reported and exits 0.  --device cpu --small runs
tiny shapes with Triton's interpreter (to test this script).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import os
import sys

import torch
import torch.nn.functional as F

import fused_attn

CASES = {"window": [(32, 12, 512, 64, 64), (8, 12, 2048, 64, 64)],        # B, H, S, D, w
         "rel_bias": [(32, 12, 512, 64, 256)]}                             # B, H, S, D, att_span (P = 2 x span)
SMALL = {"window": [(2, 2, 40, 16, 8)], "rel_bias": [(2, 2, 40, 16, 8)]}


def _inputs(B, H, S, D, device, g):
    q, k, v = (torch.randn(B, S, H, D, device=device, generator=g).half().transpose(1, 2).requires_grad_()
               for _ in range(3))
    lens = torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(0)).to(device)
    pad = torch.arange(S, device=device)[None, :] < lens[:, None]
    return q, k, v, pad


def window_case(B, H, S, D, w, device, g):
    q, k, v, pad = _inputs(B, H, S, D, device, g)
    i = torch.arange(S, device=device)
    band = (i[None, :] >= i[:, None] - w) & (i[None, :] <= i[:, None] + w)
    vis = band[None, None] & pad[:, None, None, :]
    fused = lambda q, k, v: fused_attn.attention(q, k, v, pad, window_size=(w, w), backend="triton")  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=vis)                    # noqa: E731
    return (q, k, v), fused, sdpa, vis.any(-1, keepdim=True)             # rows that see a key (SDPA: NaN elsewhere)


def rel_bias_case(B, H, S, D, span, device, g):
    q, k, v, pad = _inputs(B, H, S, D, device, g)
    P = 2 * span
    c2p, p2c = (torch.randn(B, H, S, P, device=device, generator=g).half().requires_grad_() for _ in range(2))
    rel = torch.arange(-(S - 1), S, device=device)                         # index[i - j + S - 1]: rel = i - j
    index = (rel.clamp(-(span - 1), span - 1) + span).contiguous()         # in [1, P): no log buckets here
    i = torch.arange(S, device=device)
    R = index[i[:, None] - i[None, :] + S - 1]                             # [Sq, Sk] table column
    scale = D ** -0.5
    hidden = ~pad[:, None, None, :]
    rb = fused_attn.DisentangledBias(c2p, p2c, index)

    def fused(q, k, v):
        return fused_attn.attention(q, k, v, pad, rel_bias=rb, backend="triton")

    def sdpa(q, k, v, c2p=c2p, p2c=p2c):
        bias = c2p.gather(-1, R.expand(B, H, S, S)) + p2c.gather(-1, R.t().expand(B, H, S, S)).transpose(-1, -2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(bias * scale).masked_fill(hidden, float("-inf")),
                                              scale=scale)
    return (q, k, v, c2p, p2c), fused, sdpa, None                        # every row sees key 0


def _time(fn, device):
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100))
    import time
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(feature: str, out: str, device: torch.device, small: bool) -> int:
    param = {"window": "window_size", "rel_bias": "rel_bias"}[feature]
    if param not in inspect.signature(fused_attn.attention).parameters:
        print(f"fused_attn.attention has no {param}= yet: nothing to time")
        return 0
    make = window_case if feature == "window" else rel_bias_case
    rows, g = [], torch.Generator(device=device).manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for B, H, S, D, w in (SMALL if small else CASES)[feature]:
        leaves, fused, sdpa, rows_ok = make(B, H, S, D, w, device, g)
        q, k, v = leaves[:3]
        with torch.no_grad():
            ref = sdpa(q.float(), k.float(), v.float()) if feature == "window" else None
            if ref is None:
                c2p, p2c = leaves[3:]
                ref = sdpa(q.float(), k.float(), v.float(), c2p.float(), p2c.float())
            keep = torch.ones_like(ref, dtype=torch.bool) if rows_ok is None else rows_ok.expand_as(ref)
            err_f = (fused(q, k, v).float() - ref)[keep].abs().max().item()
            err_s = (sdpa(q, k, v).float() - ref)[keep].abs().max().item()
        check = "PASS" if err_f <= 2 * err_s + 1e-4 else "FAIL"
        do = torch.randn_like(q)
        base = {}
        for mode in ("fwd", "fwd+bwd"):
            for name, fn in (("sdpa", sdpa), ("fused_triton", fused)):
                if mode == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(q, k, v)
                else:
                    def call(fn=fn):
                        torch.autograd.grad(fn(q, k, v), leaves, do)
                call()                                   # compile outside the timing
                ms = _time(call, device)
                base.setdefault(mode, ms)
                rows.append(dict(meta, feature=feature, B=B, H=H, S=S, D=D, param=w, mode=mode, method=name,
                                 ms=round(ms, 4), speedup_vs_sdpa=round(base[mode] / ms, 3),
                                 max_err=f"{err_f:.2e}" if name == "fused_triton" else f"{err_s:.2e}", check=check))
                print(f"{feature} B={B} H={H} S={S} D={D} {param}={w} {mode:8s} {name:13s} {ms:8.3f} ms "
                      f"x{base[mode] / ms:.2f} vs sdpa  fwd err {err_f:.1e} ({check})", flush=True)
            with open(out, "w", newline="") as f:           # rewritten after every mode: partial runs keep results
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader()
                wr.writerows(rows)
    return 1 if any(r["check"] == "FAIL" for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("feature", choices=("window", "rel_bias"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (with --device cpu: the interpreter)")
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    return run(args.feature, args.out, torch.device(args.device), args.small)


if __name__ == "__main__":
    sys.exit(main())
