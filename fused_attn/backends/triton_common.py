"""@triton.jit helpers shared by the forward (triton_fwd.py) and backward (triton_bwd*.py) kernels:
tile loads, dots, masking of a score tile, key-loop bounds, packed-sequence bounds, Philox dropout.

Conventions that keep a change to the kernels cheap and safe:
- Every tl.constexpr is passed by keyword at every call site (``CAUSAL=CAUSAL, LOAD_MASK=LOAD_TILE``):
  two swapped flags are an error, not a silently different kernel.  Runtime arguments stay
  positional, in the callee's order.
- What the dtypes decide is derived in the kernels, not passed as flags: fp32 dots multiply
  exactly (``mma``), a float mask is additive (``apply_mask_tile``).
- Arguments travel in groups, as tuples: a tensor's strides ``(batch, head, row, dim)``, the sizes
  ``(H, Sq, Sk, D)``, the packed-sequence bounds, the mask, the block lists, dropout...  A kernel
  takes ~30 parameters instead of ~90, and a new feature adds a group, not ten parameters
  (Triton >= 3.3 compiles tuple arguments and tuples passed on to helpers; the package needs it).
  Unpack a group where its values are used (``H, Sq, Sk, D = sizes``).
- An optional tensor that only switches a feature on (head mask, stored keep-bits, the atomic dQ
  buffer) is ``None`` when unused: Triton makes a None argument a compile-time constant, so
  ``if KeepBits is not None`` selects the kernel variant as a constexpr flag would, with no dummy
  tensor.  A None may travel to a helper as a plain argument, but never inside a tuple built in a
  kernel (Triton's compiler cannot type a None tuple element): such pointers are passed alone.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
HIDDEN = tl.constexpr(-1.0e4)   # masks.HIDDEN_THRESHOLD

# MASK_MODE: the form of the reduced mask (masks.ReducedMask.kind); one kernel variant each
MASK_NONE: tl.constexpr = tl.constexpr(0)     # no mask: key loop bounds from the sequence and causal
MASK_KEYS: tl.constexpr = tl.constexpr(1)     # per-batch key range [KeyStart, KeyEnd) + KeyNeedsMask
MASK_BLOCKS: tl.constexpr = tl.constexpr(2)   # lists of the PARTIAL and FULL blocks of every tile row

# CAUSAL: which edges of the band a score tile checks (and, in the kernels, what bounds the key loop)
#   0 / False: none;  1 / True: causal, j <= i + causal_offset;
#   BAND (2): the local window (window_size, causal folded in): band_lo <= j - i <= causal_offset
# (causal_offset = Sk - Sq + right, band_lo = Sk - Sq - left; an unbounded side is a value past every key)
BAND: tl.constexpr = tl.constexpr(2)

# LOAD_MASK: which part of the mask a score tile loads
LOAD_NONE: tl.constexpr = tl.constexpr(0)     # nothing (no mask, FULL blocks, rows that need none)
LOAD_ROW: tl.constexpr = tl.constexpr(1)      # one row, the same for every query (MASK_KEYS)
LOAD_TILE: tl.constexpr = tl.constexpr(2)     # the whole tile (PARTIAL blocks of MASK_BLOCKS)


@triton.jit
def philox_rows(seed, rng_offset, bh, offs_m, offs_n, Sk, TRANSPOSED: tl.constexpr):
    """The four Philox-4x32-10 output words of dropout_keep's tile, [M / 4, N] each (or [N, M / 4]):
    word e of group g belongs to query row 4 g + e."""
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
    return tl.philox_impl(c0, c1, c2, c3, k0, k1)


@triton.jit
def load_rng(Rng, DROPOUT: tl.constexpr):
    """(seed, offset) of the dropout Philox, read from the int64 [2] tensor on the device (graph-safe:
    fused_attn/_rng.py); (0, 0) without dropout."""
    seed = 0
    rng_offset = 0
    if DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    return seed, rng_offset


@triton.jit
def dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, TRANSPOSED: tl.constexpr):
    """Keep-mask of the tile of query rows offs_m (consecutive, from a multiple of 4) and keys
    offs_n: [M, N], or [N, M] when TRANSPOSED.  Philox-4x32-10 with key = seed (two 31-bit
    halves) and counter = ((row // 4) * Sk + col, batch * H + head, torch's offset as two 31-bit
    halves); element (row, col) takes output word row % 4, so one Philox call serves four rows.
    A function of the element's position only: the backward regenerates it, and the C++ kernels
    (csrc/philox.h) draw the same mask.  Keep iff uniform >= dropout_p."""
    G: tl.constexpr = offs_m.shape[0] // 4
    r0, r1, r2, r3 = philox_rows(seed, rng_offset, bh, offs_m, offs_n, Sk, TRANSPOSED=TRANSPOSED)
    # tl.join stacks on a new last axis: r[..., f, e] = word 2 f + e, so after the reshape the
    # element 4 * group + 2 f + e takes word 2 f + e, i.e. word (its index) % 4
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    if TRANSPOSED:
        r = tl.reshape(r, [offs_n.shape[0], 4 * G])                               # col 4 * group + word
    else:
        r = tl.reshape(tl.permute(r, (0, 2, 3, 1)), [4 * G, offs_n.shape[0]])     # row 4 * group + word
    return tl.uint_to_uniform_float(r) >= dropout_p


# The stored keep-mask (the KeepBits argument): int32 words [B, H, Sq / 32, Sk] (both padded to KEEP_PAD), element
# (b, h, i, j) is bit i % 32 of word [b, h, i // 32, j].  Packed along the query axis so that
# every kernel touches whole words of consecutive keys: the forward's [BLOCK_M, BLOCK_N] tile
# writes [BLOCK_M / 32, BLOCK_N] words (BLOCK_M a multiple of 32), dQ reads the same shape and
# dK/dV its transpose, rows of BLOCK_N contiguous words either way.  Both dims are padded to
# KEEP_PAD (>= every tile), so aligned tiles never need bounds checks; only the tiles that start
# at an unaligned key (MASK_KEYS ranges) check columns.  Words of tiles the forward skips are
# never written: the backward reads them only where P is exactly 0 (hidden keys, rows that see
# nothing), where the bit cannot change a gradient.
KEEP_PAD = 128


@triton.jit
def dropout_keep_store(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, ptr, stride_kw, CHECK_COLS: tl.constexpr):
    """dropout_keep(TRANSPOSED=False) of a tile of M (a multiple of 32) rows, also stored as
    [M / 32, N] words from word row ptr.  Packed straight from Philox's [M / 4, N] outputs (4 bits
    per element of those, then 8 of them per word): re-laying out the whole [M, N] keep tile
    for the store made the forward spill three times as much."""
    W: tl.constexpr = offs_m.shape[0] // 32
    N: tl.constexpr = offs_n.shape[0]
    r0, r1, r2, r3 = philox_rows(seed, rng_offset, bh, offs_m, offs_n, Sk, TRANSPOSED=False)
    nib = ((tl.uint_to_uniform_float(r0) >= dropout_p).to(tl.int32)
           | ((tl.uint_to_uniform_float(r1) >= dropout_p).to(tl.int32) << 1)
           | ((tl.uint_to_uniform_float(r2) >= dropout_p).to(tl.int32) << 2)
           | ((tl.uint_to_uniform_float(r3) >= dropout_p).to(tl.int32) << 3))        # [M / 4, N]
    shifts = 4 * tl.arange(0, 8)
    words = tl.sum(tl.reshape(nib, [W, 8, N]) << shifts[None, :, None], axis=1)      # disjoint bits: sum = OR
    ptrs = ptr + tl.arange(0, W)[:, None] * stride_kw + offs_n[None, :]
    if CHECK_COLS:
        tl.store(ptrs, words, mask=offs_n[None, :] < Sk)
    else:
        tl.store(ptrs, words)
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))       # as in dropout_keep
    r = tl.reshape(tl.permute(r, (0, 2, 3, 1)), [offs_m.shape[0], N])
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def keep_bits_load(ptr, stride_kw, bit0, offs_m, offs_n, Sk, TRANSPOSED: tl.constexpr, CHECK_COLS: tl.constexpr):
    """The keep tile of the BLOCK_M query rows offs_m from word row ptr, the first row at bit bit0
    (0 unless BLOCK_M < 32): [BLOCK_M, N], or [N, BLOCK_M] when TRANSPOSED."""
    BLOCK_M: tl.constexpr = offs_m.shape[0]
    G: tl.constexpr = (BLOCK_M + 31) // 32
    R: tl.constexpr = BLOCK_M // G
    N: tl.constexpr = offs_n.shape[0]
    shifts = bit0 + tl.arange(0, R)
    if TRANSPOSED:
        ptrs = ptr + offs_n[:, None] + tl.arange(0, G)[None, :] * stride_kw                  # [N, G]
        if CHECK_COLS:
            w = tl.load(ptrs, mask=offs_n[:, None] < Sk, other=0)
        else:
            w = tl.load(ptrs)
        keep = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & 1, [N, BLOCK_M]) != 0
    else:   # (an else, not an early return: Triton requires every return of the function to type alike)
        ptrs = ptr + tl.arange(0, G)[:, None] * stride_kw + offs_n[None, :]                  # [G, N]
        if CHECK_COLS:
            w = tl.load(ptrs, mask=offs_n[None, :] < Sk, other=0)
        else:
            w = tl.load(ptrs)
        keep = tl.reshape((w[:, None, :] >> shifts[None, :, None]) & 1, [BLOCK_M, N]) != 0
    return keep


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation.  fp32 operands multiply exactly (IEEE, no tf32).  Under
    the interpreter, bf16 operands go through fp32: Triton 3.8's interpreter mis-multiplies bf16 dots."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


# Whether Triton runs these kernels under its interpreter (TRITON_INTERPRET=1 when it decorated them)
INTERPRETED: tl.constexpr = tl.constexpr(isinstance(mma, InterpretedFunction))


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


@triton.jit
def apply_mask_tile(s, mi, ni, mask_ptr, stride_mm, stride_mn, Sq, Sk):
    """Load one mask tile and apply it to log2-scores (hidden -> -inf).  mi / ni: query / key
    indices broadcastable to s (offs_m[:, None] and offs_n[None, :], or transposed).  Float
    values are additive (added in fp32, <= HIDDEN hides); uint8 values are visibility (0 hides)."""
    in_b = (mi < Sq) & (ni < Sk)
    mv = tl.load(mask_ptr + (mi * stride_mm + ni * stride_mn), mask=in_b, other=0)
    if mv.dtype.is_floating():
        mv = mv.to(tl.float32)
        return tl.where(mv > HIDDEN, s + mv * 1.4426950408889634, float("-inf"))
    return tl.where(mv != 0, s, float("-inf"))


@triton.jit
def mask_scores(s, mi, ni, msk, kv_lo, kv_hi, geom, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                LOAD_MASK: tl.constexpr):
    """All masking of one score tile: the mask (LOAD_MASK: LOAD_NONE, LOAD_ROW or LOAD_TILE), keys
    outside [kv_lo, kv_hi) (CHECK_BOUNDS), keys right of the causal diagonal / the band's right edge
    (CAUSAL) and left of the band's left edge (CAUSAL == BAND).  msk: (mask_ptr, stride_mm,
    stride_mn); geom: (Sq, Sk, D, causal_offset, band_lo) of the tile's sequence."""
    mask_ptr, stride_mm, stride_mn = msk
    Sq, Sk, D, causal_offset, band_lo = geom
    if LOAD_MASK == LOAD_ROW:
        # a key-padding mask is the same for every query: load one row and broadcast it (a full
        # tile of 64-bit addresses made the compiler spill)
        s = apply_mask_tile(s, 0, ni, mask_ptr, 0, stride_mn, Sq, Sk)
    elif LOAD_MASK == LOAD_TILE:
        s = apply_mask_tile(s, mi, ni, mask_ptr, stride_mm, stride_mn, Sq, Sk)
    if CHECK_BOUNDS:
        s = tl.where((ni < kv_hi) & (ni >= kv_lo), s, float("-inf"))
    if CAUSAL:
        s = tl.where(ni <= mi + causal_offset, s, float("-inf"))
    if CAUSAL == 2:
        s = tl.where(ni >= mi + band_lo, s, float("-inf"))
    return s


