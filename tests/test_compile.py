"""torch.compile traces fused_attn without graph breaks; the custom ops pass opcheck."""
import pytest
import torch

import fused_attn
from fused_attn import ops, reduce_mask
from _utils import padding_mask
from cases import make_mask, make_qkv


@pytest.mark.parametrize("mask_kind", ["pad-right", "pair", "none"])
def test_compile_fullgraph_forward_backward(engine, mask_kind):
    name, device = engine
    q, k, v = make_qkv(2, 2, 24, 40, 16, torch.float32, device, requires_grad=True)
    m = make_mask(mask_kind, 2, 2, 24, 40, device=device)

    def f(q, k, v, m):
        return fused_attn.attention(q, k, v, m, causal=True, backend=name)

    torch._dynamo.reset()   # f's code object is shared by every parametrization: no recompile limit
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, m)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    out_ref = f(q, k, v, m)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_opcheck_forward_op(engine):
    name, device = engine
    q, k, v = make_qkv(2, 2, 20, 33, 16, torch.float32, device, requires_grad=True)
    for mask in (padding_mask([5, 33], 33, device=device), make_mask("pair", 2, 2, 20, 33, device=device)):
        red = reduce_mask(mask, 2, 2, 20, 33)
        args = (q, k, v, red.values, red.key_start, red.key_end, red.key_needs_mask, None, None,
                red.kind, red.additive, False, 0.25, 0.0, name, None, None, 0, 0)
        torch.library.opcheck(ops.attn_forward, args)
    # dropout: the rng tensor (seed, offset) on q's device is an input like any other
    rng = torch.tensor([2**40 + 3, 2**33 + 8], dtype=torch.int64, device=device)
    args = (q, k, v, None, None, None, None, None, rng, "none", False, False, 0.25, 0.2, name, None, None, 0, 0)
    torch.library.opcheck(ops.attn_forward, args)


