// fused_attn C++ ops: the TORCH_LIBRARY schema and the CPU kernel.
//
// Forward: OpenMP over (batch, head, query block); per work item a BLOCK_M x D query tile walks
// the key tiles the reduced mask can show (key ranges, causal bounds or the block map's list of
// non-empty key blocks) with an online softmax in fp32, exp2 with log2(e) folded into the scale.
// Backward: OpenMP over (batch, head); each item recomputes the probabilities from the saved
// log-sum-exp tile by tile and accumulates dQ, dK, dV in fp32 (no atomics, no [Sq, Sk] buffer).
// Dropout: Philox keep-mask regenerated from (seed, offset) in both passes (philox.h).
// Padded and packed (varlen) batches are the same kernels: a work item's sequence b has its row
// offsets and lengths from SeqLayout::seq (mask_desc.h), and everything below is relative to them.
// Semantics: docs/design.md / fused_attn.reference.  The CUDA kernels are in cuda/.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "op_schema.h"

namespace fused_attn_kernels {
namespace cpu {

constexpr int BLOCK_M = 64;
constexpr int BLOCK_N = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The key tiles one query block visits, in order: calls f(n0, nk, TileChecks) for keys
// [n0, n0 + nk) (all inside the visible range).
template <typename F>
inline int64_t for_each_key_tile(const MaskDesc& m, int64_t b, int64_t h, int64_t qb, int64_t Sq,
                                 int64_t Sk, bool causal, F&& f) {
  const int64_t i0 = qb * BLOCK_M;
  const int64_t i_last = std::min<int64_t>(i0 + BLOCK_M, Sq) - 1;
  const int64_t off = Sk - Sq;
  int64_t visited = 0;
  if (m.mode == kBlocks) {
    for (int64_t kb = 0; kb < m.n_kb; ++kb) {
      const int8_t st = m.tile(b, h, qb, kb);
      if (st == 0) continue;                      // empty tile: never touched
      const bool partial = st == 1;               // edge / diagonal tiles are always partial
      const int64_t n0 = kb * BLOCK_N;
      f(n0, std::min<int64_t>(BLOCK_N, Sk - n0), TileChecks{Sk, partial && causal, partial});
      ++visited;
    }
    return visited;
  }
  int64_t lo = 0, hi = Sk;
  bool needs_mask = false;
  if (m.mode == kKeys) {
    lo = m.key_start[b];
    hi = m.key_end[b];
    needs_mask = m.key_needs_mask[b] != 0;
  }
  if (causal) hi = std::min(hi, i_last + off + 1);
  for (int64_t n0 = lo; n0 < hi; n0 += BLOCK_N) {
    f(n0, std::min<int64_t>(BLOCK_N, hi - n0), TileChecks{hi, causal && n0 + BLOCK_N - 1 > i0 + off, needs_mask});
    ++visited;
  }
  return visited;
}

inline float head_scale(const HeadMask& hm, int64_t b, int64_t h) {
  return hm.ptr ? hm.ptr[b * hm.s_b + h * hm.s_h] : 1.f;
}

// Rows [n0, n0 + nk) of a [S, D] slice as an fp32 row-major operand (row pitch ld, unit column
// stride, D <= ld columns readable, rows up to round_up(nk, 4) readable): the tensor itself when
// it is fp32 with a fitting layout, else a zero-padded copy in buf (pitch Dp).
struct Rows {
  const float* p;
  int64_t ld;
};

template <typename T>
inline Rows tile_rows(float* buf, const T* base, int64_t s_r, int64_t s_d, int64_t n0, int64_t nk,
                      int64_t S, int64_t D, int64_t Dp) {
  const int64_t nk4 = round_up(nk, 4);
  if constexpr (std::is_same<T, float>::value) {
    if (s_d == 1 && D == Dp && n0 + nk4 <= S) return {base + n0 * s_r, s_r};
  }
  load_tile(buf, Dp, base + n0 * s_r, s_r, s_d, nk, nk4, D);
  return {buf, Dp};
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, at::Tensor& visited, const SeqLayout& lay, int64_t B, const MaskDesc& m,
                    const HeadMask& hm, bool causal, float scale, const DropoutParams& drop) {
  const int64_t H = q.size(1), D = q.size(3);
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
    std::vector<float> ws(Dp * BLOCK_M + BLOCK_M * Dp + 2 * BLOCK_N * Dp + BLOCK_N * BLOCK_M + 5 * BLOCK_M + BLOCK_N);
    float* QT = ws.data();                  // [D, BLOCK_M]  q tile, transposed
    float* Acc = QT + Dp * BLOCK_M;         // [BLOCK_M, Dp] output accumulator
    float* Kb = Acc + BLOCK_M * Dp;         // [BLOCK_N, Dp] k tile (when it must be copied)
    float* Vb = Kb + BLOCK_N * Dp;          // [BLOCK_N, Dp] v tile (when it must be copied)
    float* ST = Vb + BLOCK_N * Dp;          // [BLOCK_N, BLOCK_M] scores -> probabilities, transposed
    float* mi = ST + BLOCK_N * BLOCK_M;     // running max per query (log2 units)
    float* li = mi + BLOCK_M;               // running sum
    float* mx = li + BLOCK_M;
    float* mu = mx + BLOCK_M;
    float* alpha = mu + BLOCK_M;
    float* mrow = alpha + BLOCK_M;          // one row of mask values

#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = item % nqb, bh = item / nqb, b = bh / H, h = bh % H;
      const Seq seq = lay.seq(b);
      const int64_t Sq = seq.sq, Sk = seq.sk, k_rows = lay.tk - seq.k0;   // k_rows: readable from Kh
      const int64_t i0 = qb * BLOCK_M;
      if (i0 >= Sq) {   // a query block past a shorter sequence's end
        vis[item] = 0;
        continue;
      }
      const int64_t rows = std::min<int64_t>(BLOCK_M, Sq - i0);
      load_tile_t(QT, BLOCK_M, Q + seq.b * qs[0] + h * qs[1] + (seq.q0 + i0) * qs[2], qs[2], qs[3], rows, D);
      std::fill(Acc, Acc + BLOCK_M * Dp, 0.f);
      std::fill(mi, mi + BLOCK_M, kNegInf);
      std::fill(li, li + BLOCK_M, 0.f);
      const T* Kh = K + seq.b * ks[0] + h * ks[1] + seq.k0 * ks[2];
      const T* Vh = V + seq.b * vs[0] + h * vs[1] + seq.k0 * vs[2];

      const int64_t n_vis = for_each_key_tile(m, b, h, qb, Sq, Sk, causal, [&](int64_t n0, int64_t nk,
                                                                              const TileChecks& tc) {
        const int64_t nk4 = round_up(nk, 4);
        const Rows kr = tile_rows(Kb, Kh, ks[2], ks[3], n0, nk, k_rows, D, Dp);
        const Rows vr = tile_rows(Vb, Vh, vs[2], vs[3], n0, nk, k_rows, D, Dp);
        // -- scores S^T = K Q^T, in log2 units, masked
        std::fill(ST, ST + nk4 * BLOCK_M, 0.f);
        gemm_acc(ST, BLOCK_M, kr.p, kr.ld, 1, QT, BLOCK_M, nk4, BLOCK_M, D);
        finish_scores_t<BLOCK_M>(ST, nk, rows, i0, n0, qk_scale, tc, Sk - Sq, m, b, h, mrow);
        // -- online softmax over the key rows (a query that has seen nothing keeps m = -inf, l = 0)
        std::copy(mi, mi + BLOCK_M, mx);
        for (int64_t j = 0; j < nk; ++j) {
          const float* s = ST + j * BLOCK_M;
#pragma omp simd
          for (int i = 0; i < BLOCK_M; ++i) mx[i] = std::max(mx[i], s[i]);
        }
#pragma omp simd
        for (int i = 0; i < BLOCK_M; ++i) {
          mu[i] = mx[i] == kNegInf ? 0.f : mx[i];
          alpha[i] = mi[i];
          mi[i] = mx[i];
        }
        exp2_sub(alpha, mu, BLOCK_M);
#pragma omp simd
        for (int i = 0; i < BLOCK_M; ++i) li[i] *= alpha[i];
        for (int64_t j = 0; j < nk; ++j) {
          float* s = ST + j * BLOCK_M;
          exp2_sub(s, mu, BLOCK_M);
#pragma omp simd
          for (int i = 0; i < BLOCK_M; ++i) li[i] += s[i];
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
        gemm_acc(Acc, Dp, ST, 1, BLOCK_M, vr.p, vr.ld, BLOCK_M, Dp, nk);
      });
      vis[item] = static_cast<int32_t>(n_vis);

      // -- epilogue: rows that saw nothing give exactly 0 and lse = +inf
      float keep_scale = head_scale(hm, b, h);
      if (dropout) keep_scale *= drop.scale;
      T* Ob = O + seq.b * os[0] + h * os[1] + seq.q0 * os[2];
      float* Lb = L + lay.lse_row(seq, h, H);
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = li[r] == 0.f;
        const float f = empty ? 0.f : keep_scale / li[r];
        T* o = Ob + (i0 + r) * os[2];
        const float* a = Acc + r * Dp;
        for (int64_t d = 0; d < D; ++d) o[d * os[3]] = static_cast<T>(a[d] * f);
        Lb[i0 + r] = empty ? std::numeric_limits<float>::infinity() : mi[r] + std::log2(li[r]);
      }
    }
  }
}

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv, const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm,
                     bool causal, float scale, const DropoutParams& drop) {
  const int64_t H = q.size(1), D = q.size(3);
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
    std::vector<float> ws(2 * Dp * BLOCK_M + 3 * BLOCK_M * Dp + 2 * BLOCK_N * Dp + 2 * BLOCK_N * BLOCK_M +
                          3 * BLOCK_M + BLOCK_N + 2 * Skp * Dp);
    float* QT = ws.data();                  // [D, BLOCK_M]  q tile, transposed
    float* dOT = QT + Dp * BLOCK_M;         // [D, BLOCK_M]  dO tile, transposed
    float* Qn = dOT + Dp * BLOCK_M;         // [BLOCK_M, Dp] q tile
    float* dOn = Qn + BLOCK_M * Dp;         // [BLOCK_M, Dp] dO tile (O first, for delta)
    float* dQa = dOn + BLOCK_M * Dp;        // [BLOCK_M, Dp] dQ accumulator
    float* Kb = dQa + BLOCK_M * Dp;         // [BLOCK_N, Dp]
    float* Vb = Kb + BLOCK_N * Dp;          // [BLOCK_N, Dp]
    float* PT = Vb + BLOCK_N * Dp;          // [BLOCK_N, BLOCK_M] P^T -> dropped, head-masked P^T
    float* dST = PT + BLOCK_N * BLOCK_M;    // [BLOCK_N, BLOCK_M] dP^T -> dS^T
    float* lse2 = dST + BLOCK_N * BLOCK_M;
    float* delta = lse2 + BLOCK_M;
    float* fac = delta + BLOCK_M;           // keep * head_mask / (1 - p) of one key row
    float* mrow = fac + BLOCK_M;
    float* dKa = mrow + BLOCK_N;            // [Skp, Dp]
    float* dVa = dKa + Skp * Dp;            // [Skp, Dp]

#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Seq seq = lay.seq(b);
      const int64_t Sq = seq.sq, Sk = seq.sk, k_rows = lay.tk - seq.k0;   // k_rows: readable from Kh
      const int64_t nqb = (Sq + BLOCK_M - 1) / BLOCK_M;
      std::fill(dKa, dKa + (Sk + BLOCK_N) * Dp, 0.f);
      std::fill(dVa, dVa + (Sk + BLOCK_N) * Dp, 0.f);
      float keep_scale = head_scale(hm, b, h);
      if (dropout) keep_scale *= drop.scale;
      const T* Kh = K + seq.b * ks[0] + h * ks[1] + seq.k0 * ks[2];
      const T* Vh = V + seq.b * vs[0] + h * vs[1] + seq.k0 * vs[2];
      const float* Lh = L + lay.lse_row(seq, h, H);
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * BLOCK_M, rows = std::min<int64_t>(BLOCK_M, Sq - i0);
        const T* Qt = Q + seq.b * qs[0] + h * qs[1] + (seq.q0 + i0) * qs[2];
        const T* Gt = dO + seq.b * gs[0] + h * gs[1] + (seq.q0 + i0) * gs[2];
        load_tile_t(QT, BLOCK_M, Qt, qs[2], qs[3], rows, D);
        load_tile_t(dOT, BLOCK_M, Gt, gs[2], gs[3], rows, D);
        load_tile(Qn, Dp, Qt, qs[2], qs[3], rows, BLOCK_M, D);
        // delta = rowsum(dO * O), O as stored (rounded to the input dtype, like the eager graph)
        load_tile(dOn, Dp, O + seq.b * os[0] + h * os[1] + (seq.q0 + i0) * os[2], os[2], os[3], rows, BLOCK_M, D);
        for (int64_t i = 0; i < BLOCK_M; ++i) {
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += dOT[d * BLOCK_M + i] * dOn[i * Dp + d];
          delta[i] = acc;
          lse2[i] = i < rows ? Lh[i0 + i] : std::numeric_limits<float>::infinity();
        }
        load_tile(dOn, Dp, Gt, gs[2], gs[3], rows, BLOCK_M, D);
        std::fill(dQa, dQa + BLOCK_M * Dp, 0.f);
        for_each_key_tile(m, b, h, qb, Sq, Sk, causal, [&](int64_t n0, int64_t nk, const TileChecks& tc) {
          const int64_t nk4 = round_up(nk, 4);
          const Rows kr = tile_rows(Kb, Kh, ks[2], ks[3], n0, nk, k_rows, D, Dp);
          const Rows vr = tile_rows(Vb, Vh, vs[2], vs[3], n0, nk, k_rows, D, Dp);
          // -- P^T from the saved log-sum-exp (rows that saw nothing: lse = +inf -> P = 0)
          std::fill(PT, PT + nk4 * BLOCK_M, 0.f);
          gemm_acc(PT, BLOCK_M, kr.p, kr.ld, 1, QT, BLOCK_M, nk4, BLOCK_M, D);
          finish_scores_t<BLOCK_M>(PT, nk, rows, i0, n0, qk_scale, tc, Sk - Sq, m, b, h, mrow);
          // -- dP^T = V dO^T
          std::fill(dST, dST + nk4 * BLOCK_M, 0.f);
          gemm_acc(dST, BLOCK_M, vr.p, vr.ld, 1, dOT, BLOCK_M, nk4, BLOCK_M, D);
          for (int64_t j = 0; j < nk4; ++j) {
            float* p = PT + j * BLOCK_M;
            float* g = dST + j * BLOCK_M;
            if (j >= nk) {
              std::fill(p, p + BLOCK_M, 0.f);
              std::fill(g, g + BLOCK_M, 0.f);
              continue;
            }
            if (dropout) {
              for (int64_t i = 0; i < BLOCK_M; i += 4) {
                const unsigned keep = i < rows ? dropout_keep4(drop, i0 + i, n0 + j, drop_k_len, static_cast<uint32_t>(bh)) : 0u;
                for (int r = 0; r < 4; ++r) fac[i + r] = i + r < rows && ((keep >> r) & 1u) ? keep_scale : 0.f;
              }
            } else {
              std::fill(fac, fac + BLOCK_M, keep_scale);
            }
            // dS = P * (fac * dP - delta); the P that multiplied V is fac * P
            exp2_sub(p, lse2, BLOCK_M);
#pragma omp simd
            for (int i = 0; i < BLOCK_M; ++i) {
              const float pr = p[i];
              g[i] = pr * (fac[i] * g[i] - delta[i]);
              p[i] = pr * fac[i];
            }
          }
          // -- dV += P^T dO, dK += dS^T Q, dQ += dS K
          gemm_acc(dVa + n0 * Dp, Dp, PT, BLOCK_M, 1, dOn, Dp, nk4, Dp, rows);
          gemm_acc(dKa + n0 * Dp, Dp, dST, BLOCK_M, 1, Qn, Dp, nk4, Dp, rows);
          gemm_acc(dQa, Dp, dST, 1, BLOCK_M, kr.p, kr.ld, BLOCK_M, Dp, nk);
        });
        T* g = dQ + seq.b * dqs[0] + h * dqs[1] + seq.q0 * dqs[2];
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; ++d) g[(i0 + r) * dqs[2] + d * dqs[3]] = static_cast<T>(dQa[r * Dp + d] * scale);
      }
      T* gk = dK + seq.b * dks[0] + h * dks[1] + seq.k0 * dks[2];
      T* gv = dV + seq.b * dvs[0] + h * dvs[1] + seq.k0 * dvs[2];
      for (int64_t j = 0; j < Sk; ++j)
        for (int64_t d = 0; d < D; ++d) {
          gk[j * dks[2] + d * dks[3]] = static_cast<T>(dKa[j * Dp + d] * scale);
          gv[j * dvs[2] + d * dvs[3]] = static_cast<T>(dVa[j * Dp + d]);
        }
    }
  }
}

