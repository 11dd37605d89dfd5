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

LOG2E = 1.4426950408889634
HIDDEN = tl.constexpr(-1.0e4)   # masks.HIDDEN_THRESHOLD


@triton.jit
def _dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, TRANSPOSED: tl.constexpr):
    """Keep-mask of the tile of query rows offs_m (consecutive, from a multiple of 4) and keys
    offs_n: [M, N], or [N, M] when TRANSPOSED.  Philox-4x32-10 with key = seed (two 31-bit
    halves) and counter = ((row // 4) * Sk + col, batch * H + head, torch's offset as two 31-bit
    halves); element (row, col) takes output word row % 4, so one Philox call serves four rows.
    A function of the element's position only: the backward regenerates it, and the C++ kernels
    (csrc/philox.h) draw the same mask.  Keep iff uniform >= dropout_p."""
    G: tl.constexpr = offs_m.shape[0] // 4
    group = tl.min(offs_m, axis=0) // 4 + tl.arange(0, G)
    if TRANSPOSED:
        c0 = (group[None, :] * Sk + offs_n[:, None]).to(tl.uint32)     # [N, G]
    else:
        c0 = (group[:, None] * Sk + offs_n[None, :]).to(tl.uint32)     # [G, N]
    zero = tl.zeros_like(c0)
    # scalars may arrive as int32, int64 or constexpr: combine them with a tensor before casting
    c1 = (zero + bh).to(tl.uint32)
    c2 = (zero + (rng_offset & 0x7FFFFFFF)).to(tl.uint32)
    c3 = (zero + ((rng_offset >> 31) & 0x7FFFFFFF)).to(tl.uint32)
    k0 = (zero + (seed & 0x7FFFFFFF)).to(tl.uint32)
    k1 = (zero + ((seed >> 31) & 0x7FFFFFFF)).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    # tl.join stacks on a new last axis: r[..., f, e] = word 2 f + e, so after the reshape the
    # element 4 * group + 2 f + e takes word 2 f + e, i.e. word (its index) % 4
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    if TRANSPOSED:
        r = tl.reshape(r, [offs_n.shape[0], 4 * G])                               # col 4 * group + word
    else:
        r = tl.reshape(tl.permute(r, (0, 2, 3, 1)), [4 * G, offs_n.shape[0]])     # row 4 * group + word
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation.  IEEE: exact fp32 products for fp32 inputs (no tf32).
    UPCAST: bf16 operands go through fp32 -- Triton 3.8's interpreter mis-multiplies bf16 dots."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def load_rows(ptrs, rows, n_rows, offs_d, D, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking rows >= n_rows (if CHECK_ROWS) and cols >= D."""
    if CHECK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


# LOAD_MASK values: which part of the mask a score tile loads
MASK_ROW: tl.constexpr = tl.constexpr(1)    # one row per tile (key-padding masks, MASK_MODE 1)
MASK_TILE: tl.constexpr = tl.constexpr(2)   # the whole tile (general masks, MASK_MODE 2)


@triton.jit
def apply_mask_tile(s, mi, ni, mask_ptr, stride_mm, stride_mn, Sq, Sk, MASK_ADDITIVE: tl.constexpr):
    """Load one mask tile and apply it to log2-scores (hidden -> -inf).  mi / ni: query / key
    indices broadcastable to s (offs_m[:, None] and offs_n[None, :], or transposed)."""
    in_b = (mi < Sq) & (ni < Sk)
    mv = tl.load(mask_ptr + (mi * stride_mm + ni * stride_mn), mask=in_b, other=0)
    if MASK_ADDITIVE:
        mv = mv.to(tl.float32)
        return tl.where(mv > HIDDEN, s + mv * 1.4426950408889634, float("-inf"))
    return tl.where(mv != 0, s, float("-inf"))


@triton.jit
def mask_scores(s, mi, ni, mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, causal_offset,
                CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr,
                MASK_ADDITIVE: tl.constexpr):
    """All masking of one score tile: the mask (LOAD_MASK: 0 none, MASK_ROW or MASK_TILE), keys
    outside [kv_lo, kv_hi) (CHECK_BOUNDS) and keys right of the causal diagonal (CAUSAL)."""
    if LOAD_MASK == MASK_ROW:
        # a key-padding mask is the same for every query: load one row and broadcast it (a full
        # tile of 64-bit addresses made the compiler spill)
        s = apply_mask_tile(s, 0, ni, mask_ptr, 0, stride_mn, Sq, Sk, MASK_ADDITIVE)
    elif LOAD_MASK == MASK_TILE:
        s = apply_mask_tile(s, mi, ni, mask_ptr, stride_mm, stride_mn, Sq, Sk, MASK_ADDITIVE)
    if CHECK_BOUNDS:
        s = tl.where((ni < kv_hi) & (ni >= kv_lo), s, float("-inf"))
    if CAUSAL:
        s = tl.where(ni <= mi + causal_offset, s, float("-inf"))
    return s


