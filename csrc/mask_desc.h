// The reduced mask (fused_attn.masks.ReducedMask) as plain pointers and strides, shared by the
// CPU and CUDA kernels, plus the host-side code that fills it from the op's tensor arguments.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "philox.h"

namespace fused_attn_kernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kHidden = -1.0e4f;  // masks.HIDDEN_THRESHOLD: additive entries <= this hide the key

enum MaskMode : int { kNone = 0, kKeys = 1, kBlocks = 2 };
enum MaskType : int { kU8 = 0, kF32 = 1, kF16 = 2, kBF16 = 3 };

struct MaskDesc {
  int mode = kNone;
  bool additive = false;
  int type = kU8;
  const void* values = nullptr;          // [Bm, Hm, Sqm, Sk], stride 0 on broadcast dims
  int64_t ms_b = 0, ms_h = 0, ms_m = 0, ms_n = 0;
  const int32_t* key_start = nullptr;    // kind "keys": [B]
  const int32_t* key_end = nullptr;
  const int32_t* key_dense = nullptr;
  // kind "blocks": tile states [Bm, Hm, nQB|1, nKB] int8 (0 empty, 1 partial, 2 full) for the
  // kernel's BLOCK_M x BLOCK_N tiles (fused_attn.masks.BlockMap.state)
  const int8_t* state = nullptr;
  int64_t ss_b = 0, ss_h = 0, ss_m = 0, ss_n = 0;
  int64_t n_kb = 0;

  FA_HOST_DEVICE int8_t tile(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return state[b * ss_b + h * ss_h + qb * ss_m + kb * ss_n];
  }
};

struct HeadMask {
  const float* ptr = nullptr;            // [1|B, H] fp32
  int64_t s_b = 0, s_h = 0;
};

inline int64_t bcast_stride(const at::Tensor& t, int dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

// Fill a MaskDesc from the op's optional arguments (the mode follows from which are given).
inline MaskDesc make_mask_desc(const at::Tensor& q, int64_t k_len, const std::optional<at::Tensor>& mask,
                               bool additive, const std::optional<at::Tensor>& key_start,
                               const std::optional<at::Tensor>& key_end,
                               const std::optional<at::Tensor>& key_dense,
                               const std::optional<at::Tensor>& block_state, int64_t block_m,
                               int64_t block_n) {
  MaskDesc m;
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2);
  if (!mask.has_value()) {
    TORCH_CHECK(!key_start.has_value() && !block_state.has_value(),
                "fused_attn: key ranges or block lists given without mask values");
    return m;
  }
  const auto& v = *mask;
  TORCH_CHECK(v.dim() == 4 && (v.size(0) == 1 || v.size(0) == B) && (v.size(1) == 1 || v.size(1) == H) &&
                  (v.size(2) == 1 || v.size(2) == Sq) && v.size(3) == k_len,
              "fused_attn: mask values must be [B|1, H|1, Sq|1, Sk] = [", B, "|1, ", H, "|1, ", Sq, "|1, ",
              k_len, "], got ", v.sizes());
  TORCH_CHECK(v.device() == q.device(), "fused_attn: mask on ", v.device(), ", q on ", q.device());
  switch (v.scalar_type()) {
    case at::kByte: m.type = kU8; break;
    case at::kBool: m.type = kU8; break;
    case at::kFloat: m.type = kF32; break;
    case at::kHalf: m.type = kF16; break;
    case at::kBFloat16: m.type = kBF16; break;
    default: TORCH_CHECK(false, "fused_attn: mask values of dtype ", v.scalar_type(), " are not supported");
  }
  TORCH_CHECK(additive == (m.type != kU8), "fused_attn: additive masks are float, visibility masks uint8");
  m.additive = additive;
  m.values = v.data_ptr();
  m.ms_b = bcast_stride(v, 0);
  m.ms_h = bcast_stride(v, 1);
  m.ms_m = bcast_stride(v, 2);
  m.ms_n = v.stride(3);
  if (key_start.has_value()) {
    m.mode = kKeys;
    for (const auto* t : {&key_start, &key_end, &key_dense}) {
      TORCH_CHECK(t->has_value() && (*t)->scalar_type() == at::kInt && (*t)->dim() == 1 &&
                      (*t)->size(0) == B && (*t)->is_contiguous() && (*t)->device() == q.device(),
                  "fused_attn: key_start / key_end / key_dense must be contiguous int32 [", B, "] on ",
                  q.device());
    }
    m.key_start = key_start->data_ptr<int32_t>();
    m.key_end = key_end->data_ptr<int32_t>();
    m.key_dense = key_dense->data_ptr<int32_t>();
  } else {
    m.mode = kBlocks;
    const int64_t nqb = (Sq + block_m - 1) / block_m, nkb = (k_len + block_n - 1) / block_n;
    TORCH_CHECK(block_state.has_value(), "fused_attn: a mask needs key ranges or a block map");
    const auto& st = *block_state;
    TORCH_CHECK(st.scalar_type() == at::kChar && st.dim() == 4 && st.size(0) == v.size(0) &&
                    st.size(1) == v.size(1) && (st.size(2) == nqb || st.size(2) == 1) && st.size(3) == nkb &&
                    st.device() == q.device(),
                "fused_attn: block_state must be int8 [", v.size(0), ", ", v.size(1), ", ", nqb, "|1, ", nkb,
                "] for ", block_m, " x ", block_n, " tiles, got ", st.sizes(), " ", st.scalar_type());
    m.state = st.data_ptr<int8_t>();
    m.ss_b = bcast_stride(st, 0);
    m.ss_h = bcast_stride(st, 1);
    m.ss_m = bcast_stride(st, 2);
    m.ss_n = st.stride(3);
    m.n_kb = nkb;
  }
  return m;
}

inline HeadMask make_head_mask(const std::optional<at::Tensor>& hm, const at::Tensor& q) {
  HeadMask h;
  if (!hm.has_value()) return h;
  const auto& t = *hm;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && (t.size(0) == 1 || t.size(0) == q.size(0)) &&
                  t.size(1) == q.size(1) && t.device() == q.device(),
              "fused_attn: head_mask must be float32 [1|B, H] = [1|", q.size(0), ", ", q.size(1), "] on ",
              q.device(), ", got ", t.sizes(), " ", t.scalar_type());
  h.ptr = t.data_ptr<float>();
  h.s_b = bcast_stride(t, 0);
  h.s_h = t.stride(1);
  return h;
}

}  // namespace fused_attn_kernels