// Packed batches: the row ranges [r0, r1) of [0, t) that lie in no sequence (cu, max_len as in
// SeqLayout::seq).  None when cu_seqlens is valid; only garbage leaves rows uncovered.
inline std::vector<std::pair<int64_t, int64_t>> rows_in_no_sequence(const int32_t* cu, int64_t B, int64_t t,
                                                                   int64_t max_len) {
  std::vector<char> covered(t, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t r0, n;
    packed_rows(cu, b, t, max_len, r0, n);
    std::fill(covered.begin() + r0, covered.begin() + r0 + n, 1);
  }
  std::vector<std::pair<int64_t, int64_t>> gaps;
  for (int64_t r = 0; r < t;) {
    if (covered[r]) { ++r; continue; }
    const int64_t r0 = r;
    while (r < t && !covered[r]) ++r;
    gaps.emplace_back(r0, r);
  }
  return gaps;
}

// Rows [r0, r1) of every head of a [1, H, t, D] or [1, H, t] tensor (any strides) set to value.
inline void fill_rows(at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& gaps, double value) {
  for (const auto& g : gaps) x.narrow(2, g.first, g.second - g.first).fill_(value);
}

// The results of a packed call, allocated without a fill pass (the kernels write every row that
// lies in a sequence, one pass over memory saved per call): rows in no sequence get their defined
// values (out / dq / dk / dv 0, lse +inf) here.  Padded calls: mask_desc.h's allocators.
inline void allocate_forward_packed(const at::Tensor& q, const SeqLayout& lay, int64_t B, int64_t block_m,
                                    at::Tensor& out, at::Tensor& lse, at::Tensor& visited) {
  const int64_t H = q.size(1), nqb = (lay.max_q + block_m - 1) / block_m;
  out = at::empty({q.size(0), q.size(2), H, q.size(3)}, q.options()).transpose(1, 2);   // token-major
  lse = at::empty({1, H, q.size(2)}, q.options().dtype(at::kFloat));
  visited = at::zeros({B, H, nqb}, q.options().dtype(at::kInt));
  const auto gaps = rows_in_no_sequence(lay.cu_q, B, lay.tq, lay.max_q);
  fill_rows(out, gaps, 0.0);
  fill_rows(lse, gaps, std::numeric_limits<double>::infinity());
}