@triton.jit
def kv_loop_bounds(start_m, lo, hi, causal_offset, band_lo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """Key loop of a query block starting at start_m over visible keys [lo, hi): returns
    (lo, safe_lo, safe_hi, hi): the tiles from lo on in [safe_lo, safe_hi) need no bounds, causal or
    band masking, those in [lo, safe_lo) and [safe_hi, hi) do (safe_lo = lo unless CAUSAL == BAND)."""
    if CAUSAL == 2:
        # the band: keys < start_m + band_lo are hidden from every row of the block
        lo = tl.maximum(lo, start_m + band_lo)
    safe_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N            # tiles wholly inside [lo, hi)
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
        # keys <= start_m + causal_offset are visible to every row of the block
        free = tl.maximum(start_m + causal_offset + 1 - lo, 0)
        safe_hi = tl.minimum(safe_hi, lo + (free // BLOCK_N) * BLOCK_N)
    safe_hi = tl.maximum(safe_hi, lo)
    safe_lo = lo
    if CAUSAL == 2:
        # keys >= start_m + BLOCK_M - 1 + band_lo are visible to every row of the block (left edge)
        cut = tl.maximum(start_m + BLOCK_M - 1 + band_lo - lo, 0)
        safe_lo = tl.minimum(lo + ((cut + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, tl.maximum(hi, lo))
        safe_hi = tl.maximum(safe_hi, safe_lo)
    return lo, safe_lo, safe_hi, hi


@triton.jit
def seq_bounds(b, seqs, Sq, Sk, VARLEN: tl.constexpr):
    """(q0, k0, seq_q, seq_k): the first row and the length of sequence b's queries and keys.
    Padded batches: (0, 0, Sq, Sk).  Packed batches (VARLEN; seqs = (CuSeqQ, CuSeqK, Tq, Tk)): rows
    [cu[b], cu[b + 1]) of the [T, H, D] tensors, clamped to [0, T], lengths capped at max_seqlen
    (Sq / Sk): whatever cu_seqlens hold, no program reads or writes outside its tensors."""
    CuSeqQ, CuSeqK, Tq, Tk = seqs
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
def program_prologue(sizes, band, seqs, Rng, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
                     DROPOUT: tl.constexpr):
    """What every attention kernel's program derives first: its (batch, head) from program_id(1),
    the dropout (seed, offset) (load_rng), its tile of BLOCK rows from program_id(0) (start, offs:
    query rows, or key rows in dK/dV) and the head-dim offsets, the int64 forms of b, h (hk64:
    the k / v head of grouped-query), the sequence (seq_bounds) and the band's reach in it:
    (bh, b, h, seed, rng_offset, start, offs, offs_d, b64, h64, hk64, q0, k0, seq_q, seq_k,
    causal_offset, band_lo).  sizes: (H, Sq, Sk, D); band: (kv_group, win_left, win_right); seqs:
    see seq_bounds (triton_fwd.attn_fwd_kernel).  (In this order the kernels compile to the same
    registers and spills as when each spelled it out.)"""
    H, Sq, Sk, D = sizes
    kv_group, win_left, win_right = band
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seed, rng_offset = load_rng(Rng, DROPOUT=DROPOUT)
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    # per-(sequence, head) bases: a packed batch differs only in q0 / k0 and the lengths
    q0, k0, seq_q, seq_k = seq_bounds(b, seqs, Sq, Sk, VARLEN=VARLEN)
    causal_offset = seq_k - seq_q + win_right
    band_lo = seq_k - seq_q - win_left
    hk64 = (h // kv_group).to(tl.int64)
    return bh, b, h, seed, rng_offset, start, offs, offs_d, b64, h64, hk64, q0, k0, seq_q, seq_k, causal_offset, band_lo


@triton.jit
def base_ptr(T, strides, b64, h64, row0):
    """Row row0 of the (batch, head) slice of T; strides: T's (batch, head, row[, dim])."""
    return T + b64 * strides[0] + h64 * strides[1] + row0 * strides[2]


@triton.jit
def dropout_grads(p, dp, delta, grad_scale, keep, DROPOUT: tl.constexpr):
    """(Ph, dS) of one tile from P and dO·Vᵀ: Ph = grad_scale * dropout(P), dS = P ∘ (dP - delta)
    with dP = grad_scale * dropout(dO·Vᵀ); grad_scale = head_mask / (1 - dropout_p); delta
    broadcastable to the tile; keep the tile's keep-mask (unused without DROPOUT)."""
    if DROPOUT:
        ph = tl.where(keep, p * grad_scale, 0.0)
        dp = tl.where(keep, dp * grad_scale, 0.0)
    else:
        ph = p * grad_scale
        dp = dp * grad_scale
    return ph, p * (dp - delta)


@triton.jit
def tile_keep(drop, keep_ptr, stride_kw, bit0, offs_m, offs_n, Sk, TRANSPOSED: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A backward tile's keep-mask: read from the forward's words (keep_ptr, see keep_bits_load)
    or, when keep_ptr is None, regenerated with Philox; drop: (seed, rng_offset, bh, dropout_p)."""
    seed, rng_offset, bh, dropout_p = drop
    if keep_ptr is not None:
        keep = keep_bits_load(keep_ptr, stride_kw, bit0, offs_m, offs_n, Sk, TRANSPOSED=TRANSPOSED,
                              CHECK_COLS=CHECK_COLS)
    else:
        keep = dropout_keep(seed, rng_offset, bh, offs_m, offs_n, Sk, dropout_p, TRANSPOSED=TRANSPOSED)
    return keep


# REL_BIAS: DeBERTa's disentangled score (fused_attn.DisentangledBias), bits of the tables given:
# 1 c2p, 2 p2c; REL_GRAD: the table gradients a kernel adds (same bits).  One kernel variant each.
REL_C2P = 1
REL_P2C = 2


@triton.jit
def rel_bias_cols(mi, ni, RelIdx, rel_P, rows, cols):
    """(the table column c of each (query mi, key ni) of a tile, in-bounds flag): c =
    index[mi - ni + max_k - 1] (RelIdx points at index + max_k - 1), clamped into [0, P) so that
    no index value reads outside the tables; rows / cols: the sequence's query / key counts."""
    ok = (mi < rows) & (ni < cols)
    c = tl.load(RelIdx + (mi - ni), mask=ok, other=0)
    return tl.minimum(tl.maximum(c, 0), rel_P - 1), ok


@triton.jit
def rel_bias_add(s, mi, ni, rel, REL_BIAS: tl.constexpr):
    """s + c2p[mi, c] + p2c[ni, c] in fp32 (the unscaled q·kᵀ tile s, either orientation).  rel:
    (C2P, P2C, stride_rcm, stride_rpn, RelIdx, rel_P, rows, cols), C2P / P2C at row 0 of the
    sequence's (batch, head) slice, unit column stride; see rel_bias_cols."""
    C2P, P2C, stride_rcm, stride_rpn, RelIdx, rel_P, rows, cols = rel
    if REL_BIAS != 0:
        c, ok = rel_bias_cols(mi, ni, RelIdx, rel_P, rows, cols)
        if REL_BIAS % 2 == 1:     # c2p
            s = s + tl.load(C2P + mi * stride_rcm + c, mask=ok, other=0.0).to(tl.float32)
        if REL_BIAS // 2 == 1:    # p2c
            s = s + tl.load(P2C + ni * stride_rpn + c, mask=ok, other=0.0).to(tl.float32)
    return s


@triton.jit
def rel_bias_grad(ds, mi, ni, grads, rel, sm_scale, REL_GRAD: tl.constexpr):
    """Add the score gradient ds * sm_scale into the fp32 dc2p[mi, c] / dp2c[ni, c] (grads: (DC2P,
    DP2C), laid out like the tables; REL_GRAD bits) with atomics: several (i, j) of a tile share a
    column (the clamped, bucketed positions).  rel: as rel_bias_add's."""
    DC2P, DP2C = grads
    C2P, P2C, stride_rcm, stride_rpn, RelIdx, rel_P, rows, cols = rel
    if REL_GRAD != 0:
        c, ok = rel_bias_cols(mi, ni, RelIdx, rel_P, rows, cols)
        g = ds * sm_scale
        if REL_GRAD % 2 == 1:     # dc2p
            tl.atomic_add(DC2P + mi * stride_rcm + c, g, mask=ok, sem="relaxed")
        if REL_GRAD // 2 == 1:    # dp2c
            tl.atomic_add(DP2C + ni * stride_rpn + c, g, mask=ok, sem="relaxed")
