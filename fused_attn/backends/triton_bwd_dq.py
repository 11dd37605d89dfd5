"""Triton backward kernel for dQ: one program per query block, looping over its key blocks (the
dK/dV kernel and the shared notes are in triton_bwd.py).  Every dQ row is written by exactly one
program: no atomics, bitwise repeatable.  Not launched when the dK/dV kernel accumulates dQ
itself (ATOMIC_DQ, the non-deterministic single pass)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, dropout_grads,
                            kv_loop_bounds, load_rng, load_rows, mask_scores, mma, seq_bounds, tile_keep)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
             stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, D,
             causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
             keep_ptr, stride_kw,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
             CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr):
    """One key tile's contribution to dQ."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, kv_hi, offs_d, D,
                  CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, kv_hi, offs_d, D,
                  CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    mi = offs_m[:, None]
    ni = offs_n[None, :]
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)) * qk_scale
    s = mask_scores(s, mi, ni, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, causal_offset, band_lo,
                    CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    p = tl.math.exp2(s - lse[:, None])
    dp = mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
    keep = 0
    if DROPOUT:
        keep = tile_keep(seed, rng_offset, bh, dropout_p, keep_ptr, stride_kw, 0, offs_m, offs_n, Sk,
                         KEEP_BITS=KEEP_BITS, TRANSPOSED=False, CHECK_COLS=CHECK_BOUNDS)
    _, ds = dropout_grads(p, dp, delta[:, None], grad_scale, keep, DROPOUT=DROPOUT)
    return mma(ds.to(k.dtype), k, dq)


@triton.jit
def _dq_range(dq, q, do, lse, delta, lo, safe_lo, safe_hi, hi, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
              stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
              causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
              keep_ptr, stride_kw,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr,
              DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr):
    """Keys [lo, hi): the tiles before safe_lo (the band's left edge), the interior tiles
    [safe_lo, safe_hi) unchecked, then the edge / diagonal tiles."""
    for start_n in range(lo, safe_lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D,
                      causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      keep_ptr, stride_kw,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK,
                      DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
    for start_n in range(safe_lo, safe_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D,
                      causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      keep_ptr, stride_kw,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=False, LOAD_MASK=LOAD_MASK,
                      DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
    for start_n in range(safe_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D,
                      causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      keep_ptr, stride_kw,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK,
                      DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
    return dq


@triton.jit
def _dq_list(dq, q, do, lse, delta, Count, Index, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
             stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
             causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
             keep_ptr, stride_kw,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
             DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr):
    """The key blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all.  With the band (CAUSAL == BAND) the blocks outside
    it are skipped and every visited one checks it."""
    n_blocks = tl.load(Count)
    start_m = tl.min(offs_m, axis=0)
    for i in range(0, n_blocks):
        start_n = tl.load(Index + i) * BLOCK_N
        if (start_n < start_m + offs_m.shape[0] + causal_offset) & (start_n + BLOCK_N > start_m + band_lo):
            dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                          stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, 0, Sk, Sq, Sk, D,
                          causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                          keep_ptr, stride_kw,
                          BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                          CAUSAL=CAUSAL if (PARTIAL or CAUSAL == 2) else False,
                          LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE, DROPOUT=DROPOUT,
                          KEEP_BITS=KEEP_BITS)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Sq, Sk, D, qk_scale, sm_scale,
    kv_group, win_left, win_right,
    CuSeqQ, CuSeqK, Tq, Tk, stride_lb, stride_lh,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    KeyStart, KeyEnd, KeyNeedsMask,
    PartCount, PartIndex, FullCount, FullIndex,
    stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    HeadMask, stride_hb, stride_hh,
    KeepBits, stride_kbh, stride_kw,
    Rng, dropout_p, dropout_scale,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    KEEP_BITS: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seed, rng_offset = load_rng(Rng, DROPOUT=DROPOUT)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q0, k0, seq_q, seq_k = seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    causal_offset = seq_k - seq_q + win_right
    band_lo = seq_k - seq_q - win_left
    hk64 = (h // kv_group).to(tl.int64)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vn
    mask_ptr = Mask + b64 * stride_mb + h64 * stride_mh
    keep_ptr = KeepBits + bh.to(tl.int64) * stride_kbh + (start_m // 32) * stride_kw   # BLOCK_M % 32 == 0
    rows = q0 + offs_m[:, None]
    q = load_rows(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, seq_q, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    do = load_rows(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :] * stride_dod,
                   offs_m, seq_q, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    lse_off = b64 * stride_lb + h64 * stride_lh + q0 + offs_m
    lse = tl.load(Lse + lse_off, mask=offs_m < seq_q, other=float("inf"))
    delta = tl.load(Delta + lse_off, mask=offs_m < seq_q, other=0.0)
    grad_scale = 1.0
    if DROPOUT:
        grad_scale = grad_scale * dropout_scale
    if HAS_HEAD_MASK:
        grad_scale = grad_scale * tl.load(HeadMask + b * stride_hb + h * stride_hh).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if MASK_MODE == MASK_BLOCKS:
        cnt = b * stride_cb + h * stride_ch + pid_m * stride_cm
        idx = b * stride_ib + h * stride_ih + pid_m * stride_im
        dq = _dq_list(dq, q, do, lse, delta, PartCount + cnt, PartIndex + idx, offs_m, offs_d, k_base, v_base,
                      stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                      causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      keep_ptr, stride_kw,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT,
                      KEEP_BITS=KEEP_BITS)
        dq = _dq_list(dq, q, do, lse, delta, FullCount + cnt, FullIndex + idx, offs_m, offs_d, k_base, v_base,
                      stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                      causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      keep_ptr, stride_kw,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT,
                      KEEP_BITS=KEEP_BITS)
    else:
        lo = 0
        hi = seq_k
        needs_mask = 0
        if MASK_MODE == MASK_KEYS:
            lo = tl.load(KeyStart + b)
            hi = tl.load(KeyEnd + b)
            needs_mask = tl.load(KeyNeedsMask + b)
        if VARLEN:      # query blocks past the end of a shorter sequence visit no key
            hi = tl.where(start_m < seq_q, hi, 0)
        lo, safe_lo, safe_hi, hi = kv_loop_bounds(start_m, lo, hi, causal_offset, band_lo, BLOCK_M=BLOCK_M,
                                                  BLOCK_N=BLOCK_N, CAUSAL=CAUSAL)
        if needs_mask != 0:
            dq = _dq_range(dq, q, do, lse, delta, lo, safe_lo, safe_hi, hi, offs_m, offs_d, k_base, v_base,
                           stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                           causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                           keep_ptr, stride_kw,
                           BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT,
                           KEEP_BITS=KEEP_BITS)
        else:
            dq = _dq_range(dq, q, do, lse, delta, lo, safe_lo, safe_hi, hi, offs_m, offs_d, k_base, v_base,
                           stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                           causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                           keep_ptr, stride_kw,
                           BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT,
                           KEEP_BITS=KEEP_BITS)

    dq = dq * sm_scale
    m_ok = offs_m[:, None] < seq_q
    if not EVEN_D:
        m_ok = m_ok & (offs_d[None, :] < D)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok)
