// The forward kernel: out, the rows' log-sum-exp, and the key tiles each query tile visited
// (attn_kernels.cuh: layout, shared helpers).
#pragma once

#include "attn_kernels.cuh"

namespace fused_attn_kernels {
namespace cuda {

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) fwd_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, T* __restrict__ O,
    float* __restrict__ Lse, int32_t* __restrict__ Visited, Strides qs, Strides ks, Strides vs, Strides os,
    int H, int kv_group, SeqLayout lay, int D, float qk_scale, MaskDesc m, HeadMask hm, Band band,
    DropoutParams drop, RelBias rb) {
  drop.load_state();   // (seed, offset) from device memory
  constexpr int DMAX = 32 * DPL;
  constexpr int LD = DMAX + 1;
  extern __shared__ float smem[];
  float* Qs = smem;              // [TILE, LD]
  float* Ks = Qs + TILE * LD;    // [TILE, LD]
  float* Vs = Ks + TILE * LD;    // [TILE, LD]

  const Program p = program(H, kv_group, lay);
  const int64_t bh = p.bh, b = p.b, h = p.h, qb = p.tile;
  const Seq& seq = p.seq;
  const int64_t Sq = seq.sq, Sk = seq.sk, drop_k_len = lay.dropout_k_len();
  const int64_t i0 = qb * TILE;
  if (i0 >= Sq) return;   // past a shorter packed sequence (its visited count stays 0)
  const int warp = p.warp, lane = p.lane;
  const int64_t off = Sk - Sq;
  const T* Kb = p.kv_rows(K, ks);
  const T* Vb = p.kv_rows(V, vs);
  load_rows(Qs, LD, p.q_rows(Q, qs), qs.s, qs.d, i0, Sq, D, DMAX);

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
      int c;
      s += rel_term(rb, seq, h, i, j, lay.max_k, c);
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
    T* o = p.q_rows(O, os) + i * os.s;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) o[d * os.d] = static_cast<T>(acc[r][t] * f);
    }
    if (lane == 0) Lse[lay.lse_row(seq, h, H) + i] = empty ? __int_as_float(0x7f800000) : mi[r] + log2f(li[r]);
  }
  if (threadIdx.x == 0) Visited[bh * gridDim.y + qb] = visited;
}

template <typename T, int DPL>
cudaError_t launch_fwd(const FwdArgs<T>& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = 3 * TILE * (32 * DPL + 1) * sizeof(float);   // Q, K, V tiles
  auto kernel = fwd_kernel<T, DPL>;
  const cudaError_t status = set_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  FA_LAUNCH(kernel, grid, THREADS, smem, stream)(a.q, a.k, a.v, a.out, a.lse, a.visited, a.qs, a.ks, a.vs, a.os, a.H,
                                                 a.kv_group, a.lay, a.D, a.qk_scale, a.m, a.hm, a.band, a.drop, a.rb);
  return cudaSuccess;
}


}  // namespace cuda
}  // namespace fused_attn_kernels

// The launchers of element type T, one per register width (the host's dispatch()); each file
// fwd_<dtype>.cu holds one T.
#define FA_INSTANTIATE_FWD(T)                                                    \
  namespace fused_attn_kernels {                                                       \
  namespace cuda {                                                                     \
  template cudaError_t launch_fwd<T, 1>(const FwdArgs<T>&, dim3, cudaStream_t); \
  template cudaError_t launch_fwd<T, 2>(const FwdArgs<T>&, dim3, cudaStream_t); \
  template cudaError_t launch_fwd<T, 4>(const FwdArgs<T>&, dim3, cudaStream_t); \
  }                                                                                    \
  }
