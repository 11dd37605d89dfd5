"""Direct launches (fused_attn/backends/triton_launch.py) pick the compiled variant Triton's own
launcher would, and call it with the same arguments."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


def test_direct_launch_matches_triton_offline():
    """Triton's real launch path with a stand-in sm_90 driver: each launch made both ways records
    the identical launcher call (tests/_triton_launch_check.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_ATTN_DIRECT_LAUNCH")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(HERE / "_triton_launch_check.py")], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "direct launches:" in res.stdout, res.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_direct_launch_gpu(monkeypatch, dtype):
    """On the GPU: the variant the direct path launches is the one Triton's launcher selects for
    the same arguments (aligned and misaligned q), and results are bitwise those of Triton's path."""
    import fused_attn
    from fused_attn.backends import triton_backend, triton_launch

    chosen = []

    def checking(kernel, grid, args, constexprs, variants):
        triton_launch.launch(kernel, grid, args, constexprs, variants)
        hit = variants.table.get((torch.cuda.current_device(), variants.key(args)))
        if hit is not None:
            chosen.append((hit[0], kernel.run(*args, grid=grid, warmup=True, **constexprs)))

    monkeypatch.setattr(triton_backend, "launch", checking)
    B, H, S, D = 2, 4, 200, 64
    pad = torch.ones(B, S, dtype=torch.long, device="cuda")
    pad[0, 77:] = 0
    for offset in (0, 1, 0):
        bufs = [torch.randn(B * H * S * D + offset, device="cuda", dtype=dtype) for _ in range(3)]
        q, k, v = (b[offset:].view(B, H, S, D).requires_grad_() for b in bufs)
        g = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
        results = []
        for direct in (True, False, True):
            monkeypatch.setattr(triton_launch, "DIRECT", direct)
            o = fused_attn.attention(q, k, v, pad, backend="triton")
            results.append((o, *torch.autograd.grad(o, (q, k, v), g)))
        for a, b in zip(results[0], results[1]):
            assert torch.equal(a, b)
        for a, b in zip(results[2], results[1]):
            assert torch.equal(a, b)
    assert chosen, "no launch took the direct path"
    assert all(ours is theirs for ours, theirs in chosen)


def test_variant_key_covers_what_triton_specialises_on():
    """The key tells apart tensor dtypes, 16-byte alignment and integer values (not float values),
    and a call whose argument types differ from the first call's gets no key (Triton's path)."""
    from fused_attn.backends.triton_launch import Variants

    v = Variants()
    t = torch.zeros(64)
    first = v.key((t, 3, 0.5, None))
    assert v.key((torch.zeros(8), 3, 0.25, None)) == first
    assert v.key((t, 4, 0.5, None)) != first
    assert v.key((t, 16, 0.5, None)) != first
    assert v.key((t[1:], 3, 0.5, None)) != first             # 4 bytes in: not 16-byte aligned
    assert v.key((t[4:], 3, 0.5, None)) == first             # 16 bytes in: aligned
    assert v.key((t.half(), 3, 0.5, None)) != first
    assert v.key((t, 3, 0.5, t)) is None
    assert v.key((3, t, 0.5, None)) is None


def test_variant_key_looks_inside_tuple_arguments():
    """The kernels' grouped (tuple) arguments: the items count as loose arguments would, a None
    item by value (Triton makes it a constant), and a tuple of another length or item types, or a
    nested tuple, gets no key (Triton's path)."""
    from fused_attn.backends.triton_launch import Variants

    v = Variants()
    t = torch.zeros(64)
    first = v.key((t, (t, 3, 5), 0.5, (None, 0, 0)))
    assert first is not None
    assert v.key((torch.zeros(8), (t, 3, 5), 0.25, (None, 0, 0))) == first
    assert v.key((t, (t, 3, 6), 0.5, (None, 0, 0))) != first              # an integer inside a group
    assert v.key((t, (t, 3, 16), 0.5, (None, 0, 0))) != first
    assert v.key((t, (t[1:], 3, 5), 0.5, (None, 0, 0))) != first          # a misaligned tensor inside
    assert v.key((t, (t.half(), 3, 5), 0.5, (None, 0, 0))) != first
    assert v.key((t, (t, 3, 5), 0.5, (t, 0, 0))) is None                  # None -> a tensor
    assert v.key((t, (t, 3), 0.5, (None, 0, 0))) is None                  # a shorter group
    assert v.key((t, t, 0.5, (None, 0, 0))) is None                       # a group -> a loose tensor
    nested = Variants()
    assert nested.key((t, ((t, 1), 2))) is None and nested.key((t, ((t, 1), 2))) is None
