"""Triton backward kernels: dK/dV (one program per key block, looping over query blocks; here) and
dQ (one program per query block, looping over key blocks; triton_bwd_dq.py).  By default no
atomics: every gradient element is written by exactly one program, so gradients are bitwise
repeatable.  With ATOMIC_DQ (opt-in, non-deterministic: FlashAttention-2's single pass) the dK/dV
kernel also adds each tile's dS K into an fp32 dQ with atomics, and the dQ kernel is not launched:
QKᵀ, dO Vᵀ and the keep-mask are computed once instead of twice.

Probabilities are recomputed from the saved log-sum-exp (log2 units; +inf for rows that see
nothing, which makes their P -- and so their gradients -- exactly 0).  The dropout keep-mask is
read from the words the forward stored (KEEP_BITS) or regenerated from its Philox seed/offset.
With Ph = head_mask * dropout(P):
    dV = Phᵀ dO,   dP = head_mask * dropout(dO Vᵀ),   dS = P ∘ (dP - rowsum(dO ∘ O)),
    dQ = scale · dS K,   dK = scale · dSᵀ Q.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, dropout_grads, load_rng, load_rows,
                            mask_scores, mma, seq_bounds, tile_keep)


# ---------------------------------------------------------------------------- dK, dV


@triton.jit
def _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
               stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
               kv_lo, kv_hi, Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
               keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
               CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr,
               ATOMIC_DQ: tl.constexpr):
    """One query tile's contribution to dK, dV (and with ATOMIC_DQ to dQ), computed transposed
    ([BLOCK_N, BLOCK_M]) so that no register tile has to be transposed before the dK/dV dots."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if EVEN_D:
        qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=offs_m[None, :] < Sq, other=0.0)
    else:
        qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=(offs_m[None, :] < Sq) & (offs_d[:, None] < D), other=0.0)
    do = load_rows(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, offs_m, Sq, offs_d, D,
                   CHECK_ROWS=True, EVEN_D=EVEN_D)
    lse = tl.load(lse_base + offs_m, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=offs_m < Sq, other=0.0)
    mi = offs_m[None, :]
    ni = offs_n[:, None]
    sT = mma(k, qT, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32)) * qk_scale
    sT = mask_scores(sT, mi, ni, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, causal_offset, band_lo,
                     CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    pT = tl.math.exp2(sT - lse[None, :])            # lse = +inf on rows that see nothing -> 0
    dpT = mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32))
    # (BLOCK_M may be < 32 here: the tile then starts inside a word, at bit start_m % 32)
    keep = 0
    if DROPOUT:
        keep = tile_keep(seed, rng_offset, bh, dropout_p, keep_base + (start_m // 32) * stride_kw, stride_kw,
                         start_m % 32, offs_m, offs_n, Sk, KEEP_BITS=KEEP_BITS, TRANSPOSED=True, CHECK_COLS=False)
    phT, dsT = dropout_grads(pT, dpT, delta[None, :], grad_scale, keep, DROPOUT=DROPOUT)
    dv = mma(phT.to(do.dtype), do, dv)
    dsT = dsT.to(qT.dtype)
    dk = mma(dsT, tl.trans(qT), dk)
    if ATOMIC_DQ:
        dq = mma(tl.trans(dsT), k, tl.zeros([BLOCK_M, k.shape[1]], dtype=tl.float32)) * sm_scale
        q_ok = offs_m[:, None] < Sq
        if not EVEN_D:
            q_ok = q_ok & (offs_d[None, :] < D)
        tl.atomic_add(dq_base + offs_m[:, None] * stride_aqm + offs_d[None, :] * stride_aqd, dq, mask=q_ok,
                      sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                kv_lo, kv_hi, Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr,
                ATOMIC_DQ: tl.constexpr):
    """Query tiles [q_lo, q_mid) straddle the causal diagonal (the band's right edge); [q_mid, q_safe_end)
    see the whole key tile; [q_safe_end, q_hi) straddle the band's left edge (empty without a band:
    q_safe_end = q_hi = Sq)."""
    for start_m in range(q_lo, q_mid, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                            kv_lo, kv_hi, Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh,
                            dropout_p, keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
    for start_m in range(q_mid, q_safe_end, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                            kv_lo, kv_hi, Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh,
                            dropout_p, keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=False,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
    for start_m in range(q_safe_end, q_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                            kv_lo, kv_hi, Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh,
                            dropout_p, keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
    return dk, dv


@triton.jit
def _dkdv_list(dk, dv, k, v, Count, Index, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
               stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
               Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
               keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
               DROPOUT: tl.constexpr, KEEP_BITS: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """The query blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all.  With the band (CAUSAL == BAND) the blocks outside
    it are skipped and every visited one checks it."""
    n_blocks = tl.load(Count)
    start_n = tl.min(offs_n, axis=0)
    for i in range(0, n_blocks):
        start_m = tl.load(Index + i) * BLOCK_M
        if (start_n < start_m + BLOCK_M + causal_offset) & (start_n + offs_n.shape[0] > start_m + band_lo):
            dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                                0, Sk, Sq, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed, rng_offset, bh,
                                dropout_p, keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                                BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                                CAUSAL=CAUSAL if (PARTIAL or CAUSAL == 2) else False,
                                LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE,
                                DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Sq, Sk, D, qk_scale, sm_scale,
    kv_group, win_left, win_right,
    CuSeqQ, CuSeqK, Tq, Tk, stride_lb, stride_lh,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    KeyStart, KeyEnd, KeyNeedsMask,
    # MASK_BLOCKS: for every key block, its PARTIAL and FULL query blocks (BlockMap.transposed_lists())
    PartCount, PartIndex, FullCount, FullIndex,
    stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in,
    HeadMask, stride_hb, stride_hh,
    # KEEP_BITS: the forward's keep-mask words; ATOMIC_DQ: the fp32 dQ to add into
    KeepBits, stride_kbh, stride_kw, DQacc, stride_aqb, stride_aqh, stride_aqm, stride_aqd,
    Rng, dropout_p, dropout_scale,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    KEEP_BITS: tl.constexpr, ATOMIC_DQ: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seed, rng_offset = load_rng(Rng, DROPOUT=DROPOUT)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q0, k0, seq_q, seq_k = seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    causal_offset = seq_k - seq_q + win_right
    band_lo = seq_k - seq_q - win_left
    hk64 = (h // kv_group).to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm
    do_base = DO + b64 * stride_dob + h64 * stride_doh + q0 * stride_dom
    mask_ptr = Mask + b64 * stride_mb + h64 * stride_mh
    lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q0
    delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q0
    keep_base = KeepBits + bh.to(tl.int64) * stride_kbh
    dq_base = DQacc + b64 * stride_aqb + h64 * stride_aqh + q0 * stride_aqm
    k = load_rows(K + b64 * stride_kb + hk64 * stride_kh + (k0 + offs_n[:, None]) * stride_kn
                  + offs_d[None, :] * stride_kd, offs_n, seq_k, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    v = load_rows(V + b64 * stride_vb + hk64 * stride_vh + (k0 + offs_n[:, None]) * stride_vn
                  + offs_d[None, :] * stride_vd, offs_n, seq_k, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    grad_scale = 1.0
    if DROPOUT:
        grad_scale = grad_scale * dropout_scale
    if HAS_HEAD_MASK:
        grad_scale = grad_scale * tl.load(HeadMask + b * stride_hb + h * stride_hh).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if MASK_MODE == MASK_BLOCKS:
        cnt = b * stride_cb + h * stride_ch + pid_n * stride_cn
        idx = b * stride_ib + h * stride_ih + pid_n * stride_in
        dk, dv = _dkdv_list(dk, dv, k, v, PartCount + cnt, PartIndex + idx, offs_n, offs_d, q_base, do_base,
                            lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                            stride_mm, stride_mn, seq_q, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed,
                            rng_offset, bh, dropout_p, keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT,
                            KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
        dk, dv = _dkdv_list(dk, dv, k, v, FullCount + cnt, FullIndex + idx, offs_n, offs_d, q_base, do_base,
                            lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                            stride_mm, stride_mn, seq_q, Sk, D, causal_offset, band_lo, qk_scale, grad_scale, seed,
                            rng_offset, bh, dropout_p, keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT,
                            KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
    else:
        lo = 0
        hi = seq_k
        needs_mask = 0
        if MASK_MODE == MASK_KEYS:
            lo = tl.load(KeyStart + b)
            hi = tl.load(KeyEnd + b)
            needs_mask = tl.load(KeyNeedsMask + b)
        # key blocks wholly outside the visible range get zero gradients without any work
        if (start_n < hi) & (start_n + BLOCK_N > lo):
            edge = (start_n < lo) | (start_n + BLOCK_N > hi)
            q_lo = 0
            q_mid = 0
            q_safe_end = seq_q
            q_hi = seq_q
            if CAUSAL:
                # query i sees key j iff i >= j - causal_offset; tiles starting at or after
                # q_safe see the whole key tile
                # (q_lo rounded down to a tile boundary: dropout draws rows in groups of 4)
                q_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
                q_safe = start_n + BLOCK_N - 1 - causal_offset
                q_mid = q_lo + tl.cdiv(tl.maximum(q_safe - q_lo, 0), BLOCK_M) * BLOCK_M
            if CAUSAL == 2:
                # the band's left edge: query i sees key j iff i <= j - band_lo; tiles ending at or
                # before start_n - band_lo see the whole key tile, none past start_n + BLOCK_N - 1 - band_lo
                # sees any of it
                q_hi = tl.minimum(seq_q, start_n + BLOCK_N - band_lo)
                q_mid = tl.minimum(q_mid, tl.maximum(q_hi, q_lo))
                free = tl.maximum(start_n - band_lo + 1 - q_mid, 0)
                q_safe_end = tl.minimum(q_mid + (free // BLOCK_M) * BLOCK_M, tl.maximum(q_hi, q_mid))
            if needs_mask != 0:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, q_base, do_base, lse_base,
                                     delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                                     stride_mm, stride_mn, lo, hi, seq_q, Sk, D, causal_offset, band_lo, qk_scale,
                                     grad_scale, seed, rng_offset, bh, dropout_p,
                                     keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
            elif edge:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, q_base, do_base, lse_base,
                                     delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                                     stride_mm, stride_mn, lo, hi, seq_q, Sk, D, causal_offset, band_lo, qk_scale,
                                     grad_scale, seed, rng_offset, bh, dropout_p,
                                     keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)
            else:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, q_base, do_base, lse_base,
                                     delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                                     stride_mm, stride_mn, lo, hi, seq_q, Sk, D, causal_offset, band_lo, qk_scale,
                                     grad_scale, seed, rng_offset, bh, dropout_p,
                                     keep_base, stride_kw, dq_base, stride_aqm, stride_aqd, sm_scale,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT, KEEP_BITS=KEEP_BITS, ATOMIC_DQ=ATOMIC_DQ)

    dk = dk * sm_scale
    n_ok = offs_n[:, None] < seq_k
    if not EVEN_D:
        n_ok = n_ok & (offs_d[None, :] < D)
    rows = k0 + offs_n[:, None]
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + rows * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + rows * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def bwd_delta_kernel(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_od,
                     stride_gb, stride_gh, stride_gm, stride_gd, H, Sq, D,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Delta = rowsum(dO ∘ O) in fp32 into a contiguous [B, H, Sq]: one pass over O and dO (the
    same sum in torch costs two fp32 copies of both and three more launches)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                  offs_m, Sq, offs_d, D, CHECK_ROWS=True, EVEN_D=False)
    do = load_rows(DO + b64 * stride_gb + h64 * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                   offs_m, Sq, offs_d, D, CHECK_ROWS=True, EVEN_D=False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)
