// Counter-based dropout RNG shared by the CPU and CUDA kernels.
//
// Philox-4x32 with 10 rounds, laid out exactly like the Triton kernels
// (fused_attn/backends/triton_common.py, dropout_keep): key = the (62-bit) seed as two 31-bit
// halves, counter = ((row / 4) * Sk + col, batch * H + head, rng_offset as two 31-bit halves).
// Output word row % 4 becomes a uniform float the way triton.language.uint_to_uniform_float
// does, and an element is kept iff uniform >= p.  The keep-mask is a function of the element's
// position only, so the backward pass regenerates it and every engine draws the same mask.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA_HOST_DEVICE inline
#endif

namespace fused_attn_kernels {

// The (seed, offset) pair lives in memory the kernels read (an int64 tensor [2], fused_attn/_rng.py):
// on a GPU a device pointer, read by each kernel with load_state(), so a CUDA graph replays with the
// values a graph-captured torch.randint wrote, never with values frozen at capture time.
struct DropoutParams {
  float p = 0.f;            // drop probability; 0 disables dropout
  float scale = 1.f;        // factor on kept probabilities: 1 / (1 - p) in double, rounded once
  const int64_t* state = nullptr;  // (seed, offset); read by load_state()
  uint32_t k0 = 0, k1 = 0;  // Philox key
  uint32_t c2 = 0, c3 = 0;  // counter words 2 and 3 (the offset)

  static DropoutParams make(double p, const int64_t* state) {
    DropoutParams d;
    d.p = static_cast<float>(p);
    d.scale = p > 0.0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f;
    d.state = state;
    return d;
  }

  // Key and counter words from *state (memory of the caller's side: host for the CPU kernel, device
  // for the CUDA kernels, which call it first thing).  No-op without dropout.
  FA_HOST_DEVICE void load_state() {
    if (p <= 0.f || state == nullptr) return;
    const int64_t seed = state[0], offset = state[1];
    k0 = static_cast<uint32_t>(seed & 0x7FFFFFFF);
    k1 = static_cast<uint32_t>((seed >> 31) & 0x7FFFFFFF);
    c2 = static_cast<uint32_t>(offset & 0x7FFFFFFF);
    c3 = static_cast<uint32_t>((offset >> 31) & 0x7FFFFFFF);
  }
};

FA_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox-4x32-10: the four output words of counter (c0, c1, c2, c3) under key (k0, k1).
struct PhiloxWords {
  uint32_t w[4];
};

FA_HOST_DEVICE PhiloxWords philox4(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                   uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t n0 = philox_mulhi(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t n2 = philox_mulhi(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// triton.language.uint_to_uniform_float for 32-bit words: [0, 1).
FA_HOST_DEVICE float philox_uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Keep (true) or drop element (row, col) of head bh = b * H + h: word row % 4 of the Philox call
// for counter ((row / 4) * k_len + col, bh, offset), so one call serves four rows (the Triton
// kernels draw a tile's keep-mask that way).
FA_HOST_DEVICE bool dropout_keep(const DropoutParams& d, int64_t row, int64_t col, int64_t k_len,
                                 uint32_t bh) {
  const uint32_t c0 = static_cast<uint32_t>((row >> 2) * k_len + col);
  return philox_uniform(philox4(c0, bh, d.c2, d.c3, d.k0, d.k1).w[row & 3]) >= d.p;
}

// Keep bits of rows row0 .. row0 + 3 (row0 a multiple of 4) at column col: one Philox call.
FA_HOST_DEVICE unsigned dropout_keep4(const DropoutParams& d, int64_t row0, int64_t col, int64_t k_len,
                                      uint32_t bh) {
  const PhiloxWords w = philox4(static_cast<uint32_t>((row0 >> 2) * k_len + col), bh, d.c2, d.c3, d.k0, d.k1);
  unsigned bits = 0;
  for (int r = 0; r < 4; ++r) bits |= (philox_uniform(w.w[r]) >= d.p ? 1u : 0u) << r;
  return bits;
}

}  // namespace fused_attn_kernels
