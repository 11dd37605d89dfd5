// CUDA kernels of the fused_attn ops: a straightforward flash-style forward and backward, the
// fallback for systems where Triton is missing or broken.
//
// fp32 arithmetic on CUDA cores (fp16 / bf16 inputs are converted when loaded to shared memory),
// 32 x 32 tiles, 4 warps per block, head dims up to 128 (any D; registers sized for 32, 64, 96 or
// 128).  Same semantics and same reduced mask as the CPU kernel (../cpu_forward.cpp,
// ../cpu_backward.cpp): key ranges shrink the loops, the tile-state map skips empty tiles, and only partial tiles (or rows with
// holes / additive values) read the mask.  Dropout uses the same Philox stream (../philox.h).
// Padded and packed (varlen) batches are the same kernels: block (b * h, tile) works on sequence b
// with the row offsets and lengths of SeqLayout::seq (../mask_desc.h); tiles past a shorter
// sequence's end return at once.
//
// Forward: block = (query tile, b * h); warp w owns 8 query rows; lane = key of the tile for the
// scores, lane = output dims (lane + 32 t) for P V.
// Backward, no atomics: dK/dV kernel over key tiles (warp w owns 8 keys, lane = query row of the
// query tile), dQ kernel over query tiles (warp w owns 8 query rows, lane = key).
//
// The test suite also runs this file on CPU (tests/cuda_emu: FUSED_ATTN_CUDA_EMULATION, with the
// CUDA runtime emulated); the kernel launches go through FA_LAUNCH for that.
#if !defined(FUSED_ATTN_CUDA_EMULATION)
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

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

// ------------------------------------------------------------------------------------------
// forward

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) fwd_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, T* __restrict__ O,
    float* __restrict__ Lse, int32_t* __restrict__ Visited, Strides qs, Strides ks, Strides vs, Strides os,
    int H, int kv_group, SeqLayout lay, int D, float qk_scale, MaskDesc m, HeadMask hm, Band band,
    DropoutParams drop) {
  drop.load_state();   // (seed, offset) from device memory
  constexpr int DMAX = 32 * DPL;
  constexpr int LD = DMAX + 1;
  extern __shared__ float smem[];
  float* Qs = smem;              // [TILE, LD]
  float* Ks = Qs + TILE * LD;    // [TILE, LD]
  float* Vs = Ks + TILE * LD;    // [TILE, LD]

  const int64_t bh = blockIdx.x, qb = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const Seq seq = lay.seq(b);
  const int64_t Sq = seq.sq, Sk = seq.sk, drop_k_len = lay.dropout_k_len();
  const int64_t i0 = qb * TILE;
  if (i0 >= Sq) return;   // past a shorter packed sequence (its visited count stays 0)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t off = Sk - Sq;
  const int64_t hk = h / kv_group;   // grouped-query: the k / v head of query head h
  const T* Kb = K + seq.b * ks.b + hk * ks.h + seq.k0 * ks.s;
  const T* Vb = V + seq.b * vs.b + hk * vs.h + seq.k0 * vs.s;
  load_rows(Qs, LD, Q + seq.b * qs.b + h * qs.h + seq.q0 * qs.s, qs.s, qs.d, i0, Sq, D, DMAX);

  float mi[ROWS_PER_WARP], li[ROWS_PER_WARP], acc[ROWS_PER_WARP][DPL];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    mi[r] = FA_NEG_INF;
    li[r] = 0.f;
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc[r][t] = 0.f;
  }
  const bool dropout = drop.p > 0.f;

  auto visit = [&](int64_t n0, const Tile& tile) {
    load_kv_tile(Ks, Vs, LD, Kb, Vb, ks, vs, n0, Sk, D, DMAX);
    const int64_t j = n0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const int lr = warp * ROWS_PER_WARP + r;
      const int64_t i = i0 + lr;
      if (i >= Sq) break;   // warp-uniform
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += Qs[lr * LD + d] * Ks[lane * LD + d];
      s = mask_add(s * qk_scale, visibility(m, tile, b, h, i, j, Sq, band, off));
      // -- online softmax (a row that has seen nothing keeps m = -inf, l = 0)
      const float m_new = fmaxf(mi[r], warp_max(s));
      const float m_use = m_new == FA_NEG_INF ? 0.f : m_new;
      float p = exp2f(s - m_use);
      const float alpha = exp2f(mi[r] - m_use);
      li[r] = li[r] * alpha + warp_sum(p);
      mi[r] = m_new;
      if (dropout && j < Sk && !keep_element(drop, i, j, drop_k_len, static_cast<uint32_t>(bh))) p = 0.f;
#pragma unroll
      for (int t = 0; t < DPL; ++t) acc[r][t] *= alpha;
      for (int jj = 0; jj < TILE; ++jj) {
        const float pj = __shfl_sync(FULL, p, jj);
#pragma unroll
        for (int t = 0; t < DPL; ++t) acc[r][t] += pj * Vs[jj * LD + lane + 32 * t];
      }
    }
  };

  int visited = 0;
  for_each_key_tile(m, b, h, qb, Sq, Sk, band, [&](int64_t n0, const Tile& tile) {
    visit(n0, tile);
    ++visited;
  });

  // -- epilogue: rows that saw nothing give exactly 0 and lse = +inf
  const float keep_scale = prob_scale(hm, drop, b, h);
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t i = i0 + warp * ROWS_PER_WARP + r;
    if (i >= Sq) break;
    const bool empty = li[r] == 0.f;
    const float f = empty ? 0.f : keep_scale / li[r];
    T* o = O + seq.b * os.b + h * os.h + (seq.q0 + i) * os.s;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) o[d * os.d] = static_cast<T>(acc[r][t] * f);
    }
    if (lane == 0) Lse[lay.lse_row(seq, h, H) + i] = empty ? __int_as_float(0x7f800000) : mi[r] + log2f(li[r]);
  }
  if (threadIdx.x == 0) Visited[bh * gridDim.y + qb] = visited;
}

