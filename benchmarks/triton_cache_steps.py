"""The calls of benchmarks/gpu_check.py's default steps that launch Triton, made on CPU for
``python -m benchmarks.triton_cache build`` (the stand-in sm_90 driver of benchmarks/triton_offline.py
installed): every kernel variant a step reaches on the GPU is compiled here, so that the GPU machine
finds it on disk.

One workload per step, each driving the code the step runs with the arguments of the step's own
command line (gpu_check.STEPS, parsed by the step script's parser): nothing is listed twice.

    kernels   gpu_check's kernel cases with the fused_triton / varlen_triton methods
              (benchmarks.workloads), the host-cost calls, the sanitizer step's cases
    local     benchmarks.feature_bench window: its cases (feature_bench.CASES), fwd and fwd+bwd
    deberta   benchmarks.deberta_kernel's fused forward at the step's shape; bench_deberta's
              training step of the patched and padding-free models (bench_hf.step_fn)
    hf        bench_hf's BERT steps (train and infer) of the fused_attn and padding_free modes

The two model steps run the real Hugging Face models (bench_hf.build_bert, bench_deberta.build +
prepare) at the step's batch and length, with two changes that leave the kernels' arguments as
they are on the GPU (same shapes, strides, dtypes, flags) and make the CPU's part cheap:
  * ``MODEL_LAYERS`` (2) encoder layers instead of 12: every layer launches the same variants (the
    first one and one after it are both run);
  * under the GPU's fp16 autocast, linear and matmul give fp16 results; here autocast is on for
    the CPU (fp16) and ``fake_gemms`` replaces F.linear and torch.matmul by zero tensors of the
    result's shape and dtype (their gradients likewise): the stand-in runs no kernel, so no value
    reaches a result anyway, and a CPU fp16 GEMM of BERT-base's size takes minutes.
"""
from __future__ import annotations

import contextlib
import io
import shlex
import time
from typing import Callable, Dict, List, Tuple

import torch

MODEL_LAYERS = 2          # encoder layers of the model steps' models here (the GPU runs 12)
STEPS = ("kernels", "local", "deberta", "hf")
# gpu_check's default steps -> the workload whose calls cover every Triton variant the step launches
COVERS = {"kernels": "kernels", "host": "kernels", "sanitizer": "kernels", "local": "local", "deberta": "deberta",
          "hf": "hf", "flex": "kernels"}     # flex: the kernel cases without dropout (Inductor's own kernels aside)
# ... and those it does not cover, with why
NOT_COVERED = {"env": "launches no kernel",
               "smoke": "pytest -m gpu_smoke: dozens of small variants (tests/conftest.py GPU_SMOKE), compiled there",
               "rest": "the remaining CUDA tests, in whatever time is left"}


def step_args(name: str) -> List[List[str]]:
    """The step's command (gpu_check.STEPS) split into its commands' argument lists (after the module)."""
    from benchmarks import gpu_check
    cmd = next(s for s in gpu_check.STEPS if s.name == name).cmd
    out = []
    for part in cmd.split("&&"):
        words = shlex.split(part)
        i = words.index("-m") + 2 if "-m" in words else 2        # {py} -m module ... | {py} path.py ...
        out.append([w.replace("{out}", "/dev/null") for w in words[i:]])
    return out


# -- cheap GEMMs: the result's shape and dtype, no arithmetic

