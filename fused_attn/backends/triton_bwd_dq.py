"""Triton backward kernel for dQ: one program per query block, looping over its key blocks (the
dK/dV kernel and the shared notes are in triton_bwd.py).  Every dQ row is written by exactly one
program: no atomics, bitwise repeatable.  Not launched when the dK/dV kernel accumulates dQ
itself (its DQacc, the non-deterministic single pass)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, base_ptr, dropout_grads,
                            kv_loop_bounds, load_rows, mask_scores, mma, program_prologue, rel_bias_add,
                            rel_bias_grad, tile_keep)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, kv, msk, kv_lo, kv_hi, geom, scales, drop,
             keep_ptr, stride_kw, rel, grads,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
             CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
             REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr):
    """One key tile's contribution to dQ.  kv, geom: as triton_fwd._fwd_tile's; scales: (qk_scale,
    grad_scale, the scale of the table gradients)."""
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd = kv
    Sq, Sk, D, causal_offset, band_lo = geom
    qk_scale, grad_scale, rel_scale = scales
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, kv_hi, offs_d, D,
                  CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, kv_hi, offs_d, D,
                  CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    mi = offs_m[:, None]
    ni = offs_n[None, :]
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
    s = rel_bias_add(s, mi, ni, rel, REL_BIAS=REL_BIAS) * qk_scale
    s = mask_scores(s, mi, ni, msk, kv_lo, kv_hi, geom, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    p = tl.math.exp2(s - lse[:, None])
    dp = mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
    keep = 0
    if DROPOUT:
        keep = tile_keep(drop, keep_ptr, stride_kw, 0, offs_m, offs_n, Sk, TRANSPOSED=False, CHECK_COLS=CHECK_BOUNDS)
    _, ds = dropout_grads(p, dp, delta[:, None], grad_scale, keep, DROPOUT=DROPOUT)
    rel_bias_grad(ds, mi, ni, grads, rel, rel_scale, REL_GRAD=REL_GRAD)
    return mma(ds.to(k.dtype), k, dq)


@triton.jit
def _dq_range(dq, q, do, lse, delta, lo, safe_lo, safe_hi, hi, offs_m, offs_d, kv, msk, geom, scales, drop,
              keep_ptr, stride_kw, rel, grads,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr,
              DROPOUT: tl.constexpr, REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr):
    """Keys [lo, hi): the tiles before safe_lo (the band's left edge), the interior tiles
    [safe_lo, safe_hi) unchecked, then the edge / diagonal tiles."""
    for start_n in range(lo, safe_lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, kv, msk, lo, hi, geom, scales, drop,
                      keep_ptr, stride_kw, rel, grads,
                      REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True,
                      CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    for start_n in range(safe_lo, safe_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, kv, msk, lo, hi, geom, scales, drop,
                      keep_ptr, stride_kw, rel, grads,
                      REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=False,
                      CAUSAL=False, LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    for start_n in range(safe_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, kv, msk, lo, hi, geom, scales, drop,
                      keep_ptr, stride_kw, rel, grads,
                      REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True,
                      CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    return dq


@triton.jit
def _dq_list(dq, q, do, lse, delta, Count, Index, offs_m, offs_d, kv, msk, geom, scales, drop,
             keep_ptr, stride_kw, rel, grads,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
             DROPOUT: tl.constexpr, REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr):
    """The key blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all.  With the band (CAUSAL == BAND) the blocks outside
    it are skipped and every visited one checks it."""
    Sq, Sk, D, causal_offset, band_lo = geom
    n_blocks = tl.load(Count)
    start_m = tl.min(offs_m, axis=0)
    for i in range(0, n_blocks):
        start_n = tl.load(Index + i) * BLOCK_N
        if (start_n < start_m + offs_m.shape[0] + causal_offset) & (start_n + BLOCK_N > start_m + band_lo):
            dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, kv, msk, 0, Sk, geom, scales, drop,
                          keep_ptr, stride_kw, rel, grads,
                          REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                          CAUSAL=CAUSAL if (PARTIAL or CAUSAL == 2) else False,
                          LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE, DROPOUT=DROPOUT)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    # each tensor's (batch, head, row, dim) strides
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    # as in triton_bwd.attn_bwd_dkdv_kernel
    sizes, scales, band, seqs, lse_strides, mask, key_range,
    # MASK_BLOCKS: the key blocks of every query block, as in triton_fwd.attn_fwd_kernel
    blocks, head_mask, keep, dropout,
    # REL_BIAS: DeBERTa's tables and index (triton_fwd.attn_fwd_kernel); REL_GRAD: (DC2P,), the fp32
    # dc2p, laid out like c2p
    rel, rel_grads,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr,
):
    H, Sq, Sk, D = sizes
    qk_scale, sm_scale = scales
    Rng, dropout_p, dropout_scale = dropout
    (bh, b, h, seed, rng_offset, start_m, offs_m, offs_d, b64, h64, hk64, q0, k0, seq_q, seq_k, causal_offset,
     band_lo) = \
        program_prologue(sizes, band, seqs, Rng, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, VARLEN=VARLEN, DROPOUT=DROPOUT)
    pid_m = tl.program_id(0)
    kv = (base_ptr(K, k_strides, b64, hk64, k0), base_ptr(V, v_strides, b64, hk64, k0),
          k_strides[2], k_strides[3], v_strides[2], v_strides[3])
    Mask, stride_mb, stride_mh, stride_mm, stride_mn = mask
    msk = (Mask + b64 * stride_mb + h64 * stride_mh, stride_mm, stride_mn)
    KeepBits, stride_kbh, stride_kw = keep
    keep_ptr = KeepBits
    if KeepBits is not None:
        keep_ptr = KeepBits + bh.to(tl.int64) * stride_kbh + (start_m // 32) * stride_kw   # BLOCK_M % 32 == 0
    C2P, P2C, RelIndex, stride_rcb, stride_rch, stride_rcm, stride_rpb, stride_rph, stride_rpn, rel_P = rel
    c2p_off = b64 * stride_rcb + h64 * stride_rch + q0 * stride_rcm
    dc2p_ptr = rel_grads[0] + c2p_off
    rel_t = (C2P + c2p_off, P2C + b64 * stride_rpb + h64 * stride_rph + k0 * stride_rpn, stride_rcm, stride_rpn,
             RelIndex + (Sk - 1), rel_P, seq_q, seq_k)
    rows = q0 + offs_m[:, None]
    q = load_rows(Q + b64 * q_strides[0] + h64 * q_strides[1] + rows * q_strides[2] + offs_d[None, :] * q_strides[3],
                  offs_m, seq_q, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    do = load_rows(DO + b64 * do_strides[0] + h64 * do_strides[1] + rows * do_strides[2]
                   + offs_d[None, :] * do_strides[3], offs_m, seq_q, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    lse_off = b64 * lse_strides[0] + h64 * lse_strides[1] + q0 + offs_m
    lse = tl.load(Lse + lse_off, mask=offs_m < seq_q, other=float("inf"))
    delta = tl.load(Delta + lse_off, mask=offs_m < seq_q, other=0.0)
    grad_scale = 1.0
    if DROPOUT:
        grad_scale = grad_scale * dropout_scale
    HeadMask, stride_hb, stride_hh = head_mask
    if HeadMask is not None:
        grad_scale = grad_scale * tl.load(HeadMask + b * stride_hb + h * stride_hh).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    geom = (Sq, Sk, D, causal_offset, band_lo)
    tscales = (qk_scale, grad_scale, sm_scale)
    drop = (seed, rng_offset, bh, dropout_p)
    grads = (dc2p_ptr, dc2p_ptr)

    if MASK_MODE == MASK_BLOCKS:
        PartCount, PartIndex, FullCount, FullIndex, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im = \
            blocks
        cnt = b * stride_cb + h * stride_ch + pid_m * stride_cm
        idx = b * stride_ib + h * stride_ih + pid_m * stride_im
        dq = _dq_list(dq, q, do, lse, delta, PartCount + cnt, PartIndex + idx, offs_m, offs_d, kv, msk, geom, tscales,
                      drop, keep_ptr, stride_kw, rel_t, grads,
                      REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL,
                      PARTIAL=True, DROPOUT=DROPOUT)
        dq = _dq_list(dq, q, do, lse, delta, FullCount + cnt, FullIndex + idx, offs_m, offs_d, kv, msk, geom, tscales,
                      drop, keep_ptr, stride_kw, rel_t, grads,
                      REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL,
                      PARTIAL=False, DROPOUT=DROPOUT)
    else:
        lo = 0
        hi = seq_k
        needs_mask = 0
        if MASK_MODE == MASK_KEYS:
            KeyStart, KeyEnd, KeyNeedsMask = key_range
            lo = tl.load(KeyStart + b)
            hi = tl.load(KeyEnd + b)
            needs_mask = tl.load(KeyNeedsMask + b)
        if VARLEN:      # query blocks past the end of a shorter sequence visit no key
            hi = tl.where(start_m < seq_q, hi, 0)
        lo, safe_lo, safe_hi, hi = kv_loop_bounds(start_m, lo, hi, causal_offset, band_lo, BLOCK_M=BLOCK_M,
                                                  BLOCK_N=BLOCK_N, CAUSAL=CAUSAL)
        if needs_mask != 0:
            dq = _dq_range(dq, q, do, lse, delta, lo, safe_lo, safe_hi, hi, offs_m, offs_d, kv, msk, geom, tscales,
                           drop, keep_ptr, stride_kw, rel_t, grads,
                           REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL,
                           LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT)
        else:
            dq = _dq_range(dq, q, do, lse, delta, lo, safe_lo, safe_hi, hi, offs_m, offs_d, kv, msk, geom, tscales,
                           drop, keep_ptr, stride_kw, rel_t, grads,
                           REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL,
                           LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)

    dq = dq * sm_scale
    m_ok = offs_m[:, None] < seq_q
    if not EVEN_D:
        m_ok = m_ok & (offs_d[None, :] < D)
    tl.store(DQ + b64 * dq_strides[0] + h64 * dq_strides[1] + rows * dq_strides[2] + offs_d[None, :] * dq_strides[3],
             dq.to(DQ.dtype.element_ty), mask=m_ok)
