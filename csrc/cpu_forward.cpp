// The CPU kernel's forward pass.
//
// OpenMP over (batch, head, query block of BLOCK_M rows); per work item BM x D query tiles (BM from
// query_tile_rows: shorter for narrow bands) walk, one after the other, the key tiles the reduced
// mask and the band can show (key ranges, causal / local-window bounds or the
// block map's list of non-empty key blocks) with an online softmax in fp32, exp2 with log2(e) folded into the scale.  Dropout:
// the Philox keep-mask regenerated from (seed, offset) (philox.h), as the backward pass does.
// DeBERTa's disentangled score: the two tables gathered into each score tile (add_rel_bias_t).
// A work item's sequence b has its row offsets and lengths from SeqLayout::seq (mask_desc.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_attn.h"

namespace fused_attn_kernels {
namespace cpu {

template <typename T, int BM>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, at::Tensor& visited, const SeqLayout& lay, int64_t B, const MaskDesc& m,
                    const HeadMask& hm, const Band& band, float scale, const DropoutParams& drop,
                    const RelBias& rb) {
  const int64_t H = q.size(1), D = q.size(3), group = H / k.size(1);
  const int64_t Dp = round_up(D, 16);
  const int64_t nqb = (lay.max_q + BLOCK_M - 1) / BLOCK_M;
  const int64_t drop_k_len = lay.dropout_k_len();
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  float* L = lse.data_ptr<float>();
  int32_t* vis = visited.data_ptr<int32_t>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const float qk_scale = scale * kLog2e;
  const bool dropout = drop.p > 0.f;
  const int64_t items = B * H * nqb;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> ws(Dp * BM + BM * Dp + 2 * BLOCK_N * Dp + BLOCK_N * BM + 5 * BM + BLOCK_N);
    float* QT = ws.data();              // [D, BM]  q tile, transposed
    float* Acc = QT + Dp * BM;          // [BM, Dp] output accumulator
    float* Kb = Acc + BM * Dp;          // [BLOCK_N, Dp] k tile (when it must be copied)
    float* Vb = Kb + BLOCK_N * Dp;      // [BLOCK_N, Dp] v tile (when it must be copied)
    float* ST = Vb + BLOCK_N * Dp;      // [BLOCK_N, BM] scores -> probabilities, transposed
    float* mi = ST + BLOCK_N * BM;      // running max per query (log2 units)
    float* li = mi + BM;                // running sum
    float* mx = li + BM;
    float* mu = mx + BM;
    float* alpha = mu + BM;
    float* mrow = alpha + BM;           // one row of mask values

#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = item % nqb, bh = item / nqb, b = bh / H, h = bh % H;
      const Seq seq = lay.seq(b);
      const int64_t Sq = seq.sq, Sk = seq.sk, k_rows = lay.tk - seq.k0;   // k_rows: readable from Kh
      const int64_t hk = h / group;   // grouped-query: the k / v head this query head reads
      const T* Kh = K + seq.b * ks[0] + hk * ks[1] + seq.k0 * ks[2];
      const T* Vh = V + seq.b * vs[0] + hk * vs[1] + seq.k0 * vs[2];
      const float* c2p = rb.c2p_rows(seq, h);
      const float* p2c = rb.p2c_rows(seq, h);
      float keep_scale = head_scale(hm, b, h);
      if (dropout) keep_scale *= drop.scale;
      T* Ob = O + seq.b * os[0] + h * os[1] + seq.q0 * os[2];
      float* Lb = L + lay.lse_row(seq, h, H);
      int64_t n_vis = 0;   // a query block past a shorter sequence's end visits nothing
      // the work item's BLOCK_M query rows, BM at a time (query_tile_rows)
      const int64_t i_end = std::min<int64_t>((qb + 1) * BLOCK_M, Sq);
      for (int64_t i0 = qb * BLOCK_M; i0 < i_end; i0 += BM) {
        const int64_t rows = std::min<int64_t>(BM, Sq - i0);
        load_tile_t(QT, BM, Q + seq.b * qs[0] + h * qs[1] + (seq.q0 + i0) * qs[2], qs[2], qs[3], rows, D);
        std::fill(Acc, Acc + BM * Dp, 0.f);
        std::fill(mi, mi + BM, kNegInf);
        std::fill(li, li + BM, 0.f);

        n_vis += for_each_key_tile(m, b, h, i0, rows, Sq, Sk, band, [&](int64_t n0, int64_t nk,
                                                                          const TileChecks& tc) {
          const int64_t nk4 = round_up(nk, 4);
          const Rows kr = tile_rows(Kb, Kh, ks[2], ks[3], n0, nk, k_rows, D, Dp);
          const Rows vr = tile_rows(Vb, Vh, vs[2], vs[3], n0, nk, k_rows, D, Dp);
          // -- scores S^T = K Q^T, in log2 units, masked
          std::fill(ST, ST + nk4 * BM, 0.f);
          gemm_acc(ST, BM, kr.p, kr.ld, 1, QT, BM, nk4, BM, D);
          if (rb.on()) add_rel_bias_t<BM>(ST, rb, c2p, p2c, i0, n0, nk, rows, lay.max_k - 1);
          finish_scores_t<BM>(ST, nk, rows, i0, n0, qk_scale, tc, Sk - Sq, band, m, b, h, mrow);
          // -- online softmax over the key rows (a query that has seen nothing keeps m = -inf, l = 0)
          std::copy(mi, mi + BM, mx);
          for (int64_t j = 0; j < nk; ++j) {
            const float* s = ST + j * BM;
#pragma omp simd
            for (int i = 0; i < BM; ++i) mx[i] = std::max(mx[i], s[i]);
          }
#pragma omp simd
          for (int i = 0; i < BM; ++i) {
            mu[i] = mx[i] == kNegInf ? 0.f : mx[i];
            alpha[i] = mi[i];
            mi[i] = mx[i];
          }
          exp2_sub(alpha, mu, BM);
#pragma omp simd
          for (int i = 0; i < BM; ++i) li[i] *= alpha[i];
          for (int64_t j = 0; j < nk; ++j) {
            float* s = ST + j * BM;
            exp2_sub(s, mu, BM);
#pragma omp simd
            for (int i = 0; i < BM; ++i) li[i] += s[i];
            if (dropout) {
              for (int64_t i = 0; i < rows; i += 4) {   // i0 is a multiple of 4: one Philox call per 4 rows
                const unsigned keep = dropout_keep4(drop, i0 + i, n0 + j, drop_k_len, static_cast<uint32_t>(bh));
                for (int r = 0; r < 4 && i + r < rows; ++r)
                  if (!((keep >> r) & 1u)) s[i + r] = 0.f;
              }
            }
          }
          for (int64_t i = 0; i < rows; ++i) {
            float* a = Acc + i * Dp;
            const float al = alpha[i];
#pragma omp simd
            for (int64_t d = 0; d < Dp; ++d) a[d] *= al;
          }
          // -- acc += P V  (P read transposed from S^T)
          gemm_acc(Acc, Dp, ST, 1, BM, vr.p, vr.ld, BM, Dp, nk);
        });

        // -- epilogue: rows that saw nothing give exactly 0 and lse = +inf
        for (int64_t r = 0; r < rows; ++r) {
          const bool empty = li[r] == 0.f;
          const float f = empty ? 0.f : keep_scale / li[r];
          T* o = Ob + (i0 + r) * os[2];
          const float* a = Acc + r * Dp;
          for (int64_t d = 0; d < D; ++d) o[d * os[3]] = static_cast<T>(a[d] * f);
          Lb[i0 + r] = empty ? std::numeric_limits<float>::infinity() : mi[r] + std::log2(li[r]);
        }
      }
      vis[item] = static_cast<int32_t>(n_vis);
    }
  }
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             at::Tensor& visited, const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm,
             const Band& band, float scale, const DropoutParams& drop, const RelBias& rb) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attn_fwd_cpu", [&] {
    switch (query_tile_rows(band)) {
      case 16: forward_kernel<scalar_t, 16>(q, k, v, out, lse, visited, lay, B, m, hm, band, scale, drop, rb); break;
      case 32: forward_kernel<scalar_t, 32>(q, k, v, out, lse, visited, lay, B, m, hm, band, scale, drop, rb); break;
      default: forward_kernel<scalar_t, BLOCK_M>(q, k, v, out, lse, visited, lay, B, m, hm, band, scale, drop, rb);
    }
  });
}

}  // namespace cpu
}  // namespace fused_attn_kernels
