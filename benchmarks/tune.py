"""Tile-size sweep for the Triton kernels on the GPU (source of the tables in
fused_attn/backends/triton_backend.py), with the baselines timed in the same run.

    python benchmarks/tune.py --out results_dir [--quick]

For every (S, fill) of the BERT target shapes (B=32, H=12, D=64, fp16) and a long D=128 case it
times each candidate tile config of the forward and of the backward, checks each against the
fp32 reference, and times SDPA (bool mask / no mask), FlexAttention (compiled, padding BlockMask)
and eager.  Writes tune_<date>.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

import torch
import triton
from triton.testing import do_bench

import fused_attn
from fused_attn.backends import triton_backend as tb
from fused_attn.masks import reduce_mask

FWD = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3),
       (128, 32, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (128, 128, 8, 2)]
# (dK/dV tiles, dQ tiles)
BWD = [((64, 64, 4, 2), (64, 64, 4, 2)), ((32, 128, 4, 2), (128, 32, 4, 2)), ((32, 128, 4, 3), (128, 32, 4, 3)),
       ((64, 128, 4, 2), (128, 64, 4, 2)), ((32, 128, 8, 2), (128, 32, 8, 2)), ((64, 128, 8, 2), (128, 64, 8, 2)),
       ((32, 64, 4, 2), (64, 32, 4, 2)), ((16, 128, 4, 2), (128, 16, 4, 2))]


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def lengths_for(B, S, fill, g):
    if fill == "full":
        return torch.full((B,), S)
    return torch.randint(1, S + 1, (B,), generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    rows = []
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    cases = [(32, 12, 512, 64, "uniform"), (32, 12, 512, 64, "full"), (32, 12, 128, 64, "uniform"),
             (32, 12, 128, 64, "full"), (8, 12, 4096, 128, "uniform"), (32, 12, 2048, 128, "uniform")]
    if args.quick:
        cases = cases[:1]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except Exception as e:  # noqa: BLE001 - report and go on
        print("flex unavailable:", e)
        flex = None
    for B, H, S, D, fill in cases:
        lens = lengths_for(B, S, fill, g).to(dev)
        mask = torch.arange(S, device=dev)[None, :] < lens[:, None]
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.float16).transpose(1, 2) for _ in range(3))
        do = torch.randn(B, H, S, D, device=dev, dtype=torch.float16)
        red = reduce_mask(mask, B, H, S, S)
        scale = D ** -0.5
        ref = fused_attn.reference.attention(q, k, v, mask)
        base = dict(B=B, H=H, S=S, D=D, fill=fill, **meta)
        # -- baselines
        bm4 = mask[:, None, None, :]
        add = torch.zeros(B, 1, 1, S, device=dev, dtype=torch.float16).masked_fill(~bm4, torch.finfo(torch.float16).min)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        # host-side cost of one API call (no sync): what the GPU waits for when kernels are tiny
        import time
        for _ in range(10):
            fused_attn.attention(q, k, v, mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fused_attn.attention(q, k, v, mask)
        host_us = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        rows.append(dict(base, kind="fwd", impl="fused_host_us_per_call", config="", ms=host_us / 1000, max_err=""))
        times = {
            "sdpa_mask": bench(lambda: sdpa(q, k, v, attn_mask=bm4)),
            "sdpa_nomask": bench(lambda: sdpa(q, k, v)),
            "eager": bench(lambda: torch.softmax(q @ k.transpose(-1, -2) * scale + add, -1) @ v),
            "fused_auto": bench(lambda: fused_attn.attention(q, k, v, mask)),
        }
        if flex is not None:
            lens_c = lens
            bmask = create_block_mask(lambda b, h, qi, ki: ki < lens_c[b], B, None, S, S, device=dev)
            times["flex"] = bench(lambda: flex(q, k, v, block_mask=bmask))
        for name, t in times.items():
            rows.append(dict(base, kind="fwd", impl=name, config="", ms=t, max_err=""))
        # fwd+bwd baselines
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fb(f):
            def run():
                out = f(qg, kg, vg)
                torch.autograd.grad(out, (qg, kg, vg), do)
            return run
        tb_times = {
            "sdpa_mask": bench(fb(lambda a, b, c: sdpa(a, b, c, attn_mask=bm4))),
            "sdpa_mask_drop": bench(fb(lambda a, b, c: sdpa(a, b, c, attn_mask=bm4, dropout_p=0.1))),
            "fused_auto": bench(fb(lambda a, b, c: fused_attn.attention(a, b, c, mask))),
            "fused_auto_drop": bench(fb(lambda a, b, c: fused_attn.attention(a, b, c, mask, dropout_p=0.1))),
        }
        if flex is not None:
            tb_times["flex"] = bench(fb(lambda a, b, c: flex(a, b, c, block_mask=bmask)))
        for name, t in tb_times.items():
            rows.append(dict(base, kind="fwd+bwd", impl=name, config="", ms=t, max_err=""))
        # -- forward tile sweep
        for cfg in FWD:
            c = tb.TileConfig(*cfg)
            try:
                out, _ = tb.forward(q, k, v, red, False, scale, 0.0, None, config=c)
                err = (out.float() - ref.float()).abs().max().item()
                t = bench(lambda: tb.forward(q, k, v, red, False, scale, 0.0, None, config=c))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                print("fwd", cfg, "failed:", str(e)[:200])
                continue
            rows.append(dict(base, kind="fwd", impl="triton", config="x".join(map(str, cfg)), ms=t, max_err=err))
        # -- backward tile sweep (kernels only; the forward is the table's config)
        out, lse = tb.forward(q, k, v, red, False, scale, 0.0, None)
        qg2, kg2, vg2 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref32 = fused_attn.reference.attention(qg2, kg2, vg2, mask)
        gref = torch.autograd.grad(ref32, (qg2, kg2, vg2), do.float())
        for cfg in BWD:
            c, c2 = tb.TileConfig(*cfg[0]), tb.TileConfig(*cfg[1])
            try:
                gr = tb.backward(do, q, k, v, out, lse, red, False, scale, 0.0, None, config=c, dq_config=c2)
                err = max((a.float() - b).abs().max().item() for a, b in zip(gr, gref))
                t = bench(lambda: tb.backward(do, q, k, v, out, lse, red, False, scale, 0.0, None, config=c,
                                              dq_config=c2))
            except Exception as e:  # noqa: BLE001
                print("bwd", cfg, "failed:", str(e)[:200])
                continue
            rows.append(dict(base, kind="bwd", impl="triton",
                             config="/".join("x".join(map(str, x)) for x in cfg), ms=t, max_err=err))
        sel = [r for r in rows if r["S"] == S and r["D"] == D and r["fill"] == fill and r["B"] == B]
        for r in sel:
            print(f"{B:3d} {S:5d} {D:4d} {fill:8s} {r['kind']:8s} {r['impl']:16s} {r['config']:12s} {r['ms']:.4f} {r['max_err']}")
        sys.stdout.flush()
    path = os.path.join(args.out, f"tune_{meta['date']}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
