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

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm up (kernel compilation, block maps) off the graph
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():                  # new inputs in the captured buffers
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
