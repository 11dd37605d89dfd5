"""Triton forward kernel: masked attention with an online softmax, one pass over K/V.

One program computes BLOCK_M query rows of one (batch, head).  The key loop covers only key
blocks the mask can show (ReducedMask: per-batch key ranges + causal bounds, or the lists of
PARTIAL and FULL key blocks); FULL blocks load no mask, PARTIAL blocks load a mask tile.  What a
tile needs (bounds checks, causal diagonal, mask load) is decided per loop, as constexprs, so
the inner loops have no data-dependent branches and pipeline well.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, dropout_keep,
                            dropout_keep_store, kv_loop_bounds, load_rng, load_rows, mask_scores, mma, seq_bounds)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
              k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, D, causal_offset, band_lo, qk_scale,
              seed, rng_offset, bh, dropout_p,
              keep_ptr, stride_kw,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
              CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr):
    """One key tile: scores, masking, online-softmax update, P @ V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                  offs_n, kv_hi, offs_d, D, CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    # -- scores, in log2 units
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)) * qk_scale
    s = mask_scores(s, offs_m[:, None], offs_n[None, :], mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi,
                    Sq, Sk, causal_offset, band_lo, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    # -- online softmax (a row with nothing visible so far keeps m = -inf and l = 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        if KEEP_BITS:   # also stored for the backward, which then reads bits instead of running Philox twice
            keep = dropout_keep_store(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, keep_ptr, stride_kw,
                                      CHECK_COLS=CHECK_BOUNDS)
        else:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, TRANSPOSED=False)
        p = tl.where(keep, p, 0.0)
    v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                  offs_n, kv_hi, offs_d, D, CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    acc = mma(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _fwd_range(acc, l_i, m_i, visited, q, lo, safe_lo, safe_hi, hi, offs_m, offs_d,
               k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               mask_ptr, stride_mm, stride_mn, Sq, Sk, D, causal_offset, band_lo, qk_scale,
               seed, rng_offset, bh, dropout_p,
               keep_ptr, stride_kw,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
               LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr):
    """Keys [lo, hi): the tiles before safe_lo (the band's left edge), the interior tiles
    [safe_lo, safe_hi) unchecked, then the edge / diagonal tiles."""
    for start_n in range(lo, safe_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D, causal_offset, band_lo, qk_scale,
                                  seed, rng_offset, bh, dropout_p,
                                  keep_ptr, stride_kw,
                                  BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                  LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
        visited += 1
    for start_n in range(safe_lo, safe_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D, causal_offset, band_lo, qk_scale,
                                  seed, rng_offset, bh, dropout_p,
                                  keep_ptr, stride_kw,
                                  BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=False,
                                  LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
        visited += 1
    for start_n in range(safe_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D, causal_offset, band_lo, qk_scale,
                                  seed, rng_offset, bh, dropout_p,
                                  keep_ptr, stride_kw,
                                  BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                  LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
        visited += 1
    return acc, l_i, m_i, visited


@triton.jit
def _fwd_list(acc, l_i, m_i, visited, q, Count, Index, offs_m, offs_d,
              k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              mask_ptr, stride_mm, stride_mn, Sq, Sk, D, causal_offset, band_lo, qk_scale,
              seed, rng_offset, bh, dropout_p,
              keep_ptr, stride_kw,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
              PARTIAL: tl.constexpr, DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr):
    """The key blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all.  With the band (CAUSAL == BAND) the blocks outside
    it are skipped and every visited one checks it."""
    n_blocks = tl.load(Count)
    start_m = tl.min(offs_m, axis=0)
    for i in range(0, n_blocks):
        start_n = tl.load(Index + i) * BLOCK_N
        # (always true without a band: the block map holds causal, and causal_offset / band_lo reach
        # past every key otherwise)
        if (start_n < start_m + offs_m.shape[0] + causal_offset) & (start_n + BLOCK_N > start_m + band_lo):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                      k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                      mask_ptr, stride_mm, stride_mn, 0, Sk, Sq, Sk, D, causal_offset, band_lo,
                                      qk_scale, seed, rng_offset, bh, dropout_p,
                                      keep_ptr, stride_kw,
                                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                                      CAUSAL=CAUSAL if (PARTIAL or CAUSAL == 2) else False,
                                      LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE, DROPOUT=DROPOUT,
                                      KEEP_BITS=KEEP_BITS)
            visited += 1
    return acc, l_i, m_i, visited


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Sq, Sk, D, qk_scale,
    # grouped-query: query head h reads k / v head h // kv_group; the band's (left, right) reach
    # (window_size; CAUSAL == BAND) or the causal diagonal's (right 0), past every key when unbounded
    kv_group, win_left, win_right,
    # packed batches (VARLEN): cu_seqlens [B + 1] and the packed lengths; Sq / Sk are then the
    # max_seqlens, the batch strides 0.  Lse: [B, H, Sq] or [H, Tq] via these strides
    CuSeqQ, CuSeqK, Tq, Tk, stride_lb, stride_lh,
    # mask values, 4D [Bm, Hm, Sqm, Sk] with stride 0 on broadcast dims: uint8 visibility or
    # float additive values
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    # MASK_KEYS: per-batch [start, end) and "the row must load its mask values" flags
    KeyStart, KeyEnd, KeyNeedsMask,
    # MASK_BLOCKS: lists of PARTIAL and FULL key blocks of every query block
    PartCount, PartIndex, FullCount, FullIndex,
    stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    HeadMask, stride_hb, stride_hh,
    # KEEP_BITS: the keep-mask words [B, H, rows, cols] to write (triton_common.KEEP_PAD)
    KeepBits, stride_kbh, stride_kw,
    Rng, dropout_p, dropout_scale,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    KEEP_BITS: tl.constexpr, WRITE_STATS: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    # per-(sequence, head) bases: a packed batch differs only in q0 / k0 and the lengths
    q0, k0, seq_q, seq_k = seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    causal_offset = seq_k - seq_q + win_right
    band_lo = seq_k - seq_q - win_left
    hk64 = (h // kv_group).to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vn
    mask_ptr = Mask + b64 * stride_mb + h64 * stride_mh
    keep_ptr = KeepBits + bh.to(tl.int64) * stride_kbh + (start_m // 32) * stride_kw

    q = load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, seq_q, offs_d, D,
                  CHECK_ROWS=True, EVEN_D=EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = 0

    if MASK_MODE == MASK_BLOCKS:
        # -- general mask: the listed PARTIAL key blocks, then the FULL ones; empty ones never
        # (stride_cm / stride_im are 0 when the mask is the same for every query block)
        cnt = b * stride_cb + h * stride_ch + pid_m * stride_cm
        idx = b * stride_ib + h * stride_ih + pid_m * stride_im
        acc, l_i, m_i, visited = _fwd_list(
            acc, l_i, m_i, visited, q, PartCount + cnt, PartIndex + idx, offs_m, offs_d,
            k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
            Sq, Sk, D, causal_offset, band_lo, qk_scale, seed, rng_offset, bh, dropout_p,
            keep_ptr, stride_kw,
            BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
        acc, l_i, m_i, visited = _fwd_list(
            acc, l_i, m_i, visited, q, FullCount + cnt, FullIndex + idx, offs_m, offs_d,
            k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
            Sq, Sk, D, causal_offset, band_lo, qk_scale, seed, rng_offset, bh, dropout_p,
            keep_ptr, stride_kw,
            BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS)
    else:
        # -- no mask / key padding: loop bounds from the key range and causal
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
        if needs_mask != 0:     # holes or additive values inside the range: load the row's mask
            acc, l_i, m_i, visited = _fwd_range(
                acc, l_i, m_i, visited, q, lo, safe_lo, safe_hi, hi, offs_m, offs_d,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
                Sq, Sk, D, causal_offset, band_lo, qk_scale, seed, rng_offset, bh, dropout_p,
                keep_ptr, stride_kw,
                BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT,
                KEEP_BITS=KEEP_BITS)
        else:
            acc, l_i, m_i, visited = _fwd_range(
                acc, l_i, m_i, visited, q, lo, safe_lo, safe_hi, hi, offs_m, offs_d,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
                Sq, Sk, D, causal_offset, band_lo, qk_scale, seed, rng_offset, bh, dropout_p,
                keep_ptr, stride_kw,
                BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT,
                KEEP_BITS=KEEP_BITS)

    # -- epilogue: normalise; rows that saw nothing give exactly 0 and lse = +inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if DROPOUT:
        out_scale = out_scale * dropout_scale
    if HAS_HEAD_MASK:
        out_scale = out_scale * tl.load(HeadMask + b * stride_hb + h * stride_hh).to(tl.float32)
    acc = acc * out_scale[:, None]
    o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + (q0 + offs_m[:, None]) * stride_om
              + offs_d[None, :] * stride_od)
    if EVEN_D:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < seq_q)
    else:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < D))
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + q0 + offs_m, lse, mask=offs_m < seq_q)
    if WRITE_STATS:
        tl.store(Stats + bh * tl.cdiv(Sq, BLOCK_M) + pid_m, visited)
