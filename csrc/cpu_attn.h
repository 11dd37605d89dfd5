// The CPU kernel's tiles, shared by its forward (cpu_forward.cpp) and backward (cpu_backward.cpp)
// translation units, and the two entry points the ops of fused_attn.cpp call.
// Building blocks (GEMM micro-kernel, exp2, tile loads, score masking): cpu_kernels.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>

#include "cpu_kernels.h"

namespace fused_attn_kernels {
namespace cpu {

constexpr int BLOCK_M = 64;
constexpr int BLOCK_N = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The key tiles one query block visits, in order: calls f(n0, nk, TileChecks) for keys
// [n0, n0 + nk).  The band (causal and the local window, Band) gives the loop bounds; only the tiles
// that cross its edges check it per element.
template <typename F>
inline int64_t for_each_key_tile(const MaskDesc& m, int64_t b, int64_t h, int64_t qb, int64_t Sq,
                                 int64_t Sk, const Band& band, F&& f) {
  const int64_t i0 = qb * BLOCK_M;
  const int64_t i_last = std::min<int64_t>(i0 + BLOCK_M, Sq) - 1;
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

// The kernels on q's dtype (fp32, fp64, fp16, bf16); out / lse / visited and dq / dk / dv are
// allocated by the caller (fused_attn.cpp).  k / v may have fewer heads than q (grouped-query):
// query head h reads k / v head h / (H / H_kv).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             at::Tensor& visited, const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm,
             const Band& band, float scale, const DropoutParams& drop);

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const SeqLayout& lay, int64_t B, const MaskDesc& m, const HeadMask& hm, const Band& band, float scale,
              const DropoutParams& drop);

}  // namespace cpu
}  // namespace fused_attn_kernels
