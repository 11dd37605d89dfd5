"""Triton backward kernels: dK/dV (one program per key block, looping over query blocks) and dQ
(one program per query block, looping over key blocks).  No atomics: every gradient element is
written by exactly one program, so gradients are bitwise repeatable.

Probabilities are recomputed from the saved log-sum-exp (log2 units; +inf for rows that see
nothing, which makes their P -- and so their gradients -- exactly 0).  The dropout keep-mask is
regenerated from the forward's Philox seed/offset.  With Ph = head_mask * dropout(P):
    dV = Phᵀ dO,   dP = head_mask * dropout(dO Vᵀ),   dS = P ∘ (dP - rowsum(dO ∘ O)),
    dQ = scale · dS K,   dK = scale · dSᵀ Q.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, dropout_keep,
                            kv_loop_bounds, load_rows, mask_scores, mma, seq_bounds)


@triton.jit
def _grads_from_probs(p, dp, delta, offs_m, offs_n, Sk, grad_scale, seed, rng_offset, bh, dropout_p,
                      DROPOUT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """(Ph, dS) of one tile from P and dO·Vᵀ; delta broadcastable to the tile; grad_scale =
    head_mask / (1 - dropout_p).  offs_m / offs_n: the tile's query / key indices; the tile is
    [M, N], or [N, M] when TRANSPOSED."""
    if DROPOUT:
        keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, TRANSPOSED=TRANSPOSED)
        ph = tl.where(keep, p * grad_scale, 0.0)
        dp = tl.where(keep, dp * grad_scale, 0.0)
    else:
        ph = p * grad_scale
        dp = dp * grad_scale
    return ph, p * (dp - delta)


# ---------------------------------------------------------------------------- dK, dV


@triton.jit
def _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
               stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
               kv_lo, kv_hi, Sq, Sk, D, causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
               CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """One query tile's contribution to dK, dV, computed transposed ([BLOCK_N, BLOCK_M]) so
    that no register tile has to be transposed before a dot."""
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
    sT = mask_scores(sT, mi, ni, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, causal_offset,
                     CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    pT = tl.math.exp2(sT - lse[None, :])            # lse = +inf on rows that see nothing -> 0
    dpT = mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32))
    phT, dsT = _grads_from_probs(pT, dpT, delta[None, :], offs_m, offs_n, Sk, grad_scale, seed, rng_offset, bh,
                                 dropout_p, DROPOUT=DROPOUT, TRANSPOSED=True)
    dv = mma(phT.to(do.dtype), do, dv)
    dk = mma(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, q_lo, q_mid, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                kv_lo, kv_hi, Sq, Sk, D, causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """Query tiles [q_lo, q_mid) straddle the causal diagonal; [q_mid, Sq) see the whole key tile."""
    for start_m in range(q_lo, q_mid, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                            kv_lo, kv_hi, Sq, Sk, D, causal_offset, qk_scale, grad_scale, seed, rng_offset, bh,
                            dropout_p, BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    for start_m in range(q_mid, Sq, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                            kv_lo, kv_hi, Sq, Sk, D, causal_offset, qk_scale, grad_scale, seed, rng_offset, bh,
                            dropout_p, BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=False,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    return dk, dv


@triton.jit
def _dkdv_list(dk, dv, k, v, Count, Index, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
               stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
               Sq, Sk, D, causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
               DROPOUT: tl.constexpr):
    """The query blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all."""
    n_blocks = tl.load(Count)
    for i in range(0, n_blocks):
        start_m = tl.load(Index + i) * BLOCK_M
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr, stride_mm, stride_mn,
                            0, Sk, Sq, Sk, D, causal_offset, qk_scale, grad_scale, seed, rng_offset, bh,
                            dropout_p, BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                            CAUSAL=PARTIAL and CAUSAL, LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE,
                            DROPOUT=DROPOUT)
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
    CuSeqQ, CuSeqK, Tq, Tk, stride_lb, stride_lh,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    KeyStart, KeyEnd, KeyNeedsMask,
    # MASK_BLOCKS: for every key block, its PARTIAL and FULL query blocks (BlockMap.transposed_lists())
    PartCount, PartIndex, FullCount, FullIndex,
    stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in,
    HeadMask, stride_hb, stride_hh,
    Rng, dropout_p, dropout_scale,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seed, rng_offset = 0, 0
    if DROPOUT:   # the Philox (seed, offset) lives on the device: graph-safe (fused_attn/_rng.py)
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q0, k0, seq_q, seq_k = seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    causal_offset = seq_k - seq_q
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm
    do_base = DO + b64 * stride_dob + h64 * stride_doh + q0 * stride_dom
    mask_ptr = Mask + b64 * stride_mb + h64 * stride_mh
    lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q0
    delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q0
    k = load_rows(K + b64 * stride_kb + h64 * stride_kh + (k0 + offs_n[:, None]) * stride_kn
                  + offs_d[None, :] * stride_kd, offs_n, seq_k, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    v = load_rows(V + b64 * stride_vb + h64 * stride_vh + (k0 + offs_n[:, None]) * stride_vn
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
                            stride_mm, stride_mn, seq_q, Sk, D, causal_offset, qk_scale, grad_scale, seed,
                            rng_offset, bh, dropout_p,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT)
        dk, dv = _dkdv_list(dk, dv, k, v, FullCount + cnt, FullIndex + idx, offs_n, offs_d, q_base, do_base,
                            lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                            stride_mm, stride_mn, seq_q, Sk, D, causal_offset, qk_scale, grad_scale, seed,
                            rng_offset, bh, dropout_p,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT)
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
            if CAUSAL:
                # query i sees key j iff i >= j - causal_offset; tiles starting at or after
                # q_safe see the whole key tile
                # (q_lo rounded down to a tile boundary: dropout draws rows in groups of 4)
                q_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
                q_safe = start_n + BLOCK_N - 1 - causal_offset
                q_mid = q_lo + tl.cdiv(tl.maximum(q_safe - q_lo, 0), BLOCK_M) * BLOCK_M
            if needs_mask != 0:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, offs_n, offs_d, q_base, do_base, lse_base,
                                     delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                                     stride_mm, stride_mn, lo, hi, seq_q, Sk, D, causal_offset, qk_scale,
                                     grad_scale, seed, rng_offset, bh, dropout_p,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT)
            elif edge:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, offs_n, offs_d, q_base, do_base, lse_base,
                                     delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                                     stride_mm, stride_mn, lo, hi, seq_q, Sk, D, causal_offset, qk_scale,
                                     grad_scale, seed, rng_offset, bh, dropout_p,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)
            else:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, offs_n, offs_d, q_base, do_base, lse_base,
                                     delta_base, stride_qm, stride_qd, stride_dom, stride_dod, mask_ptr,
                                     stride_mm, stride_mn, lo, hi, seq_q, Sk, D, causal_offset, qk_scale,
                                     grad_scale, seed, rng_offset, bh, dropout_p,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)

    dk = dk * sm_scale
    n_ok = offs_n[:, None] < seq_k
    if not EVEN_D:
        n_ok = n_ok & (offs_d[None, :] < D)
    rows = k0 + offs_n[:, None]
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + rows * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + rows * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------- dQ


@triton.jit
def _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
             stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, D,
             causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
             CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile's contribution to dQ."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, kv_hi, offs_d, D,
                  CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, kv_hi, offs_d, D,
                  CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    mi = offs_m[:, None]
    ni = offs_n[None, :]
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)) * qk_scale
    s = mask_scores(s, mi, ni, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, causal_offset,
                    CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    p = tl.math.exp2(s - lse[:, None])
    dp = mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
    _, ds = _grads_from_probs(p, dp, delta[:, None], offs_m, offs_n, Sk, grad_scale, seed, rng_offset, bh,
                              dropout_p, DROPOUT=DROPOUT, TRANSPOSED=False)
    return mma(ds.to(k.dtype), k, dq)


@triton.jit
def _dq_range(dq, q, do, lse, delta, lo, safe_hi, hi, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
              stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
              causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr,
              DROPOUT: tl.constexpr):
    """Keys [lo, hi): interior tiles [lo, safe_hi) unchecked, then the edge / diagonal tiles."""
    for start_n in range(lo, safe_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D,
                      causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=False, LOAD_MASK=LOAD_MASK,
                      DROPOUT=DROPOUT)
    for start_n in range(safe_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D,
                      causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK,
                      DROPOUT=DROPOUT)
    return dq


@triton.jit
def _dq_list(dq, q, do, lse, delta, Count, Index, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
             stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
             causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
             DROPOUT: tl.constexpr):
    """The key blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all."""
    n_blocks = tl.load(Count)
    for i in range(0, n_blocks):
        start_n = tl.load(Index + i) * BLOCK_N
        dq = _dq_tile(dq, q, do, lse, delta, start_n, offs_m, offs_d, k_base, v_base, stride_kn, stride_kd,
                      stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, 0, Sk, Sq, Sk, D,
                      causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL, CAUSAL=PARTIAL and CAUSAL,
                      LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE, DROPOUT=DROPOUT)
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
    CuSeqQ, CuSeqK, Tq, Tk, stride_lb, stride_lh,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    KeyStart, KeyEnd, KeyNeedsMask,
    PartCount, PartIndex, FullCount, FullIndex,
    stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    HeadMask, stride_hb, stride_hh,
    Rng, dropout_p, dropout_scale,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seed, rng_offset = 0, 0
    if DROPOUT:   # the Philox (seed, offset) lives on the device: graph-safe (fused_attn/_rng.py)
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q0, k0, seq_q, seq_k = seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    causal_offset = seq_k - seq_q
    k_base = K + b64 * stride_kb + h64 * stride_kh + k0 * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k0 * stride_vn
    mask_ptr = Mask + b64 * stride_mb + h64 * stride_mh
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
                      causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT)
        dq = _dq_list(dq, q, do, lse, delta, FullCount + cnt, FullIndex + idx, offs_m, offs_d, k_base, v_base,
                      stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                      causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                      BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT)
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
        safe_hi, hi = kv_loop_bounds(start_m, lo, hi, causal_offset, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL)
        if needs_mask != 0:
            dq = _dq_range(dq, q, do, lse, delta, lo, safe_hi, hi, offs_m, offs_d, k_base, v_base,
                           stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                           causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                           BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT)
        else:
            dq = _dq_range(dq, q, do, lse, delta, lo, safe_hi, hi, offs_m, offs_d, k_base, v_base,
                           stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Sq, Sk, D,
                           causal_offset, qk_scale, grad_scale, seed, rng_offset, bh, dropout_p,
                           BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)

    dq = dq * sm_scale
    m_ok = offs_m[:, None] < seq_q
    if not EVEN_D:
        m_ok = m_ok & (offs_d[None, :] < D)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok)


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
