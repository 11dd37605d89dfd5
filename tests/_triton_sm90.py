"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU: the interpreter
runs the kernels' Python, this runs Triton's real frontend, lowering and ptxas.  Run as a script
without TRITON_INTERPRET (test_triton_compile.py does); prints one line per kernel variant.

    python tests/_triton_sm90.py --resources    # also registers / spill stack per thread
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

from fused_attn.backends import (triton_bwd, triton_bwd_dq, triton_fwd,  # noqa: E402  (after the check above)
                                 triton_keep)
from fused_attn.backends.triton_common import MASK_BLOCKS, MASK_KEYS, MASK_NONE  # noqa: E402

TYPES = {"*fp32": {"Lse", "Delta", "HeadMask", "DQacc", "DC2P", "DP2C"},
         "*i32": {"Stats", "KeyStart", "KeyEnd", "KeyNeedsMask", "PartCount", "PartIndex", "FullCount", "FullIndex",
                  "CuSeqQ", "CuSeqK", "KeepBits", "RelIndex"},
         "*i8": {"Keep"}, "*i64": {"Rng"}, "fp32": {"qk_scale", "sm_scale", "dropout_p", "dropout_scale"}}
TENSORS = {"Q", "K", "V", "Out", "O", "DO", "DK", "DV", "DQ", "C2P", "P2C"}
NO_REL = dict(REL_BIAS=0)             # DeBERTa's disentangled score off (REL_GRAD too, in the backward)
NO_REL_BWD = dict(REL_BIAS=0, REL_GRAD=0)


def signature(kernel, dtype: str, mask: str):
    out = {}
    for name, p in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(p.annotation):
            continue
        ty = next((t for t, names in TYPES.items() if name in names), "i32")
        out[name] = dtype if name in TENSORS else mask if name == "Mask" else ty
    return out


def compile_one(kernel, constexprs, dtype="*fp16", mask="*u8", warps=4, stages=2):
    t0 = time.time()
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, mask), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], kernel
    print(f"ok {kernel.fn.__name__} {dtype} {constexprs} {time.time() - t0:.1f}s{resources(compiled)}", flush=True)


def resources(compiled) -> str:
    """' regs R stack S' from cuobjdump (shipped with Triton) when --resources is given."""
    if "--resources" not in sys.argv:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f" regs {m.group(1)} stack {m.group(2)}" if m else " (no resource usage)"


def main():
    # additive masks are the float ones: the kernels tell them from the Mask pointer's dtype
    for mode, mask in ((MASK_KEYS, "*u8"), (MASK_BLOCKS, "*fp16")):
        for keep_bits in (False, True):     # dropout keep-mask regenerated / stored
            flags = dict(MASK_MODE=mode.value, CAUSAL=True, HAS_HEAD_MASK=True, DROPOUT=True, KEEP_BITS=keep_bits,
                         VARLEN=False, EVEN_D=True, BLOCK_D=64)
            compile_one(triton_fwd.attn_fwd_kernel, dict(flags, WRITE_STATS=False, BLOCK_M=128, BLOCK_N=64, **NO_REL),
                        mask=mask, stages=3)
            compile_one(triton_bwd.attn_bwd_dkdv_kernel, dict(flags, ATOMIC_DQ=False, BLOCK_M=64, BLOCK_N=64,
                                                              **NO_REL_BWD), mask=mask)
            compile_one(triton_bwd_dq.attn_bwd_dq_kernel, dict(flags, BLOCK_M=64, BLOCK_N=64, **NO_REL_BWD),
                        mask=mask)
    # the single-pass backward (dQ by atomics), with and without dropout
    for dropout in (False, True):
        flags = dict(MASK_MODE=MASK_KEYS.value, CAUSAL=False, HAS_HEAD_MASK=False, DROPOUT=dropout,
                     KEEP_BITS=dropout, VARLEN=False, EVEN_D=True, BLOCK_D=64)
        compile_one(triton_bwd.attn_bwd_dkdv_kernel, dict(flags, ATOMIC_DQ=True, BLOCK_M=64, BLOCK_N=64, **NO_REL_BWD))
    # packed variable-length batches (no mask, causal, dropout stored)
    flags = dict(MASK_MODE=MASK_NONE.value, CAUSAL=True, HAS_HEAD_MASK=False, DROPOUT=True, KEEP_BITS=True,
                 VARLEN=True, EVEN_D=True, BLOCK_D=64)
    compile_one(triton_fwd.attn_fwd_kernel, dict(flags, WRITE_STATS=False, BLOCK_M=128, BLOCK_N=64, **NO_REL),
                stages=3)
    compile_one(triton_bwd.attn_bwd_dkdv_kernel, dict(flags, ATOMIC_DQ=False, BLOCK_M=64, BLOCK_N=64, **NO_REL_BWD))
    compile_one(triton_bwd_dq.attn_bwd_dq_kernel, dict(flags, BLOCK_M=64, BLOCK_N=64, **NO_REL_BWD))
    # DeBERTa's disentangled score: padded with key padding and dropout, packed, and the single pass
    for mode, varlen in ((MASK_KEYS, False), (MASK_NONE, True)):
        flags = dict(MASK_MODE=mode.value, CAUSAL=False, HAS_HEAD_MASK=False, DROPOUT=True, KEEP_BITS=True,
                     VARLEN=varlen, EVEN_D=True, BLOCK_D=64, REL_BIAS=3)
        compile_one(triton_fwd.attn_fwd_kernel, dict(flags, WRITE_STATS=False, BLOCK_M=128, BLOCK_N=64), stages=3)
        compile_one(triton_bwd.attn_bwd_dkdv_kernel, dict(flags, ATOMIC_DQ=False, REL_GRAD=2, BLOCK_M=64,
                                                          BLOCK_N=64))
        compile_one(triton_bwd_dq.attn_bwd_dq_kernel, dict(flags, REL_GRAD=1, BLOCK_M=64, BLOCK_N=64))
    compile_one(triton_bwd.attn_bwd_dkdv_kernel, dict(flags, ATOMIC_DQ=True, REL_GRAD=3, BLOCK_M=64, BLOCK_N=64))
    # head dim 80 (not a power of two), bf16
    flags = dict(MASK_MODE=MASK_NONE.value, CAUSAL=False, HAS_HEAD_MASK=False, DROPOUT=False, KEEP_BITS=False,
                 VARLEN=False, EVEN_D=False, BLOCK_D=128)
    compile_one(triton_fwd.attn_fwd_kernel, dict(flags, WRITE_STATS=True, BLOCK_M=64, BLOCK_N=128, **NO_REL),
                dtype="*bf16")
    compile_one(triton_bwd.bwd_delta_kernel, dict(BLOCK_M=64, BLOCK_D=64))
    compile_one(triton_keep.dropout_keep_kernel, dict(BLOCK_M=32, BLOCK_N=32))

if __name__ == "__main__":
    main()
