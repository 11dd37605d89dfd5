"""fused_attn's direct launches call each compiled variant's launcher exactly as Triton's own
launcher does: same variant, same arguments.  Run as a script without TRITON_INTERPRET
(test_triton_launch.py does): Triton's real launch path with a stand-in sm_90 driver
(benchmarks/triton_offline.py), kernels compiled by Triton's frontend and ptxas, launches recorded.

Every launch runs twice: through fused_attn's launch (direct once the variant is cached) and
through ``kernel[grid](...)``; the two recorded launcher calls must be identical.  Each case runs
twice, so its second round takes the direct path, and pointer alignment changes between plans'
calls (a variant chosen for aligned pointers must not serve misaligned ones).
"""
import os
import sys
from collections import Counter

import torch
from triton.runtime.jit import JITFunction

from benchmarks import triton_offline

triton_offline.install()

import fused_attn  # noqa: E402  (after install)
from fused_attn.backends import triton_backend  # noqa: E402

DIRECT = Counter()      # kernel name -> launches that took the direct path
_direct_launch = triton_backend.launch
_triton_run = JITFunction.run
_ran = {"n": 0}


def _counting_run(self, *args, **kwargs):
    _ran["n"] += 1
    return _triton_run(self, *args, **kwargs)


JITFunction.run = _counting_run


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)


def both_ways(kernel, grid, args, constexprs, variants):
    _ran["n"] = 0
    with triton_offline.recording() as rec:
        _direct_launch(kernel, grid, args, constexprs, variants)
    direct = list(rec)
    direct_now = _ran["n"] == 0
    DIRECT[kernel.fn.__name__] += direct_now
    with triton_offline.recording() as rec:
        kernel[grid](*args, **constexprs)
    theirs = list(rec)
    name = kernel.fn.__name__
    assert len(direct) == len(theirs) == 1, (name, len(direct), len(theirs))
    (c1, a1), (c2, a2) = direct[0], theirs[0]
    assert c1 is c2, f"{name}: the direct path picked another compiled variant than Triton"
    assert len(a1) == len(a2), (name, len(a1), len(a2))
    # (grid x3, stream, function, packed metadata, launch metadata, enter hook, exit hook, *args):
    # Triton passes its (empty) hook chains and their metadata, the direct path None
    if direct_now:
        assert a1[6:9] == (None, None, None) and not a2[7].calls and not a2[8].calls, (name, a1[6:9], a2[6:9])
    a1, a2 = a1[:6] + a1[9:], a2[:6] + a2[9:]
    bad = [i for i, (x, y) in enumerate(zip(a1, a2)) if not _same(x, y)]
    assert not bad, f"{name}: launcher arguments differ at {bad}: {[(a1[i], a2[i]) for i in bad][:4]}"


triton_backend.launch = both_ways


def qkv(dtype, B=2, H=2, S=48, D=64, offset=0):
    """q, k, v [B, H, S, D]; offset > 0 starts each at that many elements into its buffer (a
    pointer that is not 16-byte aligned)."""
    out = []
    for _ in range(3):
        buf = torch.randn(B * H * S * D + offset, dtype=dtype)
        out.append(buf[offset:].view(B, H, S, D).requires_grad_())
    return out


def fwd_bwd(q, k, v, mask=None, **kw):
    o = fused_attn.attention(q, k, v, mask, backend="triton", **kw)
    torch.autograd.grad(o, (q, k, v), torch.randn_like(o))


def varlen(T, cu):
    q, k, v = (torch.randn(T, 2, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    o = fused_attn.varlen_attention(q, k, v, cu, cu, 48, 48, causal=True, backend="triton")
    torch.autograd.grad(o, (q, k, v), torch.randn_like(o))


def main():
    B, S = 2, 48
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, 20:] = 0
    bias = torch.randn(B, 1, S, S)
    bias[:, :, :, 40:] = torch.finfo(torch.float32).min
    lens = torch.tensor([17, 48, 0, 31], dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    T = int(lens.sum())
    cases = [
        ("fp16, key padding, dropout", lambda: fwd_bwd(*qkv(torch.float16), pad, dropout_p=0.1)),
        ("fp16 misaligned, key padding", lambda: fwd_bwd(*qkv(torch.float16, offset=1), pad)),
        ("fp16 aligned, key padding", lambda: fwd_bwd(*qkv(torch.float16), pad)),
        ("bf16, additive 3D bias, causal", lambda: fwd_bwd(*qkv(torch.bfloat16), bias.bfloat16(), causal=True)),
        ("fp32, no mask, forward only", lambda: fused_attn.attention(*qkv(torch.float32), backend="triton")),
        ("varlen fp16, causal", lambda: varlen(T, cu)),
    ]
    for name, run in cases:
        for _ in range(2):
            run()
        print("ok", name, flush=True)
    os.environ["FUSED_ATTN_DETERMINISTIC"] = "0"      # the single pass: dK/dV with ATOMIC_DQ
    for _ in range(2):
        fwd_bwd(*qkv(torch.float16), pad, dropout_p=0.1)
    print("ok single pass", flush=True)
    print("direct launches:", dict(DIRECT))
    missing = {"attn_fwd_kernel", "bwd_delta_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"} - set(DIRECT)
    assert not missing, f"never launched directly: {missing}"


if __name__ == "__main__":
    sys.exit(main())