class _Zeros(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shape, dtype, *inputs):
        ctx.specs = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else None for t in inputs]
        return torch.zeros(shape, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + tuple(None if s is None else torch.zeros(s[0], dtype=s[1]) for s in ctx.specs)


def _dtype(*ts) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return torch.promote_types(ts[0].dtype, ts[1].dtype)


@contextlib.contextmanager
def fake_gemms():
    """F.linear and torch.matmul return zeros of their result's shape and dtype (contiguous, as a
    GEMM's result is), with zero gradients of their inputs' shapes and dtypes."""
    import torch.nn.functional as F
    linear, matmul = F.linear, torch.matmul

    def fake_linear(x, w, b=None):
        return _Zeros.apply((*x.shape[:-1], w.shape[0]), _dtype(x, w), x, w, b)

    def fake_matmul(a, b, *, out=None):
        if out is not None:
            return matmul(a, b, out=out)
        shape = matmul(a.to("meta"), b.to("meta")).shape
        return _Zeros.apply(shape, _dtype(a, b), a, b)

    F.linear, torch.matmul = fake_linear, fake_matmul
    try:
        yield
    finally:
        F.linear, torch.matmul = linear, matmul


@contextlib.contextmanager
def _layers(table: Dict, key: str, n: int):
    """table[key] (a model config) with n hidden layers, for the duration."""
    old = table[key]
    table[key] = dict(old, num_hidden_layers=n)
    try:
        yield
    finally:
        table[key] = old


def _fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


# -- one workload per step; each returns how many calls it made

def kernels(log: Callable[[str], None]) -> int:
    """Each case of gpu_check's kernels step once with the fused_triton / varlen_triton methods (their
    inputs as on the GPU: same shapes, layouts and lengths), the host-cost calls, the sanitizer
    step's cases."""
    from benchmarks import host_cost, sanitize_case
    from benchmarks.gpu_check import kernel_cases
    from benchmarks.workloads import build_method, make_inputs, runners
    cpu, n = torch.device("cpu"), 0
    for case in kernel_cases():
        inp = make_inputs(case, cpu, "bshd", 0)
        for name in ("fused_triton", "varlen_triton"):
            run, _ = runners(build_method(name, inp), inp, case.mode)
            run()
            n += 1
            log(f"{case.mode} p={case.dropout} {name}")
    host_cost.measure(cpu, n=1, rounds=1, dtype=torch.float16)
    log("host-cost calls")
    with contextlib.redirect_stdout(io.StringIO()):     # nothing runs: its checks see garbage, ignore them
        sanitize_case.main(["--device", "cpu"])
    log("sanitizer cases")
    return n + 1


def local_plan() -> List[Tuple[int, int, int, int, int]]:
    """(B, H, S, D, w) of the local step (feature_bench window)."""
    from benchmarks import feature_bench
    (args,) = step_args("local")
    assert args[0] == "window" and "--small" not in args, args
    return list(feature_bench.CASES["window"])


def local(log: Callable[[str], None]) -> int:
    """feature_bench window's fused calls: the forward without grad, then forward + backward."""
    from benchmarks import feature_bench
    n = 0
    for B, H, S, D, w in local_plan():
        g = torch.Generator().manual_seed(0)
        leaves, fused, _, _ = feature_bench.window_case(B, H, S, D, w, torch.device("cpu"), g)
        q, k, v = leaves[:3]
        with torch.no_grad():
            fused(q, k, v)
        torch.autograd.grad(fused(q, k, v), leaves, torch.randn_like(q))
        n += 2
        log(f"window B={B} S={S} w={w}")
    return n


def deberta_plan() -> Dict:
    """The deberta step's two commands, parsed by their scripts' parsers."""
    from benchmarks import bench_deberta, deberta_kernel
    kernel, train = step_args("deberta")
    return {"kernel": deberta_kernel.parser().parse_args(kernel), "train": bench_deberta.parser().parse_args(train)}


def deberta(log: Callable[[str], None]) -> int:
    import math

    from benchmarks import deberta_kernel
    plan, cpu, n = deberta_plan(), torch.device("cpu"), 0
    k = plan["kernel"]
    dtype = torch.float16 if k.dtype == "fp16" else torch.float32
    span, buckets, max_pos = 256, 256, 512                 # as deberta_kernel.main
    for S in k.seq:
        B = max(1, k.tokens // S)
        q, kk, v = (torch.zeros(B, k.heads, S, k.head_dim, dtype=dtype) for _ in range(3))
        pos_key, pos_query = (torch.zeros(k.heads, 2 * span, k.head_dim, dtype=dtype) for _ in range(2))
        index = deberta_kernel.hf_index(S, span, buckets, max_pos, cpu)
        with torch.no_grad(), _fp16_autocast(), fake_gemms():
            deberta_kernel.fused(q, kk, v, pos_key, pos_query, index, 1.0 / math.sqrt(k.head_dim * 3), k.backend)
        n += 1
        log(f"deberta_kernel S={S} B={B}")
    t = plan["train"]
    for config in t.configs.split(","):
        for S in (int(s) for s in t.seqlens.split(",")):
            for phase in t.phases.split(","):
                for m in t.methods.split(","):
                    if m != "hf":                              # HF's own attention: no Triton
                        deberta_step(config, t.batch, S, phase, m, t.backend, t.seed, t.lengths)
                        n += 1
                        log(f"deberta-v3-{config} B={t.batch} S={S} {phase} {m}")
    return n


def deberta_step(config, B, S, phase, method, backend, seed, lengths, layers=MODEL_LAYERS, cheap=True) -> None:
    """One bench_deberta step (its model, batch and bench_hf.step_fn) under fp16 autocast;
    ``cheap``: with fake_gemms."""
    from benchmarks import bench_deberta
    from benchmarks.bench_hf import bert_batch, step_fn
    with _layers(bench_deberta.CONFIGS, config, layers):
        model = bench_deberta.prepare(bench_deberta.build(config, seed), method, backend)
    batch, _ = bert_batch(B, S, 128100, seed, torch.device("cpu"), lengths)
    with _fp16_autocast(), fake_gemms() if cheap else contextlib.nullcontext():
        step_fn(model, batch, phase, torch.device("cpu"))()


def hf_plan() -> List[Tuple[str, int, int, str, str, str]]:
    """(model, B, S, mode, phase, lengths) of the hf step's fused_attn runs (bench_hf's GPU defaults)."""
    from benchmarks import bench_hf
    (argv,) = step_args("hf")
    a = bench_hf.parser().parse_args(argv)
    B = a.batch or 32                                          # bench_hf's default on a GPU
    seqlens = [int(s) for s in (a.seqlens or "128,512").split(",")]
    return [(name, B, S, mode, phase, a.lengths) for name in a.models.split(",") for S in seqlens
            for phase in a.phases.split(",") for mode in a.modes.split(",") if mode in bench_hf.FUSED_MODES]


def hf(log: Callable[[str], None]) -> int:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    n = 0
    for name, B, S, mode, phase, lengths in hf_plan():
        bert_step(name, B, S, mode, phase, lengths)
        n += 1
        log(f"{name} B={B} S={S} {phase} {mode}")
    return n


def bert_step(name, B, S, mode, phase, lengths, layers=MODEL_LAYERS, cheap=True) -> None:
    """One bench_hf BERT step (its model, batch and step_fn) under fp16 autocast; ``cheap``: with fake_gemms."""
    from benchmarks import bench_hf
    cpu = torch.device("cpu")
    batch, _ = bench_hf.bert_batch(B, S, 30522, seed=S, device=cpu, lengths=lengths)
    with _layers(bench_hf.BERT, name, layers):
        model = bench_hf.build_bert(name, mode, cpu)
    with _fp16_autocast(), fake_gemms() if cheap else contextlib.nullcontext():
        bench_hf.step_fn(model, batch, phase, cpu)()


WORKLOADS: Dict[str, Callable[[Callable[[str], None]], int]] = {
    "kernels": kernels, "local": local, "deberta": deberta, "hf": hf}


def run(names, log_prefix: str = "  ") -> int:
    """The named workloads in order; returns the number of calls."""
    t0, n = time.time(), 0
    for name in names:
        def log(msg, name=name):
            print(f"{log_prefix}[{name}] {msg}: {time.time() - t0:.0f} s", flush=True)
        n += WORKLOADS[name](log)
    return n


# -- the check that the model steps' shortcuts launch what the real model does (tests/test_gpu_check.py)

def looked_up(call) -> List[str]:
    """The kernel variants ``call()`` makes Triton look up (kernel name and Triton's specialisation
    key: dtypes, alignments, integer classes, constexprs, options), none compiled: Triton's
    jit_cache_hook records each one and skips its compile.  Needs the stand-in driver."""
    from triton import knobs
    seen = set()

    def hook(**kw):
        seen.add(f"{kw['fn'].name} {kw['key']}")
        return True                                            # do not compile
    old, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        call()
    finally:
        knobs.runtime.jit_cache_hook = old
    return sorted(seen)


TINY_BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def shortcut_check(B: int = 4, S: int = 64) -> Dict[str, Dict[str, List[str]]]:
    """{model step: {"real": variants, "cheap": variants}} on tiny models: "real" = 3 layers, real
    GEMMs under CPU fp16 autocast; "cheap" = 2 layers and fake_gemms, as the build runs them."""
    from benchmarks import bench_hf
    bench_hf.BERT.setdefault("tiny", TINY_BERT)
    def bert(layers, cheap):
        for mode in bench_hf.FUSED_MODES:
            for phase in ("train", "infer"):
                bert_step("tiny", B, S, mode, phase, "stratified", layers, cheap)

    def deberta(layers, cheap):
        for m in ("fused", "padding_free"):
            deberta_step("tiny", B, S, "train", m, "triton", 0, "stratified", layers, cheap)
    out = {}
    for label, step in (("bert", bert), ("deberta", deberta)):
        out[label] = {"real": looked_up(lambda: step(3, False)), "cheap": looked_up(lambda: step(MODEL_LAYERS, True))}
    return out


if __name__ == "__main__":
    import json
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import triton_cache
    if sys.argv[1:] != ["shortcut-check"]:
        raise SystemExit("usage: python -m benchmarks.triton_cache_steps shortcut-check   (TRITON_INTERPRET unset)")
    triton_cache._offline(None)
    print(json.dumps(shortcut_check()))
