// The CPU kernel's tiles, shared by its forward (cpu_forward.cpp) and backward (cpu_backward.cpp)
// translation units, and the two entry points the ops of fused_attn.cpp call.
// Building blocks (GEMM micro-kernel, exp2, tile loads, score masking): cpu_kernels.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include <ATen/ATen.h>

#include "cpu_kernels.h"

namespace fused_attn_kernels {
namespace cpu {

constexpr int BLOCK_M = 64;   // query rows of a work item (forward) and of the block map's tiles
constexpr int BLOCK_N = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The query tile's height (16, 32 or BLOCK_M; it divides BLOCK_M) for a call's band, in both
// passes.  A tile of bm rows under a band of width w = left + right + 1 computes bm + w - 1 keys per
// row where w are visible: at bm = 64 and ModernBERT's w = 129, a third of the work is on hidden
// keys (at bm = 16, a tenth).  A shorter tile keeps the GEMM micro-kernel's flop rate but re-reads
// the k / v tiles, adds into the dK / dV rows of its keys once more and pays its per-tile
// bookkeeping more often, so the rule takes the largest bm with bm <= w / 8 (waste near a tenth or
// below), 16 at least (benchmarks/cpu_query_tiles.py: w = 33, 129, 257).  Calls with an open side
// (no band, causal alone: waste only on the diagonal tiles) keep BLOCK_M, the dense path unchanged.
// FUSED_ATTN_CPU_QUERY_ROWS=16|32|64 (read per call; docs/configuration.md) overrides the rule.
inline int query_tile_rows(const Band& band) {
  if (const char* env = std::getenv("FUSED_ATTN_CPU_QUERY_ROWS")) {
    const int r = std::atoi(env);
    if (r == 16 || r == 32 || r == 64) return r;
  }
  if (band.left < 0 || band.right < 0) return BLOCK_M;
  const int64_t w = band.left + band.right + 1;
  return w >= 8 * BLOCK_M ? BLOCK_M : w >= 8 * 32 ? 32 : 16;
}

// The key tiles one query tile (rows [i0, i0 + rows), i0 a multiple of 16) visits, in order: calls
// f(n0, nk, TileChecks) for keys [n0, n0 + nk).  The band (causal and the local window, Band) gives
// the loop bounds; only the tiles that cross its edges check it per element.  The block map's
// BLOCK_M x BLOCK_N tiles cover a shorter query tile too (their states hold for any of their rows).
template <typename F>
inline int64_t for_each_key_tile(const MaskDesc& m, int64_t b, int64_t h, int64_t i0, int64_t rows,
                                 int64_t Sq, int64_t Sk, const Band& band, F&& f) {
  const int64_t qb = i0 / BLOCK_M;
  const int64_t i_last = std::min<int64_t>(i0 + rows, Sq) - 1;
  const int64_t off = Sk - Sq;
  int64_t visited = 0;
  int64_t lo = 0, hi = Sk;
  band.clamp_keys(i0, i_last, off, lo, hi);
  if (m.mode == kBlocks) {
    // (the block map holds causal; the window's tiles come from the loop bounds)
    const int64_t kb_hi = std::min(m.n_kb, (hi + BLOCK_N - 1) / BLOCK_N);
    for (int64_t kb = std::max<int64_t>(lo, 0) / BLOCK_N; kb < kb_hi; ++kb) {
      const int8_t st = m.tile(b, h, qb, kb);
      if (st == 0) continue;                      // empty tile: never touched
      const bool partial = st == 1;
      const int64_t n0 = kb * BLOCK_N, nk = std::min<int64_t>(BLOCK_N, Sk - n0);
      f(n0, nk, TileChecks{Sk, band.cuts(i0, i_last, n0, n0 + nk - 1, off), partial});
      ++visited;
    }
    return visited;
  }
  bool needs_mask = false;
  if (m.mode == kKeys) {
    lo = std::max<int64_t>(lo, m.key_start[b]);
    hi = std::min<int64_t>(hi, m.key_end[b]);
    needs_mask = m.key_needs_mask[b] != 0;
  }
  for (int64_t n0 = std::max<int64_t>(lo, 0); n0 < hi; n0 += BLOCK_N) {
    const int64_t nk = std::min<int64_t>(BLOCK_N, hi - n0);
    f(n0, nk, TileChecks{hi, band.cuts(i0, i_last, n0, n0 + nk - 1, off), needs_mask});
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

// DeBERTa's disentangled score on a transposed score tile ST [nk, BM] of unscaled q·k
// (queries i0.., keys n0.., rows valid queries): ST[j][i] += c2p[i0 + i, c] + p2c[n0 + j, c] with
// c = index[i0 + i - (n0 + j) + off], off = max_k - 1 (RelBias).  c2p / p2c: the sequence's row 0
// (RelBias::c2p_rows / p2c_rows), nullptr for an absent table.
template <int BM>
inline void add_rel_bias_t(float* ST, const RelBias& rb, const float* c2p, const float* p2c, int64_t i0,
                           int64_t n0, int64_t nk, int64_t rows, int64_t off) {
  const float* c = c2p ? c2p + i0 * rb.cs_r : nullptr;
  for (int64_t j = 0; j < nk; ++j) {
    float* s = ST + j * BM;
    const int32_t* idx = rb.index + (i0 - n0 - j + off);
    if (c) {
      for (int64_t i = 0; i < rows; ++i) s[i] += c[i * rb.cs_r + idx[i] * rb.cs_p];
    }
    if (p2c) {
      const float* p = p2c + (n0 + j) * rb.ps_r;
      for (int64_t i = 0; i < rows; ++i) s[i] += p[idx[i] * rb.ps_p];
    }
  }
}

// The backward of add_rel_bias_t: dc2p[i0 + i, c] += dS[j][i] * scale, dp2c[n0 + j, c] += the same
// (dST [nk, BM] the score gradient; dc2p / dp2c the sequence's row 0 of the contiguous fp32
// gradients, nullptr for an absent table).  One work item owns a (sequence, head): no races.
template <int BM>
inline void rel_bias_grad_t(const float* dST, const RelBias& rb, float* dc2p, float* dp2c, int64_t i0,
                            int64_t n0, int64_t nk, int64_t rows, int64_t off, float scale) {
  const int64_t P = rb.P;
  float* dc = dc2p ? dc2p + i0 * P : nullptr;
  for (int64_t j = 0; j < nk; ++j) {
    const float* g = dST + j * BM;
    const int32_t* idx = rb.index + (i0 - n0 - j + off);
    if (dc) {
      for (int64_t i = 0; i < rows; ++i) dc[i * P + idx[i]] += g[i] * scale;
    }
    if (dp2c) {
      float* dp = dp2c + (n0 + j) * P;
      for (int64_t i = 0; i < rows; ++i) dp[idx[i]] += g[i] * scale;
    }
  }
}

// The kernels on q's dtype (fp32, fp64, fp16, bf16); out / lse / visited and dq / dk / dv are
// allocated by the caller (fused_attn.cpp).  k / v may have fewer heads than q (grouped-query):
// query head h reads k / v head h / (H / H_kv).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             at::Tensor& visited, const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm,
             const Band& band, float scale, const DropoutParams& drop, const RelBias& rb);

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm, const Band& band, float scale,
              const DropoutParams& drop, const RelBias& rb);

}  // namespace cpu
}  // namespace fused_attn_kernels
