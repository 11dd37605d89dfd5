"""Host time of one fused_attn call: everything the Python path does around the kernels.

    python -m benchmarks.host_cost                     # CPU: Triton launches stubbed out
    python -m benchmarks.host_cost --launch offline    # CPU: Triton's launch path, C launch stubbed
    python -m benchmarks.host_cost --device cuda       # GPU: real launches, tiny shapes

CPU, stubbed: the Triton engine under TRITON_INTERPRET=1 with every kernel launch replaced by a
no-op, so the time is fused_attn's Python path alone (checks, mask reduction, engine choice, RNG
draw, autograd, argument binding).  CPU, offline: Triton's real launch path with a stand-in sm_90
driver (benchmarks/triton_offline.py; kernels compiled for sm_90 on first use, only the final C
launch is a no-op), once through fused_attn's direct launches and once through Triton's own
launcher (as with $FUSED_ATTN_DIRECT_LAUNCH=0).  bwd_engine is the engine's backward called directly; bwd / bwd_dropout go
through torch.autograd.grad, whose own cost on the cheapest node is autograd_floor.  GPU: real launches on a shape small enough that the GPU finishes first;
calls are issued back to back without a sync, so the wall time per call is the host's.
On CPU the clock is the thread's CPU time (a loaded machine does not inflate it).
The goal: ≤ 25 µs for a forward and for a backward.  Median of repeated rounds, µs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Optional

import torch

CASES = ("fwd", "fwd_mask", "fwd_float_mask", "fwd_new_float_mask", "fwd_grad", "fwd_grad_dropout", "bwd_engine",
         "bwd", "bwd_dropout", "autograd_floor", "varlen_fwd", "varlen_fwd_int64")


class _Identity(torch.autograd.Function):
    """The cheapest autograd node: what torch.autograd.backward costs before any of our code."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launches():
    import fused_attn.backends.triton_backend as launcher
    saved = {}
    kernel_modules = [m for m in vars(launcher).values()
                      if getattr(m, "__name__", "").startswith("fused_attn.backends.triton_") and m is not launcher]
    for mod in kernel_modules:
        for name in dir(mod):
            if name.endswith("_kernel"):
                saved[(mod, name)] = getattr(mod, name)
                setattr(mod, name, _NoLaunch())
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def _per_call_us(fn, device, n: int, rounds: int) -> float:
    # CPU: this thread's CPU time, so that other processes on a shared machine don't count;
    # GPU: wall time (the host issues launches back to back, the GPU keeps up)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    for _ in range(max(3, n // 10)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(n):
            fn()
        times.append((clock() - t0) / n * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return statistics.median(times)


def measure(device: torch.device, n: int = 200, rounds: int = 7, B: int = 2, H: int = 4, S: int = 128, D: int = 64,
            dtype: Optional[torch.dtype] = None):
    import fused_attn

    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    backend = "triton"
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    pad = torch.ones(B, S, dtype=torch.long, device=device)
    pad[0, S // 2:] = 0
    lens = torch.tensor([S // 2, S], dtype=torch.int32, device=device)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu64 = cu.long()
    # an additive mask (HF 4.x's extended form): reused (a model's layers), or a new tensor every call
    # (a new forward: the reduction and the float 0/1 / NaN check of its values run; the clone is in it)
    fmask = torch.zeros(B, 1, 1, S, device=device, dtype=dtype)
    fmask[0, ..., S // 2:] = torch.finfo(dtype).min
    T = int(lens.sum())
    qp, kp, vp = (torch.randn(T, H, D, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn_like(q)

    def fwd_grad(p):
        return lambda: fused_attn.attention(qg, kg, vg, pad, dropout_p=p, backend=backend)

    out = fwd_grad(0.0)()
    out_d = fwd_grad(0.1)()

    def bwd(o, inputs=(qg, kg, vg)):
        # the autograd node's backward (graph retained, so it can run again); autograd.grad returns
        # the gradients instead of adding them into .grad, which would be arithmetic, not host cost
        return lambda: torch.autograd.grad(o, inputs, grad, retain_graph=True)

    from fused_attn import backends, masks
    engine = backends.get(backend)
    red = masks.reduce_mask(pad, B, H, S, S, device=device)
    o, lse = engine.forward(q, k, v, red, causal=False, dropout_p=0.0, scale=D ** -0.5)
    floor = _Identity.apply(qg)

    fns = {
        "fwd": lambda: fused_attn.attention(q, k, v, backend=backend),
        "fwd_mask": lambda: fused_attn.attention(q, k, v, pad, backend=backend),
        "fwd_float_mask": lambda: fused_attn.attention(q, k, v, fmask, backend=backend),
        "fwd_new_float_mask": lambda: fused_attn.attention(q, k, v, fmask.clone(), backend=backend),
        "fwd_grad": fwd_grad(0.0),
        "fwd_grad_dropout": fwd_grad(0.1),
        "bwd_engine": lambda: engine.backward(grad, q, k, v, o, lse, red, causal=False, dropout_p=0.0,
                                              scale=D ** -0.5),
        "bwd": bwd(out),
        "bwd_dropout": bwd(out_d),
        "autograd_floor": bwd(floor, (qg,)),
        "varlen_fwd": lambda: fused_attn.varlen_attention(qp, kp, vp, cu, cu, S, S, backend=backend),
        "varlen_fwd_int64": lambda: fused_attn.varlen_attention(qp, kp, vp, cu64, cu64, S, S, backend=backend),
    }
    out = {}
    for name in CASES:
        try:
            out[name] = _per_call_us(fns[name], device, n, rounds)
        except (TypeError, ValueError) as e:     # a case an older fused_attn refuses (e.g. int64 cu_seqlens)
            print(f"{name}: {type(e).__name__}: {str(e)[:100]}")
            out[name] = float("nan")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=200, help="calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--launch", choices=("stub", "offline"), default="stub",
                    help="CPU only: stub every launch, or take Triton's launch path offline (see above)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if device.type == "cpu" and args.launch == "stub":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        with stubbed_launches():
            columns = {"stubbed": measure(device, args.n, args.rounds)}
    else:
        if device.type == "cpu":
            from benchmarks import triton_offline
            triton_offline.install()
        from fused_attn.backends import triton_launch
        columns = {}
        for direct in (True, False):
            triton_launch.DIRECT = direct
            columns["direct" if direct else "triton_launcher"] = measure(device, args.n, args.rounds)
    how = "real launches" if device.type == "cuda" else f"launch: {args.launch}"
    print(f"host time per call, µs ({device.type}, {how}, torch {torch.__version__}):")
    print(f"  {'':18s} " + " ".join(f"{c:>16s}" for c in columns))
    for name in CASES:
        print(f"  {name:18s} " + " ".join(f"{col[name]:16.1f}" for col in columns.values()))
    return columns


if __name__ == "__main__":
    main()
