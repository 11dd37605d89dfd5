// What the CUDA kernels share (fwd.cuh, bwd_dkdv.cuh, bwd_dq.cuh, and the host ops of attn_cuda.cu):
// tile constants, the device helpers of both passes, and the declarations of the kernels' launchers.
//
// fp32 arithmetic on CUDA cores (fp16 / bf16 inputs are converted when loaded to shared memory),
// 32 x 32 tiles, 4 warps per block, head dims up to 128 (any D; registers sized for 32, 64 or
// 128).  Same semantics and same reduced mask as the CPU kernel (../cpu_forward.cpp,
// ../cpu_backward.cpp): key ranges shrink the loops, the tile-state map skips empty tiles, and only
// partial tiles (or rows with holes / additive values) read the mask.  Dropout uses the same Philox
// stream (../philox.h).  Padded and packed (varlen) batches are the same kernels: block (b * h, tile)
// works on sequence b with the row offsets and lengths of SeqLayout::seq (../mask_desc.h; the
// prologue every kernel shares: program()); tiles past a shorter sequence's end return at once.
//
// Forward (fwd.cuh): block = (b * h, query tile); warp w owns 8 query rows; lane = key of the
// tile for the scores, lane = output dims (lane + 32 t) for P V.
// Backward, no atomics: dK/dV kernel over key tiles (bwd_dkdv.cuh: warp w owns 8 keys, lane =
// query row of the query tile), dQ kernel over query tiles (bwd_dq.cuh: warp w owns 8 query rows,
// lane = key).
//
// The build: each kernel for each input dtype is a file of its own (<kernel>_<dtype>.cu: 9 files,
// 3 register widths each), which a parallel build (ninja on the GPU machine) compiles side by side;
// docs/build.md says what that costs.  Those files include no ATen (FUSED_ATTN_KERNELS_ONLY: only
// c10's Half and BFloat16): ATen's headers cost more to compile than an unoptimised kernel.  The
// launchers take the kernels' arguments as a struct (FwdArgs, BwdArgs) the ops in attn_cuda.cu fill.
//
// The test suite also runs these files on CPU (tests/cuda_emu: FUSED_ATTN_CUDA_EMULATION, with the
// CUDA runtime emulated); the kernel launches go through FA_LAUNCH for that.
#pragma once

#if !defined(FUSED_ATTN_CUDA_EMULATION)
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define FA_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

#include "../mask_desc.h"