@triton.jit
def kv_loop_bounds(start_m, lo, hi, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """Key loop of a query block starting at start_m over visible keys [lo, hi): returns
    (safe_hi, hi): tiles in [lo, safe_hi) need no bounds or causal masking, [safe_hi, hi) do."""
    safe_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N            # tiles wholly inside [lo, hi)
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
        # keys <= start_m + causal_offset are visible to every row of the block
        free = tl.maximum(start_m + causal_offset + 1 - lo, 0)
        safe_hi = tl.minimum(safe_hi, lo + (free // BLOCK_N) * BLOCK_N)
    safe_hi = tl.maximum(safe_hi, lo)
    return safe_hi, hi


@triton.jit
def seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN: tl.constexpr):
    """(q0, k0, seq_q, seq_k): the first row and the length of sequence b's queries and keys.
    Padded batches: (0, 0, Sq, Sk).  Packed batches (VARLEN): rows [cu[b], cu[b + 1]) of the
    [T, H, D] tensors, clamped to [0, T], lengths capped at max_seqlen (Sq / Sk): whatever
    cu_seqlens hold, no program reads or writes outside its tensors."""
    if VARLEN:
        q0 = tl.minimum(tl.maximum(tl.load(CuSeqQ + b), 0), Tq)
        q1 = tl.minimum(tl.maximum(tl.load(CuSeqQ + b + 1), q0), Tq)
        k0 = tl.minimum(tl.maximum(tl.load(CuSeqK + b), 0), Tk)
        k1 = tl.minimum(tl.maximum(tl.load(CuSeqK + b + 1), k0), Tk)
        seq_q = tl.minimum(q1 - q0, Sq)
        seq_k = tl.minimum(k1 - k0, Sk)
        q0 = q0.to(tl.int64)
        k0 = k0.to(tl.int64)
    else:
        q0 = 0
        k0 = 0
        seq_q = Sq
        seq_k = Sk
    return q0, k0, seq_q, seq_k


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
              k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi, Sq, Sk, D, causal_offset, qk_scale,
              seed, rng_offset, bh, dropout_p,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
              CAUSAL: tl.constexpr, LOAD_MASK: tl.constexpr, MASK_ADDITIVE: tl.constexpr,
              DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile: scores, masking, online-softmax update, P @ V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                  offs_n, kv_hi, offs_d, D, CHECK_BOUNDS, EVEN_D)
    # -- scores, in log2 units
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE, UPCAST) * qk_scale
    s = mask_scores(s, offs_m[:, None], offs_n[None, :], mask_ptr, stride_mm, stride_mn, kv_lo, kv_hi,
                    Sq, Sk, causal_offset, CHECK_BOUNDS, CAUSAL, LOAD_MASK, MASK_ADDITIVE)
    # -- online softmax (a row with nothing visible so far keeps m = -inf and l = 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, False)
        p = tl.where(keep, p, 0.0)
    v = load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                  offs_n, kv_hi, offs_d, D, CHECK_BOUNDS, EVEN_D)
    acc = mma(p.to(v.dtype), v, acc, IEEE, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _fwd_range(acc, l_i, m_i, visited, q, lo, safe_hi, hi, offs_m, offs_d,
               k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               mask_ptr, stride_mm, stride_mn, Sq, Sk, D, causal_offset, qk_scale,
               seed, rng_offset, bh, dropout_p,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
               LOAD_MASK: tl.constexpr, MASK_ADDITIVE: tl.constexpr, DROPOUT: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Keys [lo, hi): interior tiles [lo, safe_hi) unchecked, then the edge / diagonal tiles."""
    for start_n in range(lo, safe_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D, causal_offset, qk_scale,
                                  seed, rng_offset, bh, dropout_p, BLOCK_N, EVEN_D, False, False,
                                  LOAD_MASK, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)
        visited += 1
    for start_n in range(safe_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  mask_ptr, stride_mm, stride_mn, lo, hi, Sq, Sk, D, causal_offset, qk_scale,
                                  seed, rng_offset, bh, dropout_p, BLOCK_N, EVEN_D, True, CAUSAL,
                                  LOAD_MASK, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)
        visited += 1
    return acc, l_i, m_i, visited


@triton.jit
def _fwd_list(acc, l_i, m_i, visited, q, Count, Index, offs_m, offs_d,
              k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              mask_ptr, stride_mm, stride_mn, Sq, Sk, D, causal_offset, qk_scale,
              seed, rng_offset, bh, dropout_p,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
              PARTIAL: tl.constexpr, MASK_ADDITIVE: tl.constexpr, DROPOUT: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """The key blocks listed at Index[0:Count]: PARTIAL ones load the mask tile and check bounds
    and causal; FULL ones do no masking at all."""
    n_blocks = tl.load(Count)
    for i in range(0, n_blocks):
        start_n = tl.load(Index + i) * BLOCK_N
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, offs_m, offs_d,
                                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  mask_ptr, stride_mm, stride_mn, 0, Sk, Sq, Sk, D, causal_offset, qk_scale,
                                  seed, rng_offset, bh, dropout_p, BLOCK_N, EVEN_D, PARTIAL, PARTIAL and CAUSAL,
                                  PARTIAL * MASK_TILE, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)
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
    # packed batches (VARLEN): cu_seqlens [B + 1] and the packed lengths; Sq / Sk are then the
    # max_seqlens, the batch strides 0.  Lse / Delta: [B, H, Sq] or [H, Tq] via these strides
    CuSeqQ, CuSeqK, Tq, Tk, stride_lb, stride_lh,
    # mask values, 4D [Bm, Hm, Sqm, Sk] with stride 0 on broadcast dims
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    # MASK_MODE 1 ("keys"): per-batch [start, end) and "row must be loaded" flags
    KeyStart, KeyEnd, KeyNeedsMask,
    # MASK_MODE 2 ("blocks"): lists of PARTIAL and FULL key blocks of every query block
    PartCount, PartIndex, FullCount, FullIndex,
    stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    HeadMask, stride_hb, stride_hh,
    seed, rng_offset, dropout_p,
    MASK_MODE: tl.constexpr, MASK_ADDITIVE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr, DROPOUT: tl.constexpr, WRITE_STATS: tl.constexpr, VARLEN: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    # per-(sequence, head) bases: a packed batch differs only in q0 / k0 and the lengths
    q0, k0, seq_q, seq_k = seq_bounds(b, CuSeqQ, CuSeqK, Sq, Sk, Tq, Tk, VARLEN)
    causal_offset = seq_k - seq_q
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm
    k_base = K + b64 * stride_kb + h64 * stride_kh + k0 * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k0 * stride_vn
    mask_ptr = Mask + b64 * stride_mb + h64 * stride_mh

    q = load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, seq_q, offs_d, D,
                  True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = 0

    if MASK_MODE == 2:
        # -- general mask: the listed PARTIAL key blocks, then the FULL ones; empty ones never
        # (stride_cm / stride_im are 0 when the mask is the same for every query block)
        cnt = b * stride_cb + h * stride_ch + pid_m * stride_cm
        idx = b * stride_ib + h * stride_ih + pid_m * stride_im
        acc, l_i, m_i, visited = _fwd_list(
            acc, l_i, m_i, visited, q, PartCount + cnt, PartIndex + idx, offs_m, offs_d,
            k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
            Sq, Sk, D, causal_offset, qk_scale, seed, rng_offset, bh, dropout_p,
            BLOCK_N, EVEN_D, CAUSAL, True, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)
        acc, l_i, m_i, visited = _fwd_list(
            acc, l_i, m_i, visited, q, FullCount + cnt, FullIndex + idx, offs_m, offs_d,
            k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
            Sq, Sk, D, causal_offset, qk_scale, seed, rng_offset, bh, dropout_p,
            BLOCK_N, EVEN_D, CAUSAL, False, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)
    else:
        # -- no mask / key padding: loop bounds from the key range and causal
        lo = 0
        hi = seq_k
        dense = 0
        if MASK_MODE == 1:
            lo = tl.load(KeyStart + b)
            hi = tl.load(KeyEnd + b)
            dense = tl.load(KeyNeedsMask + b)
        if VARLEN:      # query blocks past the end of a shorter sequence visit no key
            hi = tl.where(start_m < seq_q, hi, 0)
        safe_hi, hi = kv_loop_bounds(start_m, lo, hi, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
        if dense != 0:      # holes or additive values inside the range: load the row's mask
            acc, l_i, m_i, visited = _fwd_range(
                acc, l_i, m_i, visited, q, lo, safe_hi, hi, offs_m, offs_d,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
                Sq, Sk, D, causal_offset, qk_scale, seed, rng_offset, bh, dropout_p,
                BLOCK_N, EVEN_D, CAUSAL, MASK_ROW, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)
        else:
            acc, l_i, m_i, visited = _fwd_range(
                acc, l_i, m_i, visited, q, lo, safe_hi, hi, offs_m, offs_d,
                k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
                Sq, Sk, D, causal_offset, qk_scale, seed, rng_offset, bh, dropout_p,
                BLOCK_N, EVEN_D, CAUSAL, 0, MASK_ADDITIVE, DROPOUT, IEEE, UPCAST)

    # -- epilogue: normalise; rows that saw nothing give exactly 0 and lse = +inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
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