def _capture(step):
    """(graph, outputs) of `step` captured in a CUDA graph, after two warm-up runs on a side
    stream (kernel compilation, block maps) as torch.cuda.graphs requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["triton", "cuda"], ids=["triton-gpu", "cuda-ext"])
@pytest.mark.parametrize("mask_kind", ["pad-right", "pair"])
def test_cuda_graph_capture_forward_backward(name, mask_kind):
    """A training step's attention (dropout off) captured in a CUDA graph and replayed on new
    inputs gives what eager calls give: no host syncs, no allocations outside the graph pool."""
    from fused_attn import backends

    dev = torch.device("cuda")
    why = backends.reasons(name, torch.empty(1, 1, 1, 16, device=dev))
    if why:
        pytest.skip(f"backend {name!r} unavailable: {'; '.join(why)}")
    B, H, S, D = 2, 3, 100, 64
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, S, D, device=dev, dtype=torch.float16)
    mask = make_mask(mask_kind, B, H, S, S, device=dev)
    red = reduce_mask(mask, B, H, S, S)

    def step():
        out = fused_attn.attention(q, k, v, red, backend=name)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    graph, captured = _capture(step)
    with torch.no_grad():                  # new inputs in the captured buffers
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_dropout_draws_like_eager(engine):
    """Under torch.compile the rng tensor is drawn inside the graph (torch.randint on q's device, no
    host read) and carried by the custom ops: a compiled training step draws what eager draws from
    the same generator state, forward and backward, and consecutive calls differ."""
    name, device = engine
    q, k, v = make_qkv(1, 2, 24, 40, 16, torch.float32, device, requires_grad=True)
    go = torch.randn(1, 2, 24, 16, device=device)

    def f(q, k, v):
        return fused_attn.attention(q, k, v, causal=True, dropout_p=0.3, backend=name)

    def step(fn):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), go))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got, nxt = step(compiled), step(compiled)
    torch.manual_seed(5)
    want = step(f)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(got[0], nxt[0])


def _gpu_backend(name):
    from fused_attn import backends

    why = backends.reasons(name, torch.empty(1, 1, 1, 16, device="cuda"))
    if why:
        pytest.skip(f"backend {name!r} unavailable: {'; '.join(why)}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["triton", "cuda"], ids=["triton-gpu", "cuda-ext"])
def test_cuda_graph_dropout_draws_anew_on_every_replay(name):
    """A training step with dropout captured in a CUDA graph: every replay draws a new (seed, offset)
    (the graph-captured torch.randint advances the generator's offset), so two replays drop
    different elements, and each replay gives bitwise what an eager step gives from the generator
    state the replay started from -- the dropout of the reference with that draw's keep-mask."""
    from fused_attn import backends, reference
    from fused_attn._rng import philox_rng, rng_tensor
    from _utils import assert_tolerance, eager_attention

    _gpu_backend(name)
    dev = torch.device("cuda", torch.cuda.current_device())
    B, H, S, D, p = 2, 3, 100, 64, 0.25
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, S, D, device=dev, dtype=torch.float16)

    def step():
        out = fused_attn.attention(q, k, v, dropout_p=p, backend=name)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    graph, captured = _capture(step)
    replays = []
    for _ in range(2):
        before = torch.cuda.get_rng_state(dev)
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in captured]
        after = torch.cuda.get_rng_state(dev)
        torch.cuda.set_rng_state(before, dev)
        expected = step()                  # eager, from the state the replay started from
        torch.cuda.set_rng_state(before, dev)
        seed, offset = philox_rng(dev).tolist()
        torch.cuda.set_rng_state(after, dev)
        for label, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
            assert torch.equal(a, b), f"replay {len(replays)} {label} differs from the eager step"
        keep = backends.get(name).keep_mask(B, H, S, S, p, rng_tensor(seed, offset, dev))
        oracle = reference.attention(q.float(), k.float(), v.float(), dropout_p=p, dropout_mask=keep)
        eager = eager_attention(q.detach(), k.detach(), v.detach(), dropout_mask=keep, dropout_p=p)
        assert_tolerance(f"replay {len(replays)} out", got[0], oracle, eager)
        replays.append(got)
    for label, a, b in zip(("out", "dq", "dk", "dv"), *replays):
        assert not torch.equal(a, b), f"two replays gave the same {label}: the graph froze the dropout seed"


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["triton", "cuda"], ids=["triton-gpu", "cuda-ext"])
def test_compile_reduce_overhead_dropout(name):
    """torch.compile(mode="reduce-overhead") (CUDA graph trees) of attention with dropout, forward and
    backward: the graphs are used (no cudagraph skip), consecutive calls drop different elements,
    and each call matches the eager call from the same generator state bitwise.  (Inductor replaces
    torch.randint by its own RNG unless fallback_random: then the rng pair, and so the dropout, is
    another draw than eager's from the same state.)"""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    _gpu_backend(name)
    dev = torch.device("cuda", torch.cuda.current_device())
    B, H, S, D, p = 2, 3, 100, 64, 0.25
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, S, D, device=dev, dtype=torch.float16)

    def f(q, k, v):
        return fused_attn.attention(q, k, v, dropout_p=p, backend=name)

    def step(fn):
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return [t.clone() for t in (out, *grads)]     # graph outputs are overwritten by the next replay

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        for i in range(4):                  # warm-up, recording, then replays
            torch.manual_seed(100 + i)
            got = step(compiled)
            torch.manual_seed(100 + i)
            want = step(f)
            for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                assert torch.equal(a, b), f"call {i}: compiled {label} differs from eager with the same seed"
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        torch.manual_seed(7)
        a = step(compiled)
        b = step(compiled)
    assert not torch.equal(a[0], b[0]), "consecutive replays gave the same dropout"


FIRST_CALL_COMPILED = """
import sys, torch, fused_attn
from fused_attn import _build
assert fused_attn.__file__.startswith(sys.argv[2]), fused_attn.__file__
assert _build._state["loaded"] is None, "the extension is already loaded in this process"
backend = sys.argv[1]
f = torch.compile(lambda q, k, v, m: fused_attn.attention(q, k, v, m, backend=backend), fullgraph=True,
                  backend="aot_eager", dynamic=True)
for D in (16, 24):          # the head dim is symbolic under dynamic=True: selection still runs once per D
    q, k, v = (torch.randn(2, 2, 9, D) for _ in range(3))
    m = torch.ones(2, 9, dtype=torch.bool)
    m[1, 5:] = False
    torch.testing.assert_close(f(q, k, v, m), fused_attn.reference.attention(q, k, v, m))
assert _build._state["loaded"] == "cpu", _build._state
"""


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compile_fullgraph_is_the_first_call_of_a_process(backend):
    """Compiling the first fused_attn call of a process used to fail on the extension loader's
    lock; backend selection (and the build behind it) now runs eagerly at trace time."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fused_attn import backends

    why = backends.reasons("cpu", torch.empty(1, 1, 1, 16))     # builds it here, once, if needed
    if why:
        pytest.skip(f"cpu backend unavailable: {'; '.join(why)}")
    root = str(Path(fused_attn.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("FUSED_ATTN_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED, backend, root], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_trace_time_selection_carries_the_constant_result_mark():
    """backends marks its trace-time selection the way torch.compiler.assume_constant_result does
    (without importing torch._dynamo at import time); fails if torch changes that mark."""
    from fused_attn import backends

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert backends._select_at_trace_time._dynamo_marked_constant is True
