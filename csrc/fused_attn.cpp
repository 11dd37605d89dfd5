// fused_attn C++ ops: the TORCH_LIBRARY schema and the CPU implementation of its ops (argument
// checks, the mask / sequence / dropout descriptions, result allocation).
//
// The CPU kernel: cpu_forward.cpp and cpu_backward.cpp (two translation units, compiled in
// parallel), their shared tiles in cpu_attn.h, building blocks in cpu_kernels.h.
// Dropout: Philox keep-mask regenerated from (seed, offset) in both passes (philox.h).
// Padded and packed (varlen) batches are the same kernels: a work item's sequence b has its row
// offsets and lengths from SeqLayout::seq (mask_desc.h), and everything in the kernels is relative to them.
// Semantics: docs/design.md / fused_attn.reference.  The CUDA kernels are in cuda/.
#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_attn.h"
#include "op_schema.h"

namespace fused_attn_kernels {
namespace cpu {

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
                  k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && q.size(3) == k.size(3),
              "fused_attn: q [B, H, Sq, D], k / v [B, H_kv, Sk, D] with H % H_kv == 0 expected, got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fused_attn: q, k, v must share a dtype");
}

std::tuple<Tensor, Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& mask,
                                           const OptT& key_start, const OptT& key_end, const OptT& key_needs_mask,
                                           const OptT& block_state, const OptT& head_mask, bool additive, bool causal, double scale,
                                           double dropout_p, const OptT& rng, int64_t block_m,
                                           int64_t block_n, const OptT& cu_seqlens_q, const OptT& cu_seqlens_k,
                                           int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
                                           int64_t window_right) {
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
  cpu::forward(q, k, v, out, lse, visited, lay, B, md, hm, Band::of(window_left, window_right, causal),
               static_cast<float>(scale), drop);
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
                                           int64_t max_seqlen_k, int64_t window_left, int64_t window_right) {
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
  cpu::backward(grad_out, q, k, v, out, lse, dq, dk, dv, lay, B, md, hm, Band::of(window_left, window_right, causal),
                static_cast<float>(scale), drop);
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
