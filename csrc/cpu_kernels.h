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

// C[M, N] += A[M, K] @ B[K, N]; row-major with leading dims lda / ldb / ldc.
// M % 4 == 0 and N % 16 == 0: 4 x 16 register tiles, B rows streamed, A broadcast.
inline void gemm_acc(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
                     int64_t M, int64_t N, int64_t K) {
  for (int64_t i = 0; i < M; i += 4) {
    const float* a0 = A + i * lda;
    const float* a1 = a0 + lda;
    const float* a2 = a1 + lda;
    const float* a3 = a2 + lda;
    for (int64_t j = 0; j < N; j += 16) {
      float* c = C + i * ldc + j;
      v8f c00 = ld8(c), c01 = ld8(c + 8);
      v8f c10 = ld8(c + ldc), c11 = ld8(c + ldc + 8);
      v8f c20 = ld8(c + 2 * ldc), c21 = ld8(c + 2 * ldc + 8);
      v8f c30 = ld8(c + 3 * ldc), c31 = ld8(c + 3 * ldc + 8);
      const float* b = B + j;
      for (int64_t k = 0; k < K; ++k, b += ldb) {
        const v8f b0 = ld8(b), b1 = ld8(b + 8);
        c00 += a0[k] * b0; c01 += a0[k] * b1;
        c10 += a1[k] * b0; c11 += a1[k] * b1;
        c20 += a2[k] * b0; c21 += a2[k] * b1;
        c30 += a3[k] * b0; c31 += a3[k] * b1;
      }
      st8(c, c00); st8(c + 8, c01);
      st8(c + ldc, c10); st8(c + ldc + 8, c11);
      st8(c + 2 * ldc, c20); st8(c + 2 * ldc + 8, c21);
      st8(c + 3 * ldc, c30); st8(c + 3 * ldc + 8, c31);
    }
  }
}

// 2^x in fp32 (~1 ulp), branch-free so loops over it vectorise.  x < -126 (and -inf) -> 0.
inline float exp2_approx(float x) {
  const float xc = x < -126.f ? -126.f : (x > 127.f ? 127.f : x);
  const float t = xc + 12582912.f;  // 1.5 * 2^23: rounds xc to the nearest integer
  const float n = t - 12582912.f;
  const float f = xc - n;           // [-0.5, 0.5]
  int32_t ni;
  std::memcpy(&ni, &t, 4);
  ni -= 0x4B400000;
  float p = 1.5252733804e-5f;       // Taylor series of 2^f = e^(f ln 2), degree 7
  p = p * f + 1.5403530393e-4f;
  p = p * f + 1.3333558146e-3f;
  p = p * f + 9.6181291076e-3f;
  p = p * f + 5.5504108665e-2f;
  p = p * f + 2.4022650696e-1f;
  p = p * f + 6.9314718056e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += ni * (1 << 23);
  float r;
  std::memcpy(&r, &bits, 4);
  return x < -126.f ? 0.f : r;
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

// Where a score tile needs elementwise work beyond "scale the scores".
struct TileChecks {
  int64_t lo, hi;     // visible key range: keys outside are hidden
  bool bounds;        // the tile crosses lo or hi
  bool causal;        // the tile crosses the causal diagonal
  bool load_mask;     // mask values must be read
};

// S[r, c] (raw q.k) -> scaled log2 scores with every mask applied, rows r < rows.
// Row i0 + r sees key j iff lo <= j < hi, j <= i + causal_off (if causal) and the mask shows it.
template <int BN>
inline void finish_scores(float* S, int64_t rows, int64_t i0, int64_t n0, float qk_scale,
                          const TileChecks& tc, int64_t causal_off, const MaskDesc& m, int64_t b,
                          int64_t h, float* mrow) {
  const bool elementwise = tc.bounds || tc.causal || tc.load_mask;
  const bool row_mask_shared = tc.load_mask && m.ms_m == 0;
  const int64_t n_valid = tc.hi - n0 < BN ? tc.hi - n0 : BN;   // columns that may be visible
  if (row_mask_shared) mask_row(mrow, m, b, h, 0, n0, n_valid);
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * BN;
#pragma omp simd
    for (int c = 0; c < BN; ++c) s[c] *= qk_scale;
    if (!elementwise) continue;
    if (tc.load_mask && !row_mask_shared) mask_row(mrow, m, b, h, i0 + r, n0, n_valid);
    // keys j with j < lim are visible, for bounds and causal together
    int64_t lim = tc.hi;
    if (tc.causal && i0 + r + causal_off + 1 < lim) lim = i0 + r + causal_off + 1;
    const int64_t c_lim = lim - n0;
    const int64_t c_lo = tc.lo - n0;
    if (tc.load_mask) {
      for (int64_t c = 0; c < n_valid; ++c) s[c] += mrow[c];
    }
#pragma omp simd
    for (int c = 0; c < BN; ++c) s[c] = (c < c_lim && c >= c_lo) ? s[c] : kNegInf;
  }
}

}  // namespace cpu
}  // namespace fused_attn_kernels