inline void allocate_backward_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const SeqLayout& lay, int64_t B, at::Tensor& dq, at::Tensor& dk,
                                     at::Tensor& dv) {
  auto token_major = [](const at::Tensor& t) {
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  };
  dq = token_major(q);
  dk = token_major(k);
  dv = token_major(v);
  fill_rows(dq, rows_in_no_sequence(lay.cu_q, B, lay.tq, lay.max_q), 0.0);
  const auto gaps_k = rows_in_no_sequence(lay.cu_k, B, lay.tk, lay.max_k);
  fill_rows(dk, gaps_k, 0.0);
  fill_rows(dv, gaps_k, 0.0);
}

}  // namespace cpu

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "fused_attn: q [B, H, Sq, D], k / v [B, H, Sk, D] expected, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fused_attn: q, k, v must share a dtype");
}

std::tuple<Tensor, Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& mask,
                                           const OptT& key_start, const OptT& key_end, const OptT& key_needs_mask,
                                           const OptT& block_state, const OptT& head_mask, bool additive, bool causal, double scale,
                                           double dropout_p, const OptT& rng, int64_t block_m,
                                           int64_t block_n, const OptT& cu_seqlens_q, const OptT& cu_seqlens_k,
                                           int64_t max_seqlen_q, int64_t max_seqlen_k) {
  check_qkv(q, k, v);
  TORCH_CHECK(block_m == cpu::BLOCK_M && block_n == cpu::BLOCK_N, "fused_attn: the CPU kernel uses ",
              cpu::BLOCK_M, " x ", cpu::BLOCK_N, " tiles, got ", block_m, " x ", block_n);
  const SeqLayout lay = make_seq_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                                        key_start, block_state, head_mask);
  const MaskDesc md = make_mask_desc(q, k.size(2), mask, additive, key_start, key_end, key_needs_mask,
                                     block_state, block_m, block_n);
  const HeadMask hm = make_head_mask(head_mask, q);
  DropoutParams drop = make_dropout(dropout_p, rng, q.device());
  drop.load_state();   // a CPU tensor: read on the host
  const int64_t B = seq_count(q, cu_seqlens_q);
  Tensor out, lse, visited;
  if (lay.packed())
    cpu::allocate_forward_packed(q, lay, B, block_m, out, lse, visited);
  else
    allocate_forward(q, lay, B, block_m, out, lse, visited);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attn_fwd_cpu", [&] {
    cpu::forward_kernel<scalar_t>(q, k, v, out, lse, visited, lay, B, md, hm, causal, static_cast<float>(scale),
                                  drop);
  });
  return {out, lse, visited};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                           const Tensor& v, const Tensor& out, const Tensor& lse,
                                           const OptT& mask, const OptT& key_start, const OptT& key_end,
                                           const OptT& key_needs_mask, const OptT& block_state,
                                           const OptT& head_mask, bool additive,
                                           bool causal, double scale, double dropout_p, const OptT& rng,
                                           int64_t block_m, int64_t block_n,
                                           const OptT& cu_seqlens_q, const OptT& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k) {
  check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "fused_attn: grad_out and out must match q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "fused_attn: lse must be contiguous float32 [B, H, Sq] ([1, H, Tq] when packed)");
  TORCH_CHECK(block_m == cpu::BLOCK_M && block_n == cpu::BLOCK_N, "fused_attn: the CPU kernel uses ",
              cpu::BLOCK_M, " x ", cpu::BLOCK_N, " tiles, got ", block_m, " x ", block_n);
  const SeqLayout lay = make_seq_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                                        key_start, block_state, head_mask);
  const MaskDesc md = make_mask_desc(q, k.size(2), mask, additive, key_start, key_end, key_needs_mask,
                                     block_state, block_m, block_n);
  const HeadMask hm = make_head_mask(head_mask, q);
  DropoutParams drop = make_dropout(dropout_p, rng, q.device());
  drop.load_state();
  Tensor dq, dk, dv;
  const int64_t B = seq_count(q, cu_seqlens_q);
  if (lay.packed())
    cpu::allocate_backward_packed(q, k, v, lay, B, dq, dk, dv);
  else
    allocate_backward(q, k, v, lay, dq, dk, dv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attn_bwd_cpu", [&] {
    cpu::backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, dq, dk, dv, lay, B, md,
                                   hm, causal, static_cast<float>(scale), drop);
  });
  return {dq, dk, dv};
}

