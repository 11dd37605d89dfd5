// The backward's dK / dV kernel, one block per key tile (attn_kernels.cuh: layout, shared helpers).
#pragma once

#include "attn_kernels.cuh"

namespace fused_attn_kernels {
namespace cuda {

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) bwd_dkdv_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ Lse, const float* __restrict__ Delta, T* __restrict__ dK, T* __restrict__ dV,
    Strides qs, Strides ks, Strides vs, Strides gs, Strides dks, Strides dvs, int H, int kv_group, SeqLayout lay,
    int D, float qk_scale, float scale, MaskDesc m, HeadMask hm, Band band, DropoutParams drop, RelBias rb) {
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

  const Program p = program(H, kv_group, lay);
  const int64_t bh = p.bh, b = p.b, h = p.h, kb = p.tile;
  const Seq& seq = p.seq;
  const int64_t Sq = seq.sq, Sk = seq.sk;
  const int64_t n0 = kb * TILE;
  if (n0 >= Sk) return;   // past a shorter packed sequence
  const int warp = p.warp, lane = p.lane;
  const T* Qh = p.q_rows(Q, qs);
  const T* Gh = p.q_rows(dO, gs);
  const int64_t l0 = lay.lse_row(seq, h, H);
  load_rows(Ks, LD, p.kv_rows(K, ks), ks.s, ks.d, n0, Sk, D, DMAX);
  load_rows(Vs, LD, p.kv_rows(V, vs), vs.s, vs.d, n0, Sk, D, DMAX);
  float dk[ROWS_PER_WARP][DPL], dv[ROWS_PER_WARP][DPL];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
    for (int t = 0; t < DPL; ++t) dk[r][t] = dv[r][t] = 0.f;
  const HeadCtx ctx{m, drop, b, h, Sq, Sk, lay.dropout_k_len(), static_cast<uint32_t>(bh), band, qk_scale,
                    prob_scale(hm, drop, b, h), rb, seq, lay.max_k};
  const int64_t dp2c_rows = (seq.b * H + h) * lay.tk + seq.k0;   // this (sequence, head)'s dp2c rows

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
      int col;
      const float ds = grad_element(Qs + lane * LD, Ks + lk * LD, Gs + lane * LD, Vs + lk * LD, D, Ls[lane],
                                    Ds[lane], tile, i, j, ctx, pd, col);
      rel_grad_add(rb.dp2c, rb, dp2c_rows, j, col, ds * scale);
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
    // grouped-query: dK / dV of query head h, summed over the group by the host
    T* gk = p.rows(dK, dks, h, seq.k0) + j * dks.s;
    T* gv = p.rows(dV, dvs, h, seq.k0) + j * dvs.s;
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
cudaError_t launch_bwd_dkdv(const BwdArgs<T>& a, dim3 grid, cudaStream_t stream) {
  // Q, dO, K, V tiles, and a tile's lse and delta (the dQ kernel reads those from global memory)
  const size_t smem = (4 * TILE * (32 * DPL + 1) + 2 * TILE) * sizeof(float);
  auto kernel = bwd_dkdv_kernel<T, DPL>;
  const cudaError_t status = set_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  FA_LAUNCH(kernel, grid, THREADS, smem, stream)(a.q, a.k, a.v, a.dout, a.lse, a.delta, a.dk, a.dv, a.qs, a.ks, a.vs,
                                                 a.gs, a.dks, a.dvs, a.H, a.kv_group, a.lay, a.D, a.qk_scale, a.scale,
                                                 a.m, a.hm, a.band, a.drop, a.rb);
  return cudaSuccess;
}


}  // namespace cuda
}  // namespace fused_attn_kernels

// The launchers of element type T, one per register width (the host's dispatch()); each file
// bwd_dkdv_<dtype>.cu holds one T.
#define FA_INSTANTIATE_BWD_DKDV(T)                                                    \
  namespace fused_attn_kernels {                                                       \
  namespace cuda {                                                                     \
  template cudaError_t launch_bwd_dkdv<T, 1>(const BwdArgs<T>&, dim3, cudaStream_t); \
  template cudaError_t launch_bwd_dkdv<T, 2>(const BwdArgs<T>&, dim3, cudaStream_t); \
  template cudaError_t launch_bwd_dkdv<T, 4>(const BwdArgs<T>&, dim3, cudaStream_t); \
  }                                                                                    \
  }
