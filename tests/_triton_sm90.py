"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU: the interpreter
runs the kernels' Python, this runs Triton's real frontend, lowering and ptxas.  Run as a script
without TRITON_INTERPRET (test_triton_compile.py does); prints one line per kernel variant.

    python tests/_triton_sm90.py --resources    # also registers / spill stack per thread
    python tests/_triton_sm90.py --resources --only 1,7   # only those variants (numbered as printed)
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

TYPES = {"*fp32": {"Lse", "Delta"},
         "*i32": {"Stats"},
         "*i8": {"Keep"}, "*i64": {"Rng"}, "fp32": {"qk_scale", "dropout_p"}}
TENSORS = {"Q", "K", "V", "Out", "O", "DO", "DK", "DV", "DQ"}
# the kernels' tuple arguments (triton_common's groups), item by item; "T": the q / k / v dtype,
# "M": the mask's; any other parameter named *_strides holds 4 integers
I32 = "i32"
GROUPS = {"sizes": (I32,) * 4, "scales": ("fp32", "fp32"), "band": (I32,) * 3, "seqs": ("*i32", "*i32", I32, I32),
          "lse_strides": (I32, I32), "mask": ("M", I32, I32, I32, I32), "key_range": ("*i32",) * 3,
          "blocks": ("*i32",) * 4 + (I32,) * 6, "head_mask": ("*fp32", I32, I32), "keep": ("*i32", I32, I32),
          "dq_acc": ("*fp32", I32, I32, I32, I32), "dropout": ("*i64", "fp32", "fp32"),
          "rel": ("T", "T", "*i32") + (I32,) * 7, "rel_grads": ("*fp32", "*fp32")}
# the optional tensors that are None when their feature is off, by the constexpr flag they replaced
# (the flags stay in this script's variant tables, so that its lines read as before the change)
OPTIONAL = {"HAS_HEAD_MASK": "head_mask", "KEEP_BITS": "keep", "ATOMIC_DQ": "dq_acc"}
NO_REL = dict(REL_BIAS=0)             # DeBERTa's disentangled score off (REL_GRAD too, in the backward)
NO_REL_BWD = dict(REL_BIAS=0, REL_GRAD=0)


def signature(kernel, dtype: str, mask: str, absent=()):
    """(Triton signature, the None constants of the groups named in absent: their tensor is None)."""
    out, nones = {}, {}
    for i, (name, p) in enumerate(inspect.signature(kernel.fn).parameters.items()):
        if "constexpr" in str(p.annotation):
            continue
        if name in GROUPS or name.endswith("_strides"):
            items = list(GROUPS.get(name, (I32,) * 4))
            if name == "rel_grads" and kernel is triton_bwd_dq.attn_bwd_dq_kernel:
                items = items[:1]           # dQ adds into dc2p only
            items = [dtype if t == "T" else mask if t == "M" else t for t in items]
            if name in absent:
                items[0] = "constexpr"
                nones[(i, 0)] = None
            out[name] = tuple(items)
            continue
        ty = next((t for t, names in TYPES.items() if name in names), "i32")
        out[name] = dtype if name in TENSORS else ty
    return out, nones


_COUNT = [0]
ONLY = {int(i) for i in sys.argv[sys.argv.index("--only") + 1].split(",")} if "--only" in sys.argv else None


def compile_one(kernel, constexprs, dtype="*fp16", mask="*u8", warps=4, stages=2):
    """constexprs: the variant, with HAS_HEAD_MASK / KEEP_BITS / ATOMIC_DQ False meaning that
    group's tensor is None (OPTIONAL)."""
    _COUNT[0] += 1
    if ONLY is not None and _COUNT[0] not in ONLY:
        return
    t0 = time.time()
    absent = {group for flag, group in OPTIONAL.items() if constexprs.get(flag) is False}
    sig, nones = signature(kernel, dtype, mask, absent)
    consts = {k: v for k, v in constexprs.items() if k not in OPTIONAL}
    src = ASTSource(fn=kernel, signature=sig, constexprs={**consts, **nones})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], kernel
    print(f"ok {_COUNT[0]} {kernel.fn.__name__} {dtype} {constexprs} {time.time() - t0:.1f}s{resources(compiled)}",
          flush=True)


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