// ------------------------------------------------------------------------------------------
// backward

// What every element of one (batch, head) needs in the backward.
struct HeadCtx {
  MaskDesc m;
  DropoutParams drop;
  int64_t b, h, Sq, Sk, drop_k_len;
  uint32_t bh;
  Band band;
  float qk_scale, keep_scale;
};

// dS of element (i, j) from shared-memory rows q_i, k_j, dO_i, v_j (P recomputed from the row's
// log-sum-exp, +inf for rows that saw nothing -> P = 0); pd = the probability that multiplied V.
__device__ __forceinline__ float grad_element(const float* qi, const float* kj, const float* gi, const float* vj,
                                              int D, float lse, float delta, const Tile& tile, int64_t i,
                                              int64_t j, const HeadCtx& c, float& pd) {
  float s = 0.f, dp = 0.f;
  for (int d = 0; d < D; ++d) {
    s += qi[d] * kj[d];
    dp += gi[d] * vj[d];
  }
  s = mask_add(s * c.qk_scale, visibility(c.m, tile, c.b, c.h, i, j, c.Sq, c.band, c.Sk - c.Sq));
  const float p = exp2f(s - lse);
  float f = c.keep_scale;
  if (c.drop.p > 0.f && p != 0.f && !keep_element(c.drop, i, j, c.drop_k_len, c.bh)) f = 0.f;
  pd = p * f;
  return p * (f * dp - delta);
}

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) bwd_dkdv_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ Lse, const float* __restrict__ Delta, T* __restrict__ dK, T* __restrict__ dV,
    Strides qs, Strides ks, Strides vs, Strides gs, Strides dks, Strides dvs, int H, int kv_group, SeqLayout lay,
    int D, float qk_scale, float scale, MaskDesc m, HeadMask hm, Band band, DropoutParams drop) {
  drop.load_state();
  constexpr int DMAX = 32 * DPL;
  constexpr int LD = DMAX + 1;
  extern __shared__ float smem[];
  float* Qs = smem;               // [TILE, LD]
  float* Gs = Qs + TILE * LD;     // [TILE, LD] dO
  float* Ks = Gs + TILE * LD;     // [TILE, LD]
  float* Vs = Ks + TILE * LD;     // [TILE, LD]
  float* Ls = Vs + TILE * LD;     // [TILE]
  float* Ds = Ls + TILE;          // [TILE]

  const int64_t bh = blockIdx.x, kb = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const Seq seq = lay.seq(b);
  const int64_t Sq = seq.sq, Sk = seq.sk;
  const int64_t n0 = kb * TILE;
  if (n0 >= Sk) return;   // past a shorter packed sequence
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* Qh = Q + seq.b * qs.b + h * qs.h + seq.q0 * qs.s;
  const T* Gh = dO + seq.b * gs.b + h * gs.h + seq.q0 * gs.s;
  const int64_t l0 = lay.lse_row(seq, h, H);
  const int64_t hk = h / kv_group;   // grouped-query: dK / dV of query head h, summed over the group by the host
  load_rows(Ks, LD, K + seq.b * ks.b + hk * ks.h + seq.k0 * ks.s, ks.s, ks.d, n0, Sk, D, DMAX);
  load_rows(Vs, LD, V + seq.b * vs.b + hk * vs.h + seq.k0 * vs.s, vs.s, vs.d, n0, Sk, D, DMAX);
  float dk[ROWS_PER_WARP][DPL], dv[ROWS_PER_WARP][DPL];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
    for (int t = 0; t < DPL; ++t) dk[r][t] = dv[r][t] = 0.f;
  const HeadCtx ctx{m, drop, b, h, Sq, Sk, lay.dropout_k_len(), static_cast<uint32_t>(bh), band, qk_scale,
                    prob_scale(hm, drop, b, h)};

  auto visit = [&](int64_t qb, const Tile& tile) {
    const int64_t m0 = qb * TILE;
    __syncthreads();
    load_rows(Qs, LD, Qh, qs.s, qs.d, m0, Sq, D, DMAX);
    load_rows(Gs, LD, Gh, gs.s, gs.d, m0, Sq, D, DMAX);
    if (threadIdx.x < TILE) {
      const int64_t i = m0 + threadIdx.x;
      Ls[threadIdx.x] = i < Sq ? Lse[l0 + i] : __int_as_float(0x7f800000);
      Ds[threadIdx.x] = i < Sq ? Delta[l0 + i] : 0.f;
    }
    __syncthreads();
    const int64_t i = m0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const int lk = warp * ROWS_PER_WARP + r;
      const int64_t j = n0 + lk;
      if (j >= Sk) break;   // warp-uniform
      float pd;
      const float ds = grad_element(Qs + lane * LD, Ks + lk * LD, Gs + lane * LD, Vs + lk * LD, D, Ls[lane],
                                    Ds[lane], tile, i, j, ctx, pd);
      for (int ii = 0; ii < TILE; ++ii) {
        const float pdi = __shfl_sync(FULL, pd, ii), dsi = __shfl_sync(FULL, ds, ii);
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
          dv[r][t] += pdi * Gs[ii * LD + lane + 32 * t];
          dk[r][t] += dsi * Qs[ii * LD + lane + 32 * t];
        }
      }
    }
  };

  for_each_query_tile(m, b, h, kb, Sq, Sk, band, visit);

