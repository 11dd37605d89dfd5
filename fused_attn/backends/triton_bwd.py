"""Triton backward kernels: dK/dV (one program per key block, looping over query blocks; here) and
dQ (one program per query block, looping over key blocks; triton_bwd_dq.py).  By default no
atomics: every gradient element is written by exactly one program, so gradients are bitwise
repeatable.  With a dQ buffer (DQacc; opt-in, non-deterministic: FlashAttention-2's single pass) the dK/dV
kernel also adds each tile's dS K into an fp32 dQ with atomics, and the dQ kernel is not launched:
QKᵀ, dO Vᵀ and the keep-mask are computed once instead of twice.

Probabilities are recomputed from the saved log-sum-exp (log2 units; +inf for rows that see
nothing, which makes their P -- and so their gradients -- exactly 0).  The dropout keep-mask is
read from the words the forward stored (KeepBits) or regenerated from its Philox seed/offset.
With Ph = head_mask * dropout(P):
    dV = Phᵀ dO,   dP = head_mask * dropout(dO Vᵀ),   dS = P ∘ (dP - rowsum(dO ∘ O)),
    dQ = scale · dS K,   dK = scale · dSᵀ Q.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, base_ptr, dropout_grads,
                            load_rows, mask_scores, mma, program_prologue, rel_bias_add, rel_bias_grad, tile_keep)


# ---------------------------------------------------------------------------- dK, dV


@triton.jit
def _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, qdo, stats, msk, kv_lo, kv_hi, geom, scales, drop,
               keep_base, stride_kw, dq_base, dq_strides, rel, grads,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
               CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr):
    """One query tile's contribution to dK, dV (and with a dq_base, the single pass, to dQ), computed
    transposed ([BLOCK_N, BLOCK_M]) so that no register tile has to be transposed before the dK/dV
    dots.  qdo: (q_base, do_base, stride_qm, stride_qd, stride_dom, stride_dod); stats: (lse_base,
    delta_base); geom: (Sq, Sk, D, causal_offset, band_lo); scales: (qk_scale, grad_scale,
    sm_scale); keep_base: the stored keep-mask words or None; dq_strides: dQacc's (row, dim)."""
    q_base, do_base, stride_qm, stride_qd, stride_dom, stride_dod = qdo
    lse_base, delta_base = stats
    Sq, Sk, D, causal_offset, band_lo = geom
    qk_scale, grad_scale, sm_scale = scales
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
    sT = mma(k, qT, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32))
    sT = rel_bias_add(sT, mi, ni, rel, REL_BIAS=REL_BIAS) * qk_scale
    sT = mask_scores(sT, mi, ni, msk, kv_lo, kv_hi, geom, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL,
                     LOAD_MASK=LOAD_MASK)
    pT = tl.math.exp2(sT - lse[None, :])            # lse = +inf on rows that see nothing -> 0
    dpT = mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32))
    # (BLOCK_M may be < 32 here: the tile then starts inside a word, at bit start_m % 32)
    keep = 0
    if DROPOUT:
        keep_ptr = keep_base
        if keep_base is not None:
            keep_ptr = keep_base + (start_m // 32) * stride_kw
        keep = tile_keep(drop, keep_ptr, stride_kw, start_m % 32, offs_m, offs_n, Sk, TRANSPOSED=True,
                         CHECK_COLS=False)
    phT, dsT = dropout_grads(pT, dpT, delta[None, :], grad_scale, keep, DROPOUT=DROPOUT)
    dv = mma(phT.to(do.dtype), do, dv)
    rel_bias_grad(dsT, mi, ni, grads, rel, sm_scale, REL_GRAD=REL_GRAD)
    dsT = dsT.to(qT.dtype)
    dk = mma(dsT, tl.trans(qT), dk)
    if dq_base is not None:
        dq = mma(tl.trans(dsT), k, tl.zeros([BLOCK_M, k.shape[1]], dtype=tl.float32)) * sm_scale
        q_ok = offs_m[:, None] < Sq
        if not EVEN_D:
            q_ok = q_ok & (offs_d[None, :] < D)
        tl.atomic_add(dq_base + offs_m[:, None] * dq_strides[0] + offs_d[None, :] * dq_strides[1], dq, mask=q_ok,
                      sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, qdo, stats, msk, kv_lo, kv_hi, geom,
                scales, drop, keep_base, stride_kw, dq_base, dq_strides, rel, grads,
                BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr):
    """Query tiles [q_lo, q_mid) straddle the causal diagonal (the band's right edge); [q_mid, q_safe_end)
    see the whole key tile; [q_safe_end, q_hi) straddle the band's left edge (empty without a band:
    q_safe_end = q_hi = Sq)."""
    for start_m in range(q_lo, q_mid, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, qdo, stats, msk, kv_lo, kv_hi, geom, scales, drop,
                            keep_base, stride_kw, dq_base, dq_strides, rel, grads,
                            REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    for start_m in range(q_mid, q_safe_end, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, qdo, stats, msk, kv_lo, kv_hi, geom, scales, drop,
                            keep_base, stride_kw, dq_base, dq_strides, rel, grads,
                            REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=False,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    for start_m in range(q_safe_end, q_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, qdo, stats, msk, kv_lo, kv_hi, geom, scales, drop,
                            keep_base, stride_kw, dq_base, dq_strides, rel, grads,
                            REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL,
                            LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
    return dk, dv


@triton.jit
def _dkdv_list(dk, dv, k, v, Count, Index, offs_n, offs_d, qdo, stats, msk, geom, scales, drop,
               keep_base, stride_kw, dq_base, dq_strides, rel, grads,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
               DROPOUT: tl.constexpr, REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr):
    """The query blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all.  With the band (CAUSAL == BAND) the blocks outside
    it are skipped and every visited one checks it."""
    Sq, Sk, D, causal_offset, band_lo = geom
    n_blocks = tl.load(Count)
    start_n = tl.min(offs_n, axis=0)
    for i in range(0, n_blocks):
        start_m = tl.load(Index + i) * BLOCK_M
        if (start_n < start_m + BLOCK_M + causal_offset) & (start_n + offs_n.shape[0] > start_m + band_lo):
            dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, offs_d, qdo, stats, msk, 0, Sk, geom, scales, drop,
                                keep_base, stride_kw, dq_base, dq_strides, rel, grads,
                                REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                                BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                                CAUSAL=CAUSAL if (PARTIAL or CAUSAL == 2) else False,
                                LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE, DROPOUT=DROPOUT)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    # each tensor's (batch, head, row, dim) strides
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    # (H, Sq, Sk, D); (scale · log2(e), scale); the rest as in triton_fwd.attn_fwd_kernel
    sizes, scales, band, seqs, lse_strides, mask, key_range,
    # MASK_BLOCKS: for every key block, its PARTIAL and FULL query blocks (BlockMap.transposed_lists()),
    # as (PartCount, PartIndex, FullCount, FullIndex, stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in)
    blocks,
    head_mask,
    # (KeepBits, stride_kbh, stride_kw): the forward's keep-mask words; KeepBits None: regenerated
    keep,
    # (DQacc, stride_aqb, stride_aqh, stride_aqm, stride_aqd): the fp32 dQ to add into (the single
    # pass); DQacc None: dQ is the dQ kernel's
    dq_acc,
    dropout,
    # REL_BIAS: DeBERTa's tables and index (triton_fwd.attn_fwd_kernel); REL_GRAD: (DC2P, DP2C), the
    # fp32 table gradients this kernel adds into (dp2c; dc2p too in the single pass), laid out like the tables
    rel, rel_grads,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    REL_BIAS: tl.constexpr, REL_GRAD: tl.constexpr,
):
    H, Sq, Sk, D = sizes
    qk_scale, sm_scale = scales
    Rng, dropout_p, dropout_scale = dropout
    (bh, b, h, seed, rng_offset, start_n, offs_n, offs_d, b64, h64, hk64, q0, k0, seq_q, seq_k, causal_offset,
     band_lo) = \
        program_prologue(sizes, band, seqs, Rng, BLOCK=BLOCK_N, BLOCK_D=BLOCK_D, VARLEN=VARLEN, DROPOUT=DROPOUT)
    pid_n = tl.program_id(0)
    qdo = (base_ptr(Q, q_strides, b64, h64, q0), base_ptr(DO, do_strides, b64, h64, q0),
           q_strides[2], q_strides[3], do_strides[2], do_strides[3])
    Mask, stride_mb, stride_mh, stride_mm, stride_mn = mask
    msk = (Mask + b64 * stride_mb + h64 * stride_mh, stride_mm, stride_mn)
    stats = (Lse + b64 * lse_strides[0] + h64 * lse_strides[1] + q0,
             Delta + b64 * lse_strides[0] + h64 * lse_strides[1] + q0)
    KeepBits, stride_kbh, stride_kw = keep
    keep_base = KeepBits
    if KeepBits is not None:
        keep_base = KeepBits + bh.to(tl.int64) * stride_kbh
    DQacc, stride_aqb, stride_aqh, stride_aqm, stride_aqd = dq_acc
    dq_base = DQacc
    if DQacc is not None:
        dq_base = DQacc + b64 * stride_aqb + h64 * stride_aqh + q0 * stride_aqm
    C2P, P2C, RelIndex, stride_rcb, stride_rch, stride_rcm, stride_rpb, stride_rph, stride_rpn, rel_P = rel
    DC2P, DP2C = rel_grads
    c2p_off = b64 * stride_rcb + h64 * stride_rch + q0 * stride_rcm
    p2c_off = b64 * stride_rpb + h64 * stride_rph + k0 * stride_rpn
    rel_t = (C2P + c2p_off, P2C + p2c_off, stride_rcm, stride_rpn, RelIndex + (Sk - 1), rel_P, seq_q, seq_k)
    grads = (DC2P + c2p_off, DP2C + p2c_off)
    k = load_rows(K + b64 * k_strides[0] + hk64 * k_strides[1] + (k0 + offs_n[:, None]) * k_strides[2]
                  + offs_d[None, :] * k_strides[3], offs_n, seq_k, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    v = load_rows(V + b64 * v_strides[0] + hk64 * v_strides[1] + (k0 + offs_n[:, None]) * v_strides[2]
                  + offs_d[None, :] * v_strides[3], offs_n, seq_k, offs_d, D, CHECK_ROWS=True, EVEN_D=EVEN_D)
    grad_scale = 1.0
    if DROPOUT:
        grad_scale = grad_scale * dropout_scale
    HeadMask, stride_hb, stride_hh = head_mask
    if HeadMask is not None:
        grad_scale = grad_scale * tl.load(HeadMask + b * stride_hb + h * stride_hh).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # (the tiles see the sequence's query count as Sq)
    geom = (seq_q, Sk, D, causal_offset, band_lo)
    tscales = (qk_scale, grad_scale, sm_scale)
    drop = (seed, rng_offset, bh, dropout_p)
    dq_st = (stride_aqm, stride_aqd)

    if MASK_MODE == MASK_BLOCKS:
        PartCount, PartIndex, FullCount, FullIndex, stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in = \
            blocks
        cnt = b * stride_cb + h * stride_ch + pid_n * stride_cn
        idx = b * stride_ib + h * stride_ih + pid_n * stride_in
        dk, dv = _dkdv_list(dk, dv, k, v, PartCount + cnt, PartIndex + idx, offs_n, offs_d, qdo, stats, msk, geom,
                            tscales, drop, keep_base, stride_kw, dq_base, dq_st, rel_t, grads,
                            REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT)
        dk, dv = _dkdv_list(dk, dv, k, v, FullCount + cnt, FullIndex + idx, offs_n, offs_d, qdo, stats, msk, geom,
                            tscales, drop, keep_base, stride_kw, dq_base, dq_st, rel_t, grads,
                            REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                            BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT)
    else:
        lo = 0
        hi = seq_k
        needs_mask = 0
        if MASK_MODE == MASK_KEYS:
            KeyStart, KeyEnd, KeyNeedsMask = key_range
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
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, qdo, stats, msk,
                                     lo, hi, geom, tscales, drop, keep_base, stride_kw, dq_base, dq_st, rel_t, grads,
                                     REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT)
            elif edge:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, qdo, stats, msk,
                                     lo, hi, geom, tscales, drop, keep_base, stride_kw, dq_base, dq_st, rel_t, grads,
                                     REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)
            else:
                dk, dv = _dkdv_range(dk, dv, k, v, q_lo, q_mid, q_safe_end, q_hi, offs_n, offs_d, qdo, stats, msk,
                                     lo, hi, geom, tscales, drop, keep_base, stride_kw, dq_base, dq_st, rel_t, grads,
                                     REL_BIAS=REL_BIAS, REL_GRAD=REL_GRAD,
                                     BLOCK_M=BLOCK_M, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=CAUSAL,
                                     LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)

    dk = dk * sm_scale
    n_ok = offs_n[:, None] < seq_k
    if not EVEN_D:
        n_ok = n_ok & (offs_d[None, :] < D)
    rows = k0 + offs_n[:, None]
    tl.store(DK + b64 * dk_strides[0] + h64 * dk_strides[1] + rows * dk_strides[2] + offs_d[None, :] * dk_strides[3],
             dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + b64 * dv_strides[0] + h64 * dv_strides[1] + rows * dv_strides[2] + offs_d[None, :] * dv_strides[3],
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
