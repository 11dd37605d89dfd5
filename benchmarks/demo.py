"""``make demo`` (``python -m benchmarks.demo``): on the hardware present, check fused_attn against
its reference on a padded BERT-shaped batch, then time it against eager and SDPA.

GPU: B=32, H=12, S=512, D=64, fp16.  CPU: B=8, H=12, S=128, D=64, fp32.  Lengths U[1, S] (right
padding, the tokenizer's mask).  The timing repeats --repeats rounds, the methods in turn, and
prints the median and the min-max over the rounds, with the machine's load average (a shared or
busy machine moves CPU timings by 2x and more).  Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List, Optional

import torch

import fused_attn
from fused_attn import backends

from .presets import Case
from .timing import bench, environment, pick_device
from .workloads import (FLOOR, Method, build_method, dtype_name, flops, hf_eager, make_inputs, max_error,
                        oracle, runners, tolerance)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _check_forward(inp, ref) -> bool:
    tol = tolerance(inp, ref)
    with torch.no_grad():
        err = max_error(fused_attn.attention(inp.q, inp.k, inp.v, inp.key_mask), ref)
        eager = max_error(hf_eager(inp.q, inp.k, inp.v, inp.eager_mask, inp.scale), ref)
    ok = err <= tol
    print(f"  forward   max|fused - ref| {err:.2e}   max|eager - ref| {eager:.2e}   bound {tol:.2e}   "
          f"{_verdict(ok)}")
    return ok


def _check_backward(inp) -> Optional[bool]:
    """Gradients of q, k, v against the fp32 reference, same rule.  None: backward unavailable."""
    try:
        got = torch.autograd.grad(fused_attn.attention(inp.q, inp.k, inp.v, inp.key_mask), inp.leaves, inp.do)
    except NotImplementedError as e:
        print(f"  backward  not available on this backend ({e})")
        return None
    leaves32 = tuple(t.detach().float().requires_grad_() for t in inp.leaves)
    ref_out = fused_attn.reference.attention(*inp.heads(leaves32), inp.key_mask)
    ref = torch.autograd.grad(ref_out, leaves32, inp.do.float())
    eager = torch.autograd.grad(hf_eager(inp.q, inp.k, inp.v, inp.eager_mask, inp.scale), inp.leaves, inp.do)
    ok = True
    for name, g, r, e in zip(("dq", "dk", "dv"), got, ref, eager):
        err, eerr = max_error(g, r), max_error(e, r)
        tol = 2.0 * eerr + FLOOR[inp.dtype]
        ok_one = err <= tol
        ok &= ok_one
        print(f"  {name:<9} max|fused - ref| {err:.2e}   max|eager - ref| {eerr:.2e}   bound {tol:.2e}   "
              f"{_verdict(ok_one)}")
    return ok


def _load_note(busy: str = ": the machine is busy, other processes compete for the cores and the timings "
                              "below move from run to run (see the min-max spread)") -> str:
    """The 1-minute load average against the core count, and `busy` when the machine is busy."""
    try:
        load = os.getloadavg()[0]
    except OSError:          # not available on this platform
        return ""
    cores = os.cpu_count() or 1
    note = f"load average {load:.1f} on {cores} cores"
    if load >= 0.75 * cores:
        note += busy
    return note


def _speed(inp, modes: List[str], min_time: float, repeats: int) -> None:
    """Each method timed in turn over `repeats` rounds; median and min-max of the rounds."""
    mask = inp.key_mask
    methods = [Method("fused_attn", lambda q, k, v: fused_attn.attention(q, k, v, mask)),
               build_method("eager", inp), build_method("sdpa_mask", inp)]
    note = _load_note()
    print(f"\n  timing: {repeats} rounds, the methods in turn in each round"
          + (f"; {note}" if note else ""))
    print(f"  {'mode':<8} {'method':<11} {'ms (median)':>11} {'min-max':>17} {'TFLOP/s':>8}   "
          f"fused_attn speed-up (>1: faster): median [min-max over rounds]")
    for mode in modes:
        case = Case(inp.case.panel, inp.case.x, inp.case.B, inp.case.H, inp.case.S, inp.case.D,
                    inp.case.dtype, inp.case.fill, mode=mode)
        runs = {}
        for m in methods:
            run, _ = runners(m, inp, mode)
            run()
            runs[m.name] = run
        times = {m.name: [] for m in methods}
        for _ in range(repeats):
            for m in methods:
                times[m.name].append(bench(runs[m.name], inp.device, min_time=min_time)[0])
        for m in methods:
            ts = times[m.name]
            ms = statistics.median(ts)
            tf = flops(case, inp.pairs) / ms / 1e9
            sp = ""
            if m.name != "fused_attn":
                ratios = [a / b for a, b in zip(ts, times["fused_attn"])]
                sp = (f"{ms / statistics.median(times['fused_attn']):.2f}x vs {m.name} "
                      f"[{min(ratios):.2f}-{max(ratios):.2f}]")
            print(f"  {mode:<8} {m.name:<11} {ms:11.3f} {min(ts):8.3f}-{max(ts):<8.3f} {tf:8.3f}   {sp}")
    after = _load_note(" (busy)")
    if after:
        print(f"  after timing: {after}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-time", type=float, default=0.1, help="CPU seconds per timing of one method in one round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of timing; the spread over them is printed")
    ap.add_argument("--threads", type=int, help="CPU: torch intra-op threads (default: torch's)")
    ap.add_argument("--no-speed", action="store_true", help="checks only")
    args = ap.parse_args(argv)
    device = pick_device(args.device, args.threads)
    if device.type == "cuda":
        case = Case("demo", "S", 32, 12, 512, 64, dtype="fp16")
    else:
        case = Case("demo", "S", 8, 12, 128, 64, dtype="fp32")
    inp = make_inputs(case, device, seed=args.seed)
    env = environment(device)
    print(f"fused_attn {env['fused_attn']} demo on {env['device_name']} ({device.type}); torch {env['torch']}, "
          f"triton {env['triton'] or '-'}", flush=True)
    t0 = time.perf_counter()
    name = backends.select("auto", inp.q)      # the first use of a C++ engine builds the extension
    took = time.perf_counter() - t0
    forced = os.environ.get("FUSED_ATTN_BACKEND")
    print(f"backend 'auto' -> {name!r}" + (f" (FUSED_ATTN_BACKEND={forced})" if forced else "")
          + (f" (choosing took {took:.0f} s: the C++ extension was built or checked; later runs reuse it)"
             if took > 5 else ""))
    # why the engines "auto" prefers over the chosen one were passed over (same order as
    # fused_attn.backends.select; engines after it are not probed: probing may build C++ code)
    preferred = ("triton", "cuda") if device.type == "cuda" else ("cpu", "triton")
    for other in () if forced else preferred[:preferred.index(name)] if name in preferred else preferred:
        why = backends.reasons(other, inp.q)
        if why:
            msg = "; ".join(why)
            print(f"  ({other}: {msg[:200] + ' ...' if len(msg) > 200 else msg})")
    L = inp.lengths
    print(f"batch: B={case.B} H={case.H} S={case.S} D={case.D} {dtype_name(inp.dtype)}, HF [B,S,H,D] views; "
          f"lengths U[1,{case.S}] (min {int(L.min())}, mean {float(L.float().mean()):.0f}, max {int(L.max())}), "
          f"{1 - float(L.sum()) / (case.B * case.S):.0%} of keys are padding")
    print("check against fused_attn.reference (fp32), docs/design.md rule: error <= 2 x eager's error + floor")
    ok = _check_forward(inp, oracle(inp))
    bwd = _check_backward(inp)
    ok = ok and bwd is not False
    if not args.no_speed:
        _speed(inp, ["fwd"] + (["fwd+bwd"] if bwd is not None else []), args.min_time, args.repeats)
        if name == "reference":
            print("  (the 'reference' backend is plain fp32 eager math: build the C++ cpu kernel for speed)")
    print(f"\n{_verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