#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t j = n0 + warp * ROWS_PER_WARP + r;
    if (j >= Sk) break;
    T* gk = dK + seq.b * dks.b + h * dks.h + (seq.k0 + j) * dks.s;
    T* gv = dV + seq.b * dvs.b + h * dvs.h + (seq.k0 + j) * dvs.s;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        gk[d * dks.d] = static_cast<T>(dk[r][t] * scale);
        gv[d * dvs.d] = static_cast<T>(dv[r][t]);
      }
    }
  }
}

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) bwd_dq_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ Lse, const float* __restrict__ Delta, T* __restrict__ dQ, Strides qs,
    Strides ks, Strides vs, Strides gs, Strides dqs, int H, int kv_group, SeqLayout lay, int D, float qk_scale,
    float scale, MaskDesc m, HeadMask hm, Band band, DropoutParams drop) {
  drop.load_state();
  constexpr int DMAX = 32 * DPL;
  constexpr int LD = DMAX + 1;
  extern __shared__ float smem[];
  float* Qs = smem;               // [TILE, LD]
  float* Gs = Qs + TILE * LD;     // [TILE, LD] dO
  float* Ks = Gs + TILE * LD;     // [TILE, LD]
  float* Vs = Ks + TILE * LD;     // [TILE, LD]

  const int64_t bh = blockIdx.x, qb = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const Seq seq = lay.seq(b);
  const int64_t Sq = seq.sq, Sk = seq.sk;
  const int64_t i0 = qb * TILE;
  if (i0 >= Sq) return;   // past a shorter packed sequence
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t hk = h / kv_group;   // grouped-query: the k / v head of query head h
  const T* Kb = K + seq.b * ks.b + hk * ks.h + seq.k0 * ks.s;
  const T* Vb = V + seq.b * vs.b + hk * vs.h + seq.k0 * vs.s;
  const int64_t l0 = lay.lse_row(seq, h, H);
  load_rows(Qs, LD, Q + seq.b * qs.b + h * qs.h + seq.q0 * qs.s, qs.s, qs.d, i0, Sq, D, DMAX);
  load_rows(Gs, LD, dO + seq.b * gs.b + h * gs.h + seq.q0 * gs.s, gs.s, gs.d, i0, Sq, D, DMAX);
  float lse[ROWS_PER_WARP], delta[ROWS_PER_WARP], dq[ROWS_PER_WARP][DPL];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t i = i0 + warp * ROWS_PER_WARP + r;
    lse[r] = i < Sq ? Lse[l0 + i] : __int_as_float(0x7f800000);
    delta[r] = i < Sq ? Delta[l0 + i] : 0.f;
#pragma unroll
    for (int t = 0; t < DPL; ++t) dq[r][t] = 0.f;
  }
  const HeadCtx ctx{m, drop, b, h, Sq, Sk, lay.dropout_k_len(), static_cast<uint32_t>(bh), band, qk_scale,
                    prob_scale(hm, drop, b, h)};

  auto visit = [&](int64_t n0, const Tile& tile) {
    load_kv_tile(Ks, Vs, LD, Kb, Vb, ks, vs, n0, Sk, D, DMAX);
    const int64_t j = n0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const int lr = warp * ROWS_PER_WARP + r;
      const int64_t i = i0 + lr;
      if (i >= Sq) break;   // warp-uniform
      float pd;
      const float ds = grad_element(Qs + lr * LD, Ks + lane * LD, Gs + lr * LD, Vs + lane * LD, D, lse[r], delta[r],
                                    tile, i, j, ctx, pd);
      for (int jj = 0; jj < TILE; ++jj) {
        const float dsj = __shfl_sync(FULL, ds, jj);
#pragma unroll
        for (int t = 0; t < DPL; ++t) dq[r][t] += dsj * Ks[jj * LD + lane + 32 * t];
      }
    }
  };

  for_each_key_tile(m, b, h, qb, Sq, Sk, band, visit);

