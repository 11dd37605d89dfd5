"""Compile for sm_90 what the fuzzer's random cases launch: the kernel variants real calls reach.

    python tests/_triton_offline_sweep.py [N] [--seconds S]     (TRITON_INTERPRET unset)

tests/_triton_sm90.py compiles a hand-picked list of variants; this goes through the public API
with the differential fuzzer's cases (tests/cases.py: every mask form, layout, dtype, head dim,
causal, dropout, head mask, packed batches) with the tiles an H100 gets (or the fuzzer's), on Triton's real
launch path with a stand-in sm_90 driver (benchmarks/triton_offline.py).  Each new variant is
compiled by Triton's frontend and ptxas; nothing runs, so results are not checked (the fuzzer does
that under the interpreter).  One line per case that fails, then a summary; exit 1 on a failure.
"""
import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchmarks import triton_offline  # noqa: E402

triton_offline.install()

import torch  # noqa: E402

import fused_attn  # noqa: E402
from cases import make_mask, make_packed, make_qkv, random_case, random_tiles  # noqa: E402
from fused_attn.backends import triton_backend as tb  # noqa: E402

tb._capability = lambda index: (9, 0)      # the tile tables' sm_90 rows


def run_case(seed: int, family: str, tiles: str) -> None:
    case = random_case(seed, small=True, max_head_dim=256, family=family, extended=True)
    g = torch.Generator().manual_seed(seed)
    dtype, grad, p = case["dtype"], case["grad"], case["dropout_p"]
    kw = dict(causal=case["causal"], dropout_p=p, scale=case["scale"], backend="triton")
    if family == "varlen":
        q, k, v, cu_q, cu_k = make_packed(case["lens_q"], case["lens_k"], case["H"], case["D"], dtype,
                                          layout=case["layout"], requires_grad=grad, g=g)
        call = lambda: fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max(case["lens_q"]),  # noqa: E731
                                                   max(case["lens_k"]), **kw)
    else:
        B, H, Sq, Sk, D = (case[x] for x in ("B", "H", "Sq", "Sk", "D"))
        q, k, v = make_qkv(B, H, Sq, Sk, D, dtype, layout=case["layout"], requires_grad=grad, g=g)
        m = make_mask(case["mask"], B, H, Sq, Sk, dtype, g=g)
        hm = None
        if case["head_mask"] is not None:
            hm = torch.rand((H,) if case["head_mask"] == "H" else (B, H), generator=g)
        call = lambda: fused_attn.attention(q, k, v, m, head_mask=hm, **kw)  # noqa: E731
    if tiles == "h100":     # the tile tables' choice on an H100 for this head dim and dtype
        gpu = torch.device("cuda", 0)
        configs = (tb.fwd_config(case["D"], dtype, gpu), *tb.bwd_config(case["D"], dtype, gpu))
    else:                   # the fuzzer's draw (GPU-sized tiles; its interpreter default drawn again)
        fwd, dkdv, dq = random_tiles(seed)
        while (fwd, dkdv, dq) == ((32, 16), (16, 32), (32, 16)):
            seed += 1 << 40
            fwd, dkdv, dq = random_tiles(seed)
        configs = (tb.TileConfig(*fwd, 4, 2), tb.TileConfig(*dkdv, 4, 2), tb.TileConfig(*dq, 4, 2))
    with tb.override_tiles(*configs):
        with torch.set_grad_enabled(grad):
            out = call()
            if grad:
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=200)
    ap.add_argument("--seconds", type=float, default=None, help="stop starting cases after this long")
    ap.add_argument("--first", type=int, default=0, help="first case seed")
    ap.add_argument("--tiles", choices=("h100", "random"), default="h100",
                    help="the tile tables' H100 choice (default), or the fuzzer's random GPU-sized tiles")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    args = ap.parse_args(argv)
    t0, failures, done = time.time(), 0, 0
    for i in range(args.first, args.first + args.n):
        if args.seconds is not None and time.time() - t0 > args.seconds:
            break
        family = "varlen" if i % 4 == 3 else "dense"
        try:
            run_case(i, family, args.tiles)
        except Exception as e:  # noqa: BLE001 - report every failing case and go on
            failures += 1
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"FAIL {family} seed {i}: {random_case(i, True, 256, family, True)}\n    {last[:600]}", flush=True)
        done += 1
        if args.verbose:
            print(f"case {i} done, {time.time() - t0:.0f} s", flush=True)
    compiled = sum(len(getattr(k, "device_caches", {}).get(0, ({},))[0])
                   for k in (tb.triton_fwd.attn_fwd_kernel, tb.triton_bwd.bwd_delta_kernel,
                             tb.triton_bwd.attn_bwd_dkdv_kernel, tb.triton_bwd_dq.attn_bwd_dq_kernel))
    print(f"{done} cases, {compiled} compiled variants, {failures} failed, {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