namespace fused_attn_kernels {
namespace cuda {

constexpr int TILE = 32;       // BLOCK_M = BLOCK_N; cpp_backend.CUDA.blocks
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS_PER_WARP = TILE / WARPS;
constexpr unsigned FULL = 0xffffffffu;
#define FA_NEG_INF (-__int_as_float(0x7f800000))

struct Strides {
  int64_t b, h, s, d;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

// Mask value of (b, h, i, j) as a log2-unit score offset: -inf hidden, 0 or value * log2(e).
__device__ __forceinline__ float mask_value(const MaskDesc& m, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t off = b * m.ms_b + h * m.ms_h + i * m.ms_m + j * m.ms_n;
  float v;
  switch (m.type) {
    case kU8: return static_cast<const uint8_t*>(m.values)[off] != 0 ? 0.f : FA_NEG_INF;
    case kF32: v = static_cast<const float*>(m.values)[off]; break;
    case kF16: v = __half2float(static_cast<const __half*>(m.values)[off]); break;
    default: v = __bfloat162float(static_cast<const __nv_bfloat16*>(m.values)[off]); break;
  }
  return v > kHidden ? v * kLog2e : FA_NEG_INF;
}

// Philox keep bit of one element, out of line: inlined into every unrolled row it multiplies
// the kernels' code (and their compile time) several times over for a path that is rarely hot.
__device__ __noinline__ bool keep_element(DropoutParams d, int64_t i, int64_t j, int64_t Sk, uint32_t bh) {
  return dropout_keep(d, i, j, Sk, bh);
}

// The factor on kept probabilities: head_mask[b, h] / (1 - p), 1 / (1 - p) rounded once on the host.
__device__ __forceinline__ float prob_scale(const HeadMask& hm, const DropoutParams& drop, int64_t b, int64_t h) {
  const float s = hm.ptr ? hm.ptr[b * hm.s_b + h * hm.s_h] : 1.f;
  return drop.p > 0.f ? s * drop.scale : s;
}

// DeBERTa's disentangled score: c2p[i, c] + p2c[j, c] of element (i, j) of sequence `seq`, head h,
// with c = index[i - j + max_k - 1] clamped into [0, P) (RelBias, mask_desc.h); 0 without tables or
// outside the sequence.  c: the column (for the gradients), -1 when none.
__device__ __forceinline__ float rel_term(const RelBias& rb, const Seq& seq, int64_t h, int64_t i, int64_t j,
                                          int64_t max_k, int& c) {
  c = -1;
  if (!rb.on() || i >= seq.sq || j >= seq.sk) return 0.f;
  c = static_cast<int>(::min(::max(static_cast<int64_t>(rb.index[i - j + max_k - 1]), int64_t{0}), rb.P - 1));
  float t = 0.f;
  if (rb.c2p) t += rb.c2p_rows(seq, h)[i * rb.cs_r + c * rb.cs_p];
  if (rb.p2c) t += rb.p2c_rows(seq, h)[j * rb.ps_r + c * rb.ps_p];
  return t;
}

// The backward of rel_term: g (= dS * scale) added into the fp32 gradient `grad` (contiguous like
// its table: RelBias::dc2p / dp2c) at [row, c] of sequence rows from row0, head h (atomics: the
// elements of a tile that share a column).
__device__ __forceinline__ void rel_grad_add(float* grad, const RelBias& rb, int64_t bh_rows, int64_t row, int c,
                                             float g) {
  if (grad != nullptr && c >= 0) atomicAdd(grad + (bh_rows + row) * rb.P + c, g);
}

// What one tile needs: visible keys [lo, hi), whether mask values must be read.
struct Tile {
  int64_t lo, hi;
  bool load_mask;
};

// Score offset of (i, j) inside a visited tile: bounds, the band (causal, local window), mask.
__device__ __forceinline__ float visibility(const MaskDesc& m, const Tile& t, int64_t b, int64_t h, int64_t i,
                                            int64_t j, int64_t Sq, const Band& band, int64_t off) {
  if (i >= Sq || j < t.lo || j >= t.hi) return FA_NEG_INF;
  if (!band.sees(i, j, off)) return FA_NEG_INF;
  return t.load_mask ? mask_value(m, b, h, i, j) : 0.f;
}

// Key-range description of batch row b (none / keys modes; [0, Sk) otherwise) and whether the
// row must load its mask values inside the range.
__device__ __forceinline__ void key_range(const MaskDesc& m, int64_t b, int64_t Sk, int64_t& lo, int64_t& hi,
                                          bool& needs_mask) {
  lo = 0;
  hi = Sk;
  needs_mask = false;
  if (m.mode == kKeys) {
    lo = m.key_start[b];
    hi = m.key_end[b];
    needs_mask = m.key_needs_mask[b] != 0;
  }
}

// The key tiles query tile qb visits, in order: f(n0, tile) for keys [n0, n0 + TILE).  Key
// ranges (clamped by the band: causal, local window) give consecutive tiles from the first visible
// key; the block map gives its non-empty tiles inside the band's bounds.  A single call site of f
// keeps the unrolled tile body single.
template <typename F>
__device__ __forceinline__ void for_each_key_tile(const MaskDesc& m, int64_t b, int64_t h, int64_t qb, int64_t Sq,
                                                  int64_t Sk, const Band& band, F&& f) {
  int64_t lo, hi;
  bool needs_mask;
  key_range(m, b, Sk, lo, hi, needs_mask);
  const bool blocks = m.mode == kBlocks;
  int64_t band_lo = 0, band_hi = Sk;
  band.clamp_keys(qb * TILE, min((qb + 1) * TILE, Sq) - 1, Sk - Sq, band_lo, band_hi);
  if (!blocks) {
    lo = ::max(lo, band_lo);
    hi = min(hi, band_hi);
  }
  const int64_t kb0 = blocks ? band_lo / TILE : 0;   // (band_lo >= 0)
  const int64_t base = blocks ? kb0 * TILE : lo;
  const int64_t count = blocks ? (band_hi > kb0 * TILE ? min(m.n_kb, (band_hi + TILE - 1) / TILE) - kb0 : 0)
                               : (hi > lo ? (hi - lo + TILE - 1) / TILE : 0);
  for (int64_t t = 0; t < count; ++t) {
    const int8_t st = blocks ? m.tile(b, h, qb, kb0 + t) : (needs_mask ? 1 : 2);   // 0 empty, 1 partial, 2 full
    if (st != 0) f(base + t * TILE, Tile{lo, hi, st == 1});
  }
}

// The query tiles that see key tile kb (dK / dV), in order: f(qb, tile).
template <typename F>
__device__ __forceinline__ void for_each_query_tile(const MaskDesc& m, int64_t b, int64_t h, int64_t kb, int64_t Sq,
                                                    int64_t Sk, const Band& band, F&& f) {
  int64_t lo, hi;
  bool needs_mask;
  key_range(m, b, Sk, lo, hi, needs_mask);
  const bool blocks = m.mode == kBlocks;
  const int64_t n0 = kb * TILE;
  if (!blocks && (n0 >= hi || n0 + TILE <= lo)) return;
  // the band: query i sees key j iff j - off - right <= i <= j - off + left (off = Sk - Sq)
  const int64_t j0 = blocks ? n0 : ::max(n0, lo), j1 = min(n0 + TILE, blocks ? Sk : hi) - 1, off = Sk - Sq;
  int64_t i_lo = 0, i_hi = Sq;
  if (band.right >= 0) i_lo = ::max(i_lo, j0 - off - band.right);
  if (band.left >= 0) i_hi = min(i_hi, j1 - off + band.left + 1);
  const int64_t first = i_lo / TILE, nqb = i_hi > 0 ? (i_hi + TILE - 1) / TILE : 0;
  for (int64_t qb = first; qb < nqb; ++qb) {
    const int8_t st = blocks ? m.tile(b, h, qb, kb) : (needs_mask ? 1 : 2);
    if (st != 0) f(qb, Tile{lo, hi, st == 1});
  }
}

// The prologue every kernel shares: block (b * H + h, tile) works on sequence b (its rows:
// SeqLayout::seq), query head h, whose k / v head is hk (grouped-query: kv_group query heads per k / v
// head), and tile = query tile (forward, dQ) or key tile (dK / dV); this thread's warp and lane.
struct Program {
  int64_t bh, b, h, hk, tile;
  Seq seq;
  int warp, lane;