#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t i = i0 + warp * ROWS_PER_WARP + r;
    if (i >= Sq) break;
    T* g = dQ + seq.b * dqs.b + h * dqs.h + (seq.q0 + i) * dqs.s;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) g[d * dqs.d] = static_cast<T>(dq[r][t] * scale);
    }
  }
}

__global__ void dropout_keep_kernel(bool* keep, int64_t rows, int64_t q_len, int64_t k_len, DropoutParams drop) {
  drop.load_state();
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * k_len) return;
  const int64_t row = e / k_len, j = e % k_len;
  keep[e] = dropout_keep(drop, row % q_len, j, k_len, static_cast<uint32_t>(row / q_len));
}

// ------------------------------------------------------------------------------------------
// host side

// Compile-time (element type, head dims per lane) of a call: 3 dtypes x 3 register widths.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  TORCH_CHECK(D >= 1 && D <= 128, "fused_attn (cuda): head dim ", D, " not supported (1..128)");
  auto with_dpl = [&](auto zero) {
    if (D <= 32) f(zero, std::integral_constant<int, 1>{});
    else if (D <= 64) f(zero, std::integral_constant<int, 2>{});
    else f(zero, std::integral_constant<int, 4>{});
  };
  switch (dtype) {
    case at::kFloat: with_dpl(float{}); break;
    case at::kHalf: with_dpl(at::Half{}); break;
    case at::kBFloat16: with_dpl(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fused_attn (cuda): dtype ", dtype, " not supported (float16, bfloat16, float32)");
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

using at::Tensor;
using OptT = std::optional<Tensor>;

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t block_m, int64_t block_n) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && q.size(3) == k.size(3),
              "fused_attn: q [B, H, Sq, D], k / v [B, H_kv, Sk, D] with H % H_kv == 0 expected, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fused_attn: q, k, v must share a dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fused_attn: q, k, v on different devices");
  TORCH_CHECK(block_m == TILE && block_n == TILE, "fused_attn: the CUDA kernel uses ", TILE, " x ", TILE,
              " tiles, got ", block_m, " x ", block_n);
}

