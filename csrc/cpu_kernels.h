// Building blocks of the CPU kernel: a register-blocked fp32 GEMM micro-kernel, a vectorisable
// exp2, tile loads from strided tensors, and the masking of one score tile.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "mask_desc.h"

namespace fused_attn_kernels {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 8 floats; GCC / Clang lower it to one AVX register, or two SSE registers without AVX.
typedef float v8f __attribute__((vector_size(32)));

inline v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// C[M, N] += A[M, K] @ B[K, N].  A is read through strides (A[m, k] = A[m * sa_m + k * sa_k], so
// a transposed operand costs nothing); B and C are row-major with leading dims ldb / ldc.
// M % 4 == 0 and N % 16 == 0: 4 x 16 register tiles, B rows streamed, A broadcast.
inline void gemm_acc(float* C, int64_t ldc, const float* A, int64_t sa_m, int64_t sa_k, const float* B,
                     int64_t ldb, int64_t M, int64_t N, int64_t K) {
  for (int64_t i = 0; i < M; i += 4) {
    const float* a0 = A + i * sa_m;
    const float* a1 = a0 + sa_m;
    const float* a2 = a1 + sa_m;
    const float* a3 = a2 + sa_m;
    for (int64_t j = 0; j < N; j += 16) {
      float* c = C + i * ldc + j;
      v8f c00 = ld8(c), c01 = ld8(c + 8);
      v8f c10 = ld8(c + ldc), c11 = ld8(c + ldc + 8);
      v8f c20 = ld8(c + 2 * ldc), c21 = ld8(c + 2 * ldc + 8);
      v8f c30 = ld8(c + 3 * ldc), c31 = ld8(c + 3 * ldc + 8);
      const float* b = B + j;
      for (int64_t k = 0; k < K; ++k, b += ldb) {
        v8f b0 = ld8(b), b1 = ld8(b + 8);
#if defined(__AVX__)
        __asm__("" : "+x"(b0), "+x"(b1));   // keep B in registers, not re-read by every FMA
#endif
        const float x0 = a0[k * sa_k], x1 = a1[k * sa_k], x2 = a2[k * sa_k], x3 = a3[k * sa_k];
        c00 += x0 * b0; c01 += x0 * b1;
        c10 += x1 * b0; c11 += x1 * b1;
        c20 += x2 * b0; c21 += x2 * b1;
        c30 += x3 * b0; c31 += x3 * b1;
      }
      st8(c, c00); st8(c + 8, c01);
      st8(c + ldc, c10); st8(c + ldc + 8, c11);
      st8(c + 2 * ldc, c20); st8(c + 2 * ldc + 8, c21);
      st8(c + 3 * ldc, c30); st8(c + 3 * ldc + 8, c31);
    }
  }
}

typedef int32_t v8i __attribute__((vector_size(32)));

// 2^x in fp32 (~1 ulp) on 8 lanes; x < -126 (and -inf) -> 0.
inline v8f exp2_v8(v8f x) {
  const v8f lo = v8f{} - 126.f, hi = v8f{} + 127.f;
  const v8i under = x < lo;
  v8f xc = (v8f)(((v8i)x & ~under) | ((v8i)lo & under));
  const v8i over = xc > hi;
  xc = (v8f)(((v8i)xc & ~over) | ((v8i)hi & over));
  const v8f t = xc + 12582912.f;   // 1.5 * 2^23: rounds xc to the nearest integer
  const v8f f = xc - (t - 12582912.f);   // [-0.5, 0.5]
  const v8i n = (v8i)t - 0x4B400000;
  v8f p = v8f{} + 1.5252733804e-5f;   // Taylor series of 2^f = e^(f ln 2), degree 7
  p = p * f + 1.5403530393e-4f;
  p = p * f + 1.3333558146e-3f;
  p = p * f + 9.6181291076e-3f;
  p = p * f + 5.5504108665e-2f;
  p = p * f + 2.4022650696e-1f;
  p = p * f + 6.9314718056e-1f;
  p = p * f + 1.0f;
  return (v8f)(((v8i)p + (n << 23)) & ~under);
}

// x[i] = 2^(x[i] - sub[i]) for i < n (n % 8 == 0).
inline void exp2_sub(float* x, const float* sub, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) st8(x + i, exp2_v8(ld8(x + i) - ld8(sub + i)));
}

inline float exp2_scalar(float x) {
  float buf[8] = {x, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  return exp2_v8(ld8(buf))[0];
}

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// dst[r * ld + d] = src[r * s_r + d * s_d] as fp32 for r < rows, d < D; zero elsewhere up to
// (rows_pad, ld).
template <typename T>
inline void load_tile(float* dst, int64_t ld, const T* src, int64_t s_r, int64_t s_d, int64_t rows,
                      int64_t rows_pad, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * s_r;
    float* d = dst + r * ld;
    if (s_d == 1) {
      for (int64_t c = 0; c < D; ++c) d[c] = to_float(s[c]);
    } else {
      for (int64_t c = 0; c < D; ++c) d[c] = to_float(s[c * s_d]);
    }
    for (int64_t c = D; c < ld; ++c) d[c] = 0.f;
  }
  for (int64_t r = rows; r < rows_pad; ++r) std::memset(dst + r * ld, 0, sizeof(float) * ld);
}

