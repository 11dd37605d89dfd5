"""The dropout keep-mask as a tensor: the kernel behind ``TritonEngine.keep_mask``, the engines'
testing hook, so that the reference can apply exactly the dropout the attention kernels apply
(they draw it tile by tile with ``triton_common.dropout_keep`` and never store it)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import dropout_keep


@triton.jit
def dropout_keep_kernel(Keep, H, Sq, Sk, Rng, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask [B, H, Sq, Sk] (int8, 1 = kept) the kernels use for the (seed, offset)
    in the int64 tensor [2] Rng."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    seed = tl.load(Rng)
    rng_offset = tl.load(Rng + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, TRANSPOSED=False)
    ptrs = Keep + bh.to(tl.int64) * Sq * Sk + offs_m[:, None] * Sk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk))