// Batch size of the grid (q.size(0), or the number of packed sequences), checked against grid.x.
int64_t grid_batch(const Tensor& q, const OptT& cu_seqlens_q) {
  const int64_t B = seq_count(q, cu_seqlens_q);
  TORCH_CHECK(B * q.size(1) <= INT32_MAX, "fused_attn (cuda): B * H too large");
  return B;
}

std::tuple<Tensor, Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& mask,
                                            const OptT& key_start, const OptT& key_end, const OptT& key_needs_mask,
                                            const OptT& block_state, const OptT& head_mask, bool additive,
                                            bool causal, double scale, double dropout_p, const OptT& rng,
                                            int64_t block_m, int64_t block_n,
                                            const OptT& cu_seqlens_q, const OptT& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, int64_t window_left, int64_t window_right) {
  check_inputs(q, k, v, block_m, block_n);
  const Band band = Band::of(window_left, window_right, causal);
  const c10::cuda::CUDAGuard guard(q.device());
  const SeqLayout lay = make_seq_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                                        key_start, block_state, head_mask);
  const MaskDesc md = make_mask_desc(q, k.size(2), mask, additive, key_start, key_end, key_needs_mask, block_state,
                                     block_m, block_n);
  const HeadMask hm = make_head_mask(head_mask, q);
  const DropoutParams drop = make_dropout(dropout_p, rng, q.device());   // the kernels read rng
  const int64_t B = grid_batch(q, cu_seqlens_q), H = q.size(1), D = q.size(3);
  const int64_t nqb = (lay.max_q + TILE - 1) / TILE;
  TORCH_CHECK(nqb <= 65535, "fused_attn (cuda): Sq too large");
  Tensor out, lse, visited;
  allocate_forward(q, lay, B, block_m, out, lse, visited);
  if (out.numel() == 0 || B * H * nqb == 0) return {out, lse, visited};
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(nqb));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), D, [&](auto zero, auto dpl) {
    using scalar_t = decltype(zero);
    constexpr int DPL = decltype(dpl)::value;
    const size_t smem = 3 * TILE * (32 * DPL + 1) * sizeof(float);
    auto kernel = fwd_kernel<scalar_t, DPL>;
    set_smem(kernel, smem);
    FA_LAUNCH(kernel, grid, THREADS, smem, stream)(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), visited.data_ptr<int32_t>(), strides_of(q), strides_of(k), strides_of(v),
        strides_of(out), static_cast<int>(H), static_cast<int>(H / k.size(1)), lay, static_cast<int>(D),
        static_cast<float>(scale) * kLog2e, md, hm, band, drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, visited};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cuda(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                            const OptT& mask, const OptT& key_start, const OptT& key_end,
                                            const OptT& key_needs_mask, const OptT& block_state, const OptT& head_mask,
                                            bool additive, bool causal, double scale, double dropout_p,
                                            const OptT& rng, int64_t block_m, int64_t block_n,
                                            const OptT& cu_seqlens_q, const OptT& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, int64_t window_left, int64_t window_right) {
  check_inputs(q, k, v, block_m, block_n);
  const Band band = Band::of(window_left, window_right, causal);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fused_attn: grad_out and out must match q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "fused_attn: lse must be contiguous float32 [B, H, Sq] ([1, H, Tq] when packed)");
  const c10::cuda::CUDAGuard guard(q.device());
  const SeqLayout lay = make_seq_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                                        key_start, block_state, head_mask);
  const MaskDesc md = make_mask_desc(q, k.size(2), mask, additive, key_start, key_end, key_needs_mask, block_state,
                                     block_m, block_n);
  const HeadMask hm = make_head_mask(head_mask, q);
  const DropoutParams drop = make_dropout(dropout_p, rng, q.device());   // the kernels read rng
  const int64_t B = grid_batch(q, cu_seqlens_q), H = q.size(1), D = q.size(3);
  const int64_t nqb = (lay.max_q + TILE - 1) / TILE, nkb = (lay.max_k + TILE - 1) / TILE;
  TORCH_CHECK(nqb <= 65535 && nkb <= 65535, "fused_attn (cuda): sequence too long");
  Tensor dq, dk, dv;
  allocate_backward(q, k, v, lay, dq, dk, dv);
  if (q.numel() == 0 || k.numel() == 0 || B * H == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  // grouped-query k / v: dK, dV per query head into [.., H, Sk, D], summed over each group below
  const int64_t group = H / k.size(1);
  Tensor dk_h = dk, dv_h = dv;
  if (group > 1) {
    if (lay.packed()) {   // token-major like zeros_token_major: rows in no sequence stay 0
      dk_h = at::zeros({k.size(0), k.size(2), H, k.size(3)}, k.options()).transpose(1, 2);
      dv_h = at::zeros({k.size(0), k.size(2), H, k.size(3)}, k.options()).transpose(1, 2);
    } else {
      dk_h = at::empty({k.size(0), H, k.size(2), k.size(3)}, k.options());
      dv_h = at::empty({k.size(0), H, k.size(2), k.size(3)}, k.options());
    }
  }
  // rowsum(dO * O) with O as stored (rounded to the input dtype, like the eager graph)
  const Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float qk_scale = static_cast<float>(scale) * kLog2e;
  dispatch(q.scalar_type(), D, [&](auto zero, auto dpl) {
    using scalar_t = decltype(zero);
    constexpr int DPL = decltype(dpl)::value;
    const size_t smem = (4 * TILE * (32 * DPL + 1) + 2 * TILE) * sizeof(float);
    if (nkb > 0) {   // (a packed batch's max_seqlen may be 0)
      auto kdkdv = bwd_dkdv_kernel<scalar_t, DPL>;
      set_smem(kdkdv, smem);
      FA_LAUNCH(kdkdv, dim3(static_cast<unsigned>(B * H), static_cast<unsigned>(nkb)), THREADS, smem, stream)(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), delta.data_ptr<float>(), dk_h.data_ptr<scalar_t>(), dv_h.data_ptr<scalar_t>(),
          strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out), strides_of(dk_h), strides_of(dv_h),
          static_cast<int>(H), static_cast<int>(group), lay, static_cast<int>(D), qk_scale, static_cast<float>(scale),
          md, hm, band, drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (nqb > 0) {
      auto kdq = bwd_dq_kernel<scalar_t, DPL>;
      set_smem(kdq, smem);
      FA_LAUNCH(kdq, dim3(static_cast<unsigned>(B * H), static_cast<unsigned>(nqb)), THREADS, smem, stream)(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), strides_of(q), strides_of(k),
          strides_of(v), strides_of(grad_out), strides_of(dq), static_cast<int>(H), static_cast<int>(group), lay,
          static_cast<int>(D), qk_scale, static_cast<float>(scale), md, hm, band, drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (group > 1) {
    const int64_t Hk = k.size(1);
    dk.copy_(dk_h.unflatten(1, {Hk, group}).to(at::kFloat).sum(2));
    dv.copy_(dv_h.unflatten(1, {Hk, group}).to(at::kFloat).sum(2));
  }
  return {dq, dk, dv};
}

Tensor dropout_keep_cuda(const Tensor& rng, int64_t batch, int64_t heads, int64_t q_len, int64_t k_len,
                         double dropout_p) {
  const c10::cuda::CUDAGuard guard(rng.device());
  const DropoutParams drop = make_dropout(dropout_p, rng, rng.device());
  Tensor keep = at::empty({batch, heads, q_len, k_len}, rng.options().dtype(at::kBool));
  const int64_t n = keep.numel();
  if (n == 0) return keep;
  const int threads = 256;
  FA_LAUNCH(dropout_keep_kernel, static_cast<unsigned>((n + threads - 1) / threads), threads, 0,
            c10::cuda::getCurrentCUDAStream())(keep.data_ptr<bool>(), batch * heads * q_len, q_len, k_len,
                                               drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace cuda
}  // namespace fused_attn_kernels

#if !defined(FUSED_ATTN_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("fwd", &fused_attn_kernels::cuda::fwd_cuda);
  m.impl("bwd", &fused_attn_kernels::cuda::bwd_cuda);
  m.impl("dropout_keep", &fused_attn_kernels::cuda::dropout_keep_cuda);
}
#endif
