// The CPU kernel's backward pass.
//
// OpenMP over (batch, k / v head); each item (every query head that reads the k / v head, one after
// the other when grouped-query) recomputes the probabilities from the saved log-sum-exp tile by
// tile (BM-row query tiles, as in the forward pass: query_tile_rows) and accumulates
// dQ, dK, dV in fp32 (no atomics, no [Sq, Sk] buffer).  Dropout: the forward pass's Philox
// keep-mask, regenerated from (seed, offset) (philox.h).
// DeBERTa's disentangled score: gathered into the recomputed scores, its gradients (dS * scale)
// scattered into dc2p / dp2c rows of the item's (sequence, head) (rel_bias_grad_t).
// A work item's sequence b has its row offsets and lengths from SeqLayout::seq (mask_desc.h).
#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_attn.h"

namespace fused_attn_kernels {
namespace cpu {

template <typename T, int BM>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv, const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm,
                     const Band& band, float scale, const DropoutParams& drop, const RelBias& rb) {
  const int64_t H = q.size(1), D = q.size(3), Hk = k.size(1), group = H / Hk;
  const int64_t Dp = round_up(D, 16);
  // key tiles start anywhere in [0, Sk), Sk <= min(max_k, tk) (SeqLayout::seq)
  const int64_t Skp = std::min(lay.max_k, lay.tk) + BLOCK_N;
  const int64_t drop_k_len = lay.dropout_k_len();
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  const T *dO = dout.data_ptr<T>(), *O = out.data_ptr<T>();
  T *dQ = dq.data_ptr<T>(), *dK = dk.data_ptr<T>(), *dV = dv.data_ptr<T>();
  const float* L = lse.data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), gs = dout.strides(), os = out.strides();
  const auto dqs = dq.strides(), dks = dk.strides(), dvs = dv.strides();
  const float qk_scale = scale * kLog2e;
  const bool dropout = drop.p > 0.f;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> ws(2 * Dp * BM + 3 * BM * Dp + 2 * BLOCK_N * Dp + 2 * BLOCK_N * BM +
                          3 * BM + BLOCK_N + 2 * Skp * Dp);
    float* QT = ws.data();              // [D, BM]  q tile, transposed
    float* dOT = QT + Dp * BM;          // [D, BM]  dO tile, transposed
    float* Qn = dOT + Dp * BM;          // [BM, Dp] q tile
    float* dOn = Qn + BM * Dp;          // [BM, Dp] dO tile (O first, for delta)
    float* dQa = dOn + BM * Dp;         // [BM, Dp] dQ accumulator
    float* Kb = dQa + BM * Dp;          // [BLOCK_N, Dp]
    float* Vb = Kb + BLOCK_N * Dp;      // [BLOCK_N, Dp]
    float* PT = Vb + BLOCK_N * Dp;      // [BLOCK_N, BM] P^T -> dropped, head-masked P^T
    float* dST = PT + BLOCK_N * BM;     // [BLOCK_N, BM] dP^T -> dS^T
    float* lse2 = dST + BLOCK_N * BM;
    float* delta = lse2 + BM;
    float* fac = delta + BM;            // keep * head_mask / (1 - p) of one key row
    float* mrow = fac + BM;
    float* dKa = mrow + BLOCK_N;        // [Skp, Dp]
    float* dVa = dKa + Skp * Dp;        // [Skp, Dp]

#pragma omp for schedule(dynamic, 1)
    for (int64_t bhk = 0; bhk < B * Hk; ++bhk) {
      // one k / v head per work item: dK, dV sum over the query heads that read it (grouped-query)
      const int64_t b = bhk / Hk, hk = bhk % Hk;
      const Seq seq = lay.seq(b);
      const int64_t Sq = seq.sq, Sk = seq.sk, k_rows = lay.tk - seq.k0;   // k_rows: readable from Kh
      std::fill(dKa, dKa + (Sk + BLOCK_N) * Dp, 0.f);
      std::fill(dVa, dVa + (Sk + BLOCK_N) * Dp, 0.f);
      const T* Kh = K + seq.b * ks[0] + hk * ks[1] + seq.k0 * ks[2];
      const T* Vh = V + seq.b * vs[0] + hk * vs[1] + seq.k0 * vs[2];
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t bh = b * H + h;
      float keep_scale = head_scale(hm, b, h);
      if (dropout) keep_scale *= drop.scale;
      const float* Lh = L + lay.lse_row(seq, h, H);
      const float* c2p = rb.c2p_rows(seq, h);
      const float* p2c = rb.p2c_rows(seq, h);
      float* dc2p = rb.dc2p ? rb.dc2p + ((seq.b * H + h) * lay.tq + seq.q0) * rb.P : nullptr;
      float* dp2c = rb.dp2c ? rb.dp2c + ((seq.b * H + h) * lay.tk + seq.k0) * rb.P : nullptr;
      for (int64_t i0 = 0; i0 < Sq; i0 += BM) {
        const int64_t rows = std::min<int64_t>(BM, Sq - i0);
        const T* Qt = Q + seq.b * qs[0] + h * qs[1] + (seq.q0 + i0) * qs[2];
        const T* Gt = dO + seq.b * gs[0] + h * gs[1] + (seq.q0 + i0) * gs[2];
        load_tile_t(QT, BM, Qt, qs[2], qs[3], rows, D);
        load_tile_t(dOT, BM, Gt, gs[2], gs[3], rows, D);
        load_tile(Qn, Dp, Qt, qs[2], qs[3], rows, BM, D);
        // delta = rowsum(dO * O), O as stored (rounded to the input dtype, like the eager graph)
        load_tile(dOn, Dp, O + seq.b * os[0] + h * os[1] + (seq.q0 + i0) * os[2], os[2], os[3], rows, BM, D);
        for (int64_t i = 0; i < BM; ++i) {
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += dOT[d * BM + i] * dOn[i * Dp + d];
          delta[i] = acc;
          lse2[i] = i < rows ? Lh[i0 + i] : std::numeric_limits<float>::infinity();
        }
        load_tile(dOn, Dp, Gt, gs[2], gs[3], rows, BM, D);
        std::fill(dQa, dQa + BM * Dp, 0.f);
        for_each_key_tile(m, b, h, i0, rows, Sq, Sk, band, [&](int64_t n0, int64_t nk, const TileChecks& tc) {
          const int64_t nk4 = round_up(nk, 4);
          const Rows kr = tile_rows(Kb, Kh, ks[2], ks[3], n0, nk, k_rows, D, Dp);
          const Rows vr = tile_rows(Vb, Vh, vs[2], vs[3], n0, nk, k_rows, D, Dp);
          // -- P^T from the saved log-sum-exp (rows that saw nothing: lse = +inf -> P = 0)
          std::fill(PT, PT + nk4 * BM, 0.f);
          gemm_acc(PT, BM, kr.p, kr.ld, 1, QT, BM, nk4, BM, D);
          if (rb.on()) add_rel_bias_t<BM>(PT, rb, c2p, p2c, i0, n0, nk, rows, lay.max_k - 1);
          finish_scores_t<BM>(PT, nk, rows, i0, n0, qk_scale, tc, Sk - Sq, band, m, b, h, mrow);
          // -- dP^T = V dO^T
          std::fill(dST, dST + nk4 * BM, 0.f);
          gemm_acc(dST, BM, vr.p, vr.ld, 1, dOT, BM, nk4, BM, D);
          for (int64_t j = 0; j < nk4; ++j) {
            float* p = PT + j * BM;
            float* g = dST + j * BM;
            if (j >= nk) {
              std::fill(p, p + BM, 0.f);
              std::fill(g, g + BM, 0.f);
              continue;
            }
            if (dropout) {
              for (int64_t i = 0; i < BM; i += 4) {
                const unsigned keep = i < rows ? dropout_keep4(drop, i0 + i, n0 + j, drop_k_len, static_cast<uint32_t>(bh)) : 0u;
                for (int r = 0; r < 4; ++r) fac[i + r] = i + r < rows && ((keep >> r) & 1u) ? keep_scale : 0.f;
              }
            } else {
              std::fill(fac, fac + BM, keep_scale);
            }
            // dS = P * (fac * dP - delta); the P that multiplied V is fac * P
            exp2_sub(p, lse2, BM);
#pragma omp simd
            for (int i = 0; i < BM; ++i) {
              const float pr = p[i];
              g[i] = pr * (fac[i] * g[i] - delta[i]);
              p[i] = pr * fac[i];
            }
          }
          if (rb.on()) rel_bias_grad_t<BM>(dST, rb, dc2p, dp2c, i0, n0, nk, rows, lay.max_k - 1, scale);
          // -- dV += P^T dO, dK += dS^T Q, dQ += dS K
          gemm_acc(dVa + n0 * Dp, Dp, PT, BM, 1, dOn, Dp, nk4, Dp, rows);
          gemm_acc(dKa + n0 * Dp, Dp, dST, BM, 1, Qn, Dp, nk4, Dp, rows);
          gemm_acc(dQa, Dp, dST, 1, BM, kr.p, kr.ld, BM, Dp, nk);
        });
        T* g = dQ + seq.b * dqs[0] + h * dqs[1] + seq.q0 * dqs[2];
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; ++d) g[(i0 + r) * dqs[2] + d * dqs[3]] = static_cast<T>(dQa[r * Dp + d] * scale);
      }
      }   // query heads of the group
      T* gk = dK + seq.b * dks[0] + hk * dks[1] + seq.k0 * dks[2];
      T* gv = dV + seq.b * dvs[0] + hk * dvs[1] + seq.k0 * dvs[2];
      for (int64_t j = 0; j < Sk; ++j)
        for (int64_t d = 0; d < D; ++d) {
          gk[j * dks[2] + d * dks[3]] = static_cast<T>(dKa[j * Dp + d] * scale);
          gv[j * dvs[2] + d * dvs[3]] = static_cast<T>(dVa[j * Dp + d]);
        }
    }
  }
}

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm, const Band& band, float scale,
              const DropoutParams& drop, const RelBias& rb) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attn_bwd_cpu", [&] {
    switch (query_tile_rows(band)) {
      case 16: backward_kernel<scalar_t, 16>(dout, q, k, v, out, lse, dq, dk, dv, lay, B, m, hm, band, scale, drop, rb); break;
      case 32: backward_kernel<scalar_t, 32>(dout, q, k, v, out, lse, dq, dk, dv, lay, B, m, hm, band, scale, drop, rb); break;
      default: backward_kernel<scalar_t, BLOCK_M>(dout, q, k, v, out, lse, dq, dk, dv, lay, B, m, hm, band, scale, drop, rb);
    }
  });
}

}  // namespace cpu
}  // namespace fused_attn_kernels