  // Row `row0` of head `head` of this sequence in a [B, H, rows, D] tensor with strides s.
  template <typename T>
  __device__ __forceinline__ T* rows(T* base, const Strides& s, int64_t head, int64_t row0) const {
    return base + seq.b * s.b + head * s.h + row0 * s.s;
  }
  // First query row of head h (q, out, dO, dQ) and first key row of head hk (k, v).
  template <typename T>
  __device__ __forceinline__ T* q_rows(T* base, const Strides& s) const { return rows(base, s, h, seq.q0); }
  template <typename T>
  __device__ __forceinline__ T* kv_rows(T* base, const Strides& s) const { return rows(base, s, hk, seq.k0); }
};

__device__ __forceinline__ Program program(int H, int kv_group, const SeqLayout& lay) {
  Program p;
  p.bh = blockIdx.x;
  p.tile = blockIdx.y;
  p.b = p.bh / H;
  p.h = p.bh % H;
  p.hk = p.h / kv_group;
  p.seq = lay.seq(p.b);
  p.warp = threadIdx.x / 32;
  p.lane = threadIdx.x % 32;
  return p;
}

template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ld, const T* src, int64_t s_r, int64_t s_d, int64_t r0,
                                          int64_t n_rows, int D, int DMAX) {
  for (int e = threadIdx.x; e < TILE * DMAX; e += THREADS) {
    const int r = e / DMAX, d = e % DMAX;
    float x = 0.f;
    if (r0 + r < n_rows && d < D) x = static_cast<float>(src[(r0 + r) * s_r + d * s_d]);
    dst[r * ld + d] = x;
  }
}

// Key / value rows [n0, n0 + TILE) into shared memory, once every thread is done with the last.
template <typename T>
__device__ __forceinline__ void load_kv_tile(float* Ks, float* Vs, int ld, const T* Kb, const T* Vb, const Strides& ks,
                                             const Strides& vs, int64_t n0, int64_t Sk, int D, int DMAX) {
  __syncthreads();
  load_rows(Ks, ld, Kb, ks.s, ks.d, n0, Sk, D, DMAX);
  load_rows(Vs, ld, Vb, vs.s, vs.d, n0, Sk, D, DMAX);
  __syncthreads();
}

// Dynamic shared memory of a launch: above 48 KiB the kernel must opt in first.
template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ------------------------------------------------------------------------------------------
// backward: what both kernels compute per element

// What every element of one (batch, head) needs in the backward.
struct HeadCtx {
  MaskDesc m;
  DropoutParams drop;
  int64_t b, h, Sq, Sk, drop_k_len;
  uint32_t bh;
  Band band;
  float qk_scale, keep_scale;
  RelBias rb;       // DeBERTa's tables (off when rb.on() is false)
  Seq seq;
  int64_t max_k;    // SeqLayout::max_k: the index's key offset
};

// dS of element (i, j) from shared-memory rows q_i, k_j, dO_i, v_j (P recomputed from the row's
// log-sum-exp, +inf for rows that saw nothing -> P = 0); pd = the probability that multiplied V;
// col = the column of DeBERTa's tables (rel_term), -1 without.
__device__ __forceinline__ float grad_element(const float* qi, const float* kj, const float* gi, const float* vj,
                                              int D, float lse, float delta, const Tile& tile, int64_t i,
                                              int64_t j, const HeadCtx& c, float& pd, int& col) {
  float s = 0.f, dp = 0.f;
  for (int d = 0; d < D; ++d) {
    s += qi[d] * kj[d];
    dp += gi[d] * vj[d];
  }
  s += rel_term(c.rb, c.seq, c.h, i, j, c.max_k, col);
  s = mask_add(s * c.qk_scale, visibility(c.m, tile, c.b, c.h, i, j, c.Sq, c.band, c.Sk - c.Sq));
  const float p = exp2f(s - lse);
  float f = c.keep_scale;
  if (c.drop.p > 0.f && p != 0.f && !keep_element(c.drop, i, j, c.drop_k_len, c.bh)) f = 0.f;
  pd = p * f;
  return p * (f * dp - delta);
}

// ------------------------------------------------------------------------------------------
// launchers: each kernel's in its header (fwd.cuh, bwd_dkdv.cuh, bwd_dq.cuh), instantiated for one
// element type by each file <kernel>_<dtype>.cu, for the 3 register widths (head dims per lane 1, 2,
// 4) the host's dispatch() picks.  They return cudaFuncSetAttribute's status; the caller checks it and
// the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).

// fwd_kernel's arguments, in its order (fwd.cuh).
template <typename T>
struct FwdArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  float* lse;
  int32_t* visited;
  Strides qs, ks, vs, os;
  int H, kv_group;
  SeqLayout lay;
  int D;
  float qk_scale;
  MaskDesc m;
  HeadMask hm;
  Band band;
  DropoutParams drop;
  RelBias rb;
};

// The backward kernels' arguments (bwd_dkdv.cuh: dk, dv; bwd_dq.cuh: dq).
template <typename T>
struct BwdArgs {
  const T* q;
  const T* k;
  const T* v;
  const T* dout;
  const float* lse;
  const float* delta;
  T* dq;
  T* dk;
  T* dv;
  Strides qs, ks, vs, gs, dqs, dks, dvs;
  int H, kv_group;
  SeqLayout lay;
  int D;
  float qk_scale, scale;
  MaskDesc m;
  HeadMask hm;
  Band band;
  DropoutParams drop;
  RelBias rb;
};

template <typename T, int DPL>
cudaError_t launch_fwd(const FwdArgs<T>& a, dim3 grid, cudaStream_t stream);
template <typename T, int DPL>
cudaError_t launch_bwd_dkdv(const BwdArgs<T>& a, dim3 grid, cudaStream_t stream);
template <typename T, int DPL>
cudaError_t launch_bwd_dq(const BwdArgs<T>& a, dim3 grid, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_attn_kernels
