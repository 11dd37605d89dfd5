// The backward's dQ kernel, one block per query tile (attn_kernels.cuh: layout, shared helpers).
#pragma once

#include "attn_kernels.cuh"

namespace fused_attn_kernels {
namespace cuda {

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) bwd_dq_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ Lse, const float* __restrict__ Delta, T* __restrict__ dQ, Strides qs,
    Strides ks, Strides vs, Strides gs, Strides dqs, int H, int kv_group, SeqLayout lay, int D, float qk_scale,
    float scale, MaskDesc m, HeadMask hm, Band band, DropoutParams drop, RelBias rb) {
  drop.load_state();
  constexpr int DMAX = 32 * DPL;
  constexpr int LD = DMAX + 1;
  extern __shared__ float smem[];
  float* Qs = smem;               // [TILE, LD]
  float* Gs = Qs + TILE * LD;     // [TILE, LD] dO
  float* Ks = Gs + TILE * LD;     // [TILE, LD]
  float* Vs = Ks + TILE * LD;     // [TILE, LD]

  const Program p = program(H, kv_group, lay);
  const int64_t bh = p.bh, b = p.b, h = p.h, qb = p.tile;
  const Seq& seq = p.seq;
  const int64_t Sq = seq.sq, Sk = seq.sk;
  const int64_t i0 = qb * TILE;
  if (i0 >= Sq) return;   // past a shorter packed sequence
  const int warp = p.warp, lane = p.lane;
  const T* Kb = p.kv_rows(K, ks);
  const T* Vb = p.kv_rows(V, vs);
  const int64_t l0 = lay.lse_row(seq, h, H);
  load_rows(Qs, LD, p.q_rows(Q, qs), qs.s, qs.d, i0, Sq, D, DMAX);
  load_rows(Gs, LD, p.q_rows(dO, gs), gs.s, gs.d, i0, Sq, D, DMAX);
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
                    prob_scale(hm, drop, b, h), rb, seq, lay.max_k};
  const int64_t dc2p_rows = (seq.b * H + h) * lay.tq + seq.q0;   // this (sequence, head)'s dc2p rows

  auto visit = [&](int64_t n0, const Tile& tile) {
    load_kv_tile(Ks, Vs, LD, Kb, Vb, ks, vs, n0, Sk, D, DMAX);
    const int64_t j = n0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      const int lr = warp * ROWS_PER_WARP + r;
      const int64_t i = i0 + lr;
      if (i >= Sq) break;   // warp-uniform
      float pd;
      int col;
      const float ds = grad_element(Qs + lr * LD, Ks + lane * LD, Gs + lr * LD, Vs + lane * LD, D, lse[r], delta[r],
                                    tile, i, j, ctx, pd, col);
      rel_grad_add(rb.dc2p, rb, dc2p_rows, i, col, ds * scale);
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
    T* g = p.q_rows(dQ, dqs) + i * dqs.s;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) g[d * dqs.d] = static_cast<T>(dq[r][t] * scale);
    }
  }
}

template <typename T, int DPL>
cudaError_t launch_bwd_dq(const BwdArgs<T>& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = (4 * TILE * (32 * DPL + 1) + 2 * TILE) * sizeof(float);   // as the dK / dV kernel's
  auto kernel = bwd_dq_kernel<T, DPL>;
  const cudaError_t status = set_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  FA_LAUNCH(kernel, grid, THREADS, smem, stream)(a.q, a.k, a.v, a.dout, a.lse, a.delta, a.dq, a.qs, a.ks, a.vs, a.gs,
                                                 a.dqs, a.H, a.kv_group, a.lay, a.D, a.qk_scale, a.scale, a.m, a.hm,
                                                 a.band, a.drop, a.rb);
  return cudaSuccess;
}


}  // namespace cuda
}  // namespace fused_attn_kernels

// The launchers of element type T, one per register width (the host's dispatch()); each file
// bwd_dq_<dtype>.cu holds one T.
#define FA_INSTANTIATE_BWD_DQ(T)                                                    \
  namespace fused_attn_kernels {                                                       \
  namespace cuda {                                                                     \
  template cudaError_t launch_bwd_dq<T, 1>(const BwdArgs<T>&, dim3, cudaStream_t); \
  template cudaError_t launch_bwd_dq<T, 2>(const BwdArgs<T>&, dim3, cudaStream_t); \
  template cudaError_t launch_bwd_dq<T, 4>(const BwdArgs<T>&, dim3, cudaStream_t); \
  }                                                                                    \
  }