Tensor dropout_keep_cpu(const Tensor& rng, int64_t batch, int64_t heads, int64_t q_len, int64_t k_len,
                        double dropout_p) {
  DropoutParams drop = make_dropout(dropout_p, rng, rng.device());
  drop.load_state();
  Tensor keep = at::empty({batch, heads, q_len, k_len}, rng.options().dtype(at::kBool));
  bool* p = keep.data_ptr<bool>();
  at::parallel_for(0, batch * heads * q_len, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t bh = static_cast<uint32_t>(row / q_len);
      const int64_t i = row % q_len;
      for (int64_t j = 0; j < k_len; ++j) p[row * k_len + j] = dropout_keep(drop, i, j, k_len, bh);
    }
  });
  return keep;
}

}  // namespace
}  // namespace fused_attn_kernels

TORCH_LIBRARY(fused_attn, m) {
  m.def(fused_attn_kernels::kFwdSchema);
  m.def(fused_attn_kernels::kBwdSchema);
  m.def(fused_attn_kernels::kDropoutKeepSchema);
}

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("fwd", &fused_attn_kernels::fwd_cpu);
  m.impl("bwd", &fused_attn_kernels::bwd_cpu);
  m.impl("dropout_keep", &fused_attn_kernels::dropout_keep_cpu);
}
