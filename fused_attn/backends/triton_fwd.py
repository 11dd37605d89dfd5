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

from .triton_common import (LOAD_NONE, LOAD_ROW, LOAD_TILE, MASK_BLOCKS, MASK_KEYS, base_ptr, dropout_keep,
                            dropout_keep_store, kv_loop_bounds, load_rows, mask_scores, mma,
                            program_prologue, rel_bias_add)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d, kv, msk, kv_lo, kv_hi, geom, qk_scale, drop,
              keep_ptr, stride_kw, rel,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
              CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, REL_BIAS: tl.constexpr):
    """One key tile: scores, masking, online-softmax update, P @ V.  kv: (k_base, v_base, stride_kn,
    stride_kd, stride_vn, stride_vd); geom: (Sq, Sk, D, causal_offset, band_lo); drop: (seed,
    rng_offset, bh, dropout_p); keep_ptr: the keep-mask words to store, or None; rel: see
    triton_common.rel_bias_add."""
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd = kv
    Sq, Sk, D, causal_offset, band_lo = geom
    seed, rng_offset, bh, dropout_p = drop
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                  offs_n, kv_hi, offs_d, D, CHECK_ROWS=CHECK_BOUNDS, EVEN_D=EVEN_D)
    # -- scores (plus DeBERTa's relative-position terms), in log2 units
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
    s = rel_bias_add(s, offs_m[:, None], offs_n[None, :], rel, REL_BIAS=REL_BIAS) * qk_scale
    s = mask_scores(s, offs_m[:, None], offs_n[None, :], msk, kv_lo, kv_hi, geom,
                    CHECK_BOUNDS=CHECK_BOUNDS, CAUSAL=CAUSAL, LOAD_MASK=LOAD_MASK)
    # -- online softmax (a row with nothing visible so far keeps m = -inf and l = 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        if keep_ptr is not None:   # also stored for the backward, which then reads bits instead of running Philox twice
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
def _fwd_range(acc, l_i, m_i, visited, q, lo, safe_lo, safe_hi, hi, offs_m, offs_d, kv, msk, geom, qk_scale, drop,
               keep_ptr, stride_kw, rel,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
               LOAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, REL_BIAS: tl.constexpr):
    """Keys [lo, hi): the tiles before safe_lo (the band's left edge), the interior tiles
    [safe_lo, safe_hi) unchecked, then the edge / diagonal tiles."""
    for start_n in range(lo, safe_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d, kv, msk, lo, hi, geom, qk_scale, drop,
                                  keep_ptr, stride_kw, rel,
                                  REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                  LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
        visited += 1
    for start_n in range(safe_lo, safe_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d, kv, msk, lo, hi, geom, qk_scale, drop,
                                  keep_ptr, stride_kw, rel,
                                  REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=False, CAUSAL=False,
                                  LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
        visited += 1
    for start_n in range(safe_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d, kv, msk, lo, hi, geom, qk_scale, drop,
                                  keep_ptr, stride_kw, rel,
                                  REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=True, CAUSAL=CAUSAL,
                                  LOAD_MASK=LOAD_MASK, DROPOUT=DROPOUT)
        visited += 1
    return acc, l_i, m_i, visited


@triton.jit
def _fwd_list(acc, l_i, m_i, visited, q, Count, Index, offs_m, offs_d, kv, msk, geom, qk_scale, drop,
              keep_ptr, stride_kw, rel,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
              PARTIAL: tl.constexpr, DROPOUT: tl.constexpr, REL_BIAS: tl.constexpr):
    """The key blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all.  With the band (CAUSAL == BAND) the blocks outside
    it are skipped and every visited one checks it."""
    Sq, Sk, D, causal_offset, band_lo = geom
    n_blocks = tl.load(Count)
    start_m = tl.min(offs_m, axis=0)
    for i in range(0, n_blocks):
        start_n = tl.load(Index + i) * BLOCK_N
        # (always true without a band: the block map holds causal, and causal_offset / band_lo reach
        # past every key otherwise)
        if (start_n < start_m + offs_m.shape[0] + causal_offset) & (start_n + BLOCK_N > start_m + band_lo):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d, kv, msk, 0, Sk, geom, qk_scale, drop,
                                      keep_ptr, stride_kw, rel,
                                      REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CHECK_BOUNDS=PARTIAL,
                                      CAUSAL=CAUSAL if (PARTIAL or CAUSAL == 2) else False,
                                      LOAD_MASK=LOAD_TILE if PARTIAL else LOAD_NONE, DROPOUT=DROPOUT)
            visited += 1
    return acc, l_i, m_i, visited


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, Stats,
    # each tensor's (batch, head, row, dim) strides
    q_strides, k_strides, v_strides, o_strides,
    # (H, Sq, Sk, D); the scale times log2(e)
    sizes, qk_scale,
    # (kv_group, win_left, win_right): grouped-query: query head h reads k / v head h // kv_group;
    # the band's (left, right) reach (window_size; CAUSAL == BAND) or the causal diagonal's
    # (right 0), past every key when unbounded
    band,
    # packed batches (VARLEN): (CuSeqQ, CuSeqK, Tq, Tk), cu_seqlens [B + 1] and the packed lengths;
    # Sq / Sk are then the max_seqlens, the batch strides 0.  Lse: [B, H, Sq] or [H, Tq] via
    # lse_strides (batch, head)
    seqs, lse_strides,
    # (Mask, stride_mb, stride_mh, stride_mm, stride_mn): mask values, 4D [Bm, Hm, Sqm, Sk] with
    # stride 0 on broadcast dims: uint8 visibility or float additive values
    mask,
    # MASK_KEYS: (KeyStart, KeyEnd, KeyNeedsMask), per-batch [start, end) and "the row must load
    # its mask values" flags
    key_range,
    # MASK_BLOCKS: (PartCount, PartIndex, FullCount, FullIndex, stride_cb, stride_ch, stride_cm,
    # stride_ib, stride_ih, stride_im), lists of PARTIAL and FULL key blocks of every query block
    blocks,
    # (HeadMask, stride_hb, stride_hh); HeadMask None: no head mask
    head_mask,
    # (KeepBits, stride_kbh, stride_kw): the keep-mask words [B, H, rows, cols] to write
    # (triton_common.KEEP_PAD); KeepBits None: not stored
    keep,
    # (Rng, dropout_p, dropout_scale)
    dropout,
    # REL_BIAS: (C2P, P2C, RelIndex, stride_rcb, stride_rch, stride_rcm, stride_rpb, stride_rph,
    # stride_rpn, rel_P): DeBERTa's tables c2p [B, H, Sq, P] / p2c [B, H, Sk, P] (packed:
    # [T, H, P]; unit column stride) and the index [Sq + Sk - 1] (triton_common.rel_bias_add)
    rel,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WRITE_STATS: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, REL_BIAS: tl.constexpr,
):
    H, Sq, Sk, D = sizes
    Rng, dropout_p, dropout_scale = dropout
    (bh, b, h, seed, rng_offset, start_m, offs_m, offs_d, b64, h64, hk64, q0, k0, seq_q, seq_k, causal_offset,
     band_lo) = \
        program_prologue(sizes, band, seqs, Rng, BLOCK=BLOCK_M, BLOCK_D=BLOCK_D, VARLEN=VARLEN, DROPOUT=DROPOUT)
    pid_m = tl.program_id(0)
    q_base = base_ptr(Q, q_strides, b64, h64, q0)
    kv = (base_ptr(K, k_strides, b64, hk64, k0), base_ptr(V, v_strides, b64, hk64, k0),
          k_strides[2], k_strides[3], v_strides[2], v_strides[3])
    Mask, stride_mb, stride_mh, stride_mm, stride_mn = mask
    msk = (Mask + b64 * stride_mb + h64 * stride_mh, stride_mm, stride_mn)
    KeepBits, stride_kbh, stride_kw = keep
    keep_ptr = KeepBits
    if KeepBits is not None:
        keep_ptr = KeepBits + bh.to(tl.int64) * stride_kbh + (start_m // 32) * stride_kw
    C2P, P2C, RelIndex, stride_rcb, stride_rch, stride_rcm, stride_rpb, stride_rph, stride_rpn, rel_P = rel
    rel_t = (C2P + b64 * stride_rcb + h64 * stride_rch + q0 * stride_rcm,
             P2C + b64 * stride_rpb + h64 * stride_rph + k0 * stride_rpn,
             stride_rcm, stride_rpn, RelIndex + (Sk - 1), rel_P, seq_q, seq_k)
    geom = (Sq, Sk, D, causal_offset, band_lo)
    drop = (seed, rng_offset, bh, dropout_p)

    q = load_rows(q_base + offs_m[:, None] * q_strides[2] + offs_d[None, :] * q_strides[3], offs_m, seq_q, offs_d, D,
                  CHECK_ROWS=True, EVEN_D=EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = 0

    if MASK_MODE == MASK_BLOCKS:
        # -- general mask: the listed PARTIAL key blocks, then the FULL ones; empty ones never
        # (stride_cm / stride_im are 0 when the mask is the same for every query block)
        PartCount, PartIndex, FullCount, FullIndex, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im = \
            blocks
        cnt = b * stride_cb + h * stride_ch + pid_m * stride_cm
        idx = b * stride_ib + h * stride_ih + pid_m * stride_im
        acc, l_i, m_i, visited = _fwd_list(
            acc, l_i, m_i, visited, q, PartCount + cnt, PartIndex + idx, offs_m, offs_d, kv, msk, geom, qk_scale,
            drop, keep_ptr, stride_kw, rel_t,
            REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=True, DROPOUT=DROPOUT)
        acc, l_i, m_i, visited = _fwd_list(
            acc, l_i, m_i, visited, q, FullCount + cnt, FullIndex + idx, offs_m, offs_d, kv, msk, geom, qk_scale,
            drop, keep_ptr, stride_kw, rel_t,
            REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, PARTIAL=False, DROPOUT=DROPOUT)
    else:
        # -- no mask / key padding: loop bounds from the key range and causal
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
        if needs_mask != 0:     # holes or additive values inside the range: load the row's mask
            acc, l_i, m_i, visited = _fwd_range(
                acc, l_i, m_i, visited, q, lo, safe_lo, safe_hi, hi, offs_m, offs_d, kv, msk, geom, qk_scale, drop,
                keep_ptr, stride_kw, rel_t,
                REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_ROW, DROPOUT=DROPOUT)
        else:
            acc, l_i, m_i, visited = _fwd_range(
                acc, l_i, m_i, visited, q, lo, safe_lo, safe_hi, hi, offs_m, offs_d, kv, msk, geom, qk_scale, drop,
                keep_ptr, stride_kw, rel_t,
                REL_BIAS=REL_BIAS, BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, CAUSAL=CAUSAL, LOAD_MASK=LOAD_NONE, DROPOUT=DROPOUT)

    # -- epilogue: normalise; rows that saw nothing give exactly 0 and lse = +inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if DROPOUT:
        out_scale = out_scale * dropout_scale
    HeadMask, stride_hb, stride_hh = head_mask
    if HeadMask is not None:
        out_scale = out_scale * tl.load(HeadMask + b * stride_hb + h * stride_hh).to(tl.float32)
    acc = acc * out_scale[:, None]
    o_ptrs = (Out + b64 * o_strides[0] + h64 * o_strides[1] + (q0 + offs_m[:, None]) * o_strides[2]
              + offs_d[None, :] * o_strides[3])
    if EVEN_D:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < seq_q)
    else:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < D))
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(Lse + b64 * lse_strides[0] + h64 * lse_strides[1] + q0 + offs_m, lse, mask=offs_m < seq_q)
    if WRITE_STATS:
        tl.store(Stats + bh * tl.cdiv(Sq, BLOCK_M) + pid_m, visited)