// dst[d * ld + r] = src[r * s_r + d * s_d] (transposed) for r < rows, d < D; zero for rows..ld.
template <typename T>
inline void load_tile_t(float* dst, int64_t ld, const T* src, int64_t s_r, int64_t s_d, int64_t rows,
                        int64_t D) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = rows; r < ld; ++r) dst[d * ld + r] = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * s_r;
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = to_float(s[d * s_d]);
  }
}

// One row of mask values as fp32 score offsets in log2 units: hidden -> -inf, visible -> 0
// (visibility masks) or value * log2(e) (additive masks).
template <typename M>
inline void mask_row_typed(float* out, const M* src, int64_t s_n, int64_t n, bool additive) {
  for (int64_t c = 0; c < n; ++c) {
    const float v = to_float(src[c * s_n]);
    out[c] = additive ? (v > kHidden ? v * kLog2e : kNegInf) : (v != 0.f ? 0.f : kNegInf);
  }
}

inline void mask_row(float* out, const MaskDesc& m, int64_t b, int64_t h, int64_t i, int64_t j0,
                     int64_t n) {
  const int64_t off = b * m.ms_b + h * m.ms_h + i * m.ms_m + j0 * m.ms_n;
  switch (m.type) {
    case kU8: mask_row_typed(out, static_cast<const uint8_t*>(m.values) + off, m.ms_n, n, false); break;
    case kF32: mask_row_typed(out, static_cast<const float*>(m.values) + off, m.ms_n, n, true); break;
    case kF16: mask_row_typed(out, static_cast<const c10::Half*>(m.values) + off, m.ms_n, n, true); break;
    default: mask_row_typed(out, static_cast<const c10::BFloat16*>(m.values) + off, m.ms_n, n, true); break;
  }
}

// Elementwise work a score tile needs beyond "scale the scores" (bounds need none: the kernels
// only read the nk = min(BLOCK_N, hi - n0) key rows of a tile that lie inside [lo, hi)).
struct TileChecks {
  int64_t hi;         // keys >= hi are hidden (rows past it are never read)
  bool band;          // the tile crosses an edge of the band (causal diagonal, local window)
  bool load_mask;     // mask values must be read
};

// Transposed score tile ST[j, i] (key j of the tile, query i; row pitch BM) from raw k.q to
// log2 units with every mask applied, for key rows j < nk.  Query i0 + i sees key n0 + j iff
// the band shows it (Band::sees with off = Sk - Sq; checked only in tiles that cross its edges) and
// the mask shows it.
template <int BM>
inline void finish_scores_t(float* ST, int64_t nk, int64_t rows, int64_t i0, int64_t n0, float qk_scale,
                            const TileChecks& tc, int64_t off, const Band& band, const MaskDesc& m, int64_t b,
                            int64_t h, float* mrow) {
  const bool shared_row = m.ms_m == 0;        // the same mask row for every query
  if (tc.load_mask && shared_row) mask_row(mrow, m, b, h, 0, n0, nk);
  for (int64_t j = 0; j < nk; ++j) {
    float* s = ST + j * BM;
    const float add = (tc.load_mask && shared_row) ? mrow[j] : 0.f;
    if (add == kNegInf) {   // a hidden key: its score is -inf whatever k holds (NaN + -inf would be NaN)
      std::fill(s, s + BM, kNegInf);
      continue;
    }
#pragma omp simd
    for (int i = 0; i < BM; ++i) s[i] = s[i] * qk_scale + add;
    if (tc.band) {
      if (band.right >= 0) {
        const int64_t first = n0 + j - off - band.right - i0;   // first query column that sees key j
        for (int64_t i = 0; i < BM && i < first; ++i) s[i] = kNegInf;
      }
      if (band.left >= 0) {
        const int64_t last = n0 + j - off + band.left - i0;     // last query column that sees key j
        for (int64_t i = last < 0 ? 0 : last + 1; i < BM; ++i) s[i] = kNegInf;
      }
    }
  }
  if (tc.load_mask && !shared_row) {
    for (int64_t i = 0; i < rows; ++i) {
      mask_row(mrow, m, b, h, i0 + i, n0, nk);
      for (int64_t j = 0; j < nk; ++j) ST[j * BM + i] = mask_add(ST[j * BM + i], mrow[j]);
    }
  }
}

}  // namespace cpu
}  // namespace fused_attn_kernels
