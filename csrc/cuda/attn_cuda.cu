// The CUDA ops of fused_attn (fwd, bwd, dropout_keep): argument checks, allocation, and the
// dispatch to the kernels' launchers, compiled for each (dtype, head dims per lane) pair by the files
// fwd_*.cu, bwd_dkdv_*.cu and bwd_dq_*.cu (attn_kernels.cuh describes the kernels).
#if !defined(FUSED_ATTN_CUDA_EMULATION)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#endif

#include "../mask_desc.h"
#include "attn_kernels.cuh"

namespace fused_attn_kernels {
namespace cuda {

__global__ void dropout_keep_kernel(bool* keep, int64_t rows, int64_t q_len, int64_t k_len, DropoutParams drop) {
  drop.load_state();
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * k_len) return;
  const int64_t row = e / k_len, j = e % k_len;
  keep[e] = dropout_keep(drop, row % q_len, j, k_len, static_cast<uint32_t>(row / q_len));
}

// ------------------------------------------------------------------------------------------
// host side

// Compile-time (element type, head dims per lane) of a call: 3 dtypes x 3 register widths.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  TORCH_CHECK(D >= 1 && D <= 128, "fused_attn (cuda): head dim ", D, " not supported (1..128)");
  auto with_dpl = [&](auto zero) {
    if (D <= 32) f(zero, std::integral_constant<int, 1>{});
    else if (D <= 64) f(zero, std::integral_constant<int, 2>{});
    else f(zero, std::integral_constant<int, 4>{});
  };
  switch (dtype) {
    case at::kFloat: with_dpl(float{}); break;
    case at::kHalf: with_dpl(at::Half{}); break;
    case at::kBFloat16: with_dpl(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fused_attn (cuda): dtype ", dtype, " not supported (float16, bfloat16, float32)");
  }
}

using at::Tensor;
using OptT = std::optional<Tensor>;

Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t block_m, int64_t block_n) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && q.size(3) == k.size(3),
              "fused_attn: q [B, H, Sq, D], k / v [B, H_kv, Sk, D] with H % H_kv == 0 expected, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fused_attn: q, k, v must share a dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fused_attn: q, k, v on different devices");
  TORCH_CHECK(block_m == TILE && block_n == TILE, "fused_attn: the CUDA kernel uses ", TILE, " x ", TILE,
              " tiles, got ", block_m, " x ", block_n);
}

// Batch size of the grid (q.size(0), or the number of packed sequences), checked against grid.x.
int64_t grid_batch(const Tensor& q, const OptT& cu_seqlens_q) {
  const int64_t B = seq_count(q, cu_seqlens_q);
  TORCH_CHECK(B * q.size(1) <= INT32_MAX, "fused_attn (cuda): B * H too large");
  return B;
}

std::tuple<Tensor, Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& mask,
                                            const OptT& key_start, const OptT& key_end, const OptT& key_needs_mask,
                                            const OptT& block_state, const OptT& head_mask, bool additive,
                                            bool causal, double scale, double dropout_p, const OptT& rng,
                                            int64_t block_m, int64_t block_n,
                                            const OptT& cu_seqlens_q, const OptT& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, int64_t window_left, int64_t window_right,
                                            const OptT& c2p, const OptT& p2c, const OptT& rel_index) {
  check_inputs(q, k, v, block_m, block_n);
  const Band band = Band::of(window_left, window_right, causal);
  const c10::cuda::CUDAGuard guard(q.device());
  const SeqLayout lay = make_seq_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                                        key_start, block_state, head_mask);
  const RelBias rb = make_rel_bias(q, k, lay, c2p, p2c, rel_index);
  const MaskDesc md = make_mask_desc(q, k.size(2), mask, additive, key_start, key_end, key_needs_mask, block_state,
                                     block_m, block_n);
  const HeadMask hm = make_head_mask(head_mask, q);
  const DropoutParams drop = make_dropout(dropout_p, rng, q.device());   // the kernels read rng
  const int64_t B = grid_batch(q, cu_seqlens_q), H = q.size(1), D = q.size(3);
  const int64_t nqb = (lay.max_q + TILE - 1) / TILE;
  TORCH_CHECK(nqb <= 65535, "fused_attn (cuda): Sq too large");
  Tensor out, lse, visited;
  allocate_forward(q, lay, B, block_m, out, lse, visited);
  if (out.numel() == 0 || B * H * nqb == 0) return {out, lse, visited};
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(nqb));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), D, [&](auto zero, auto dpl) {
    using scalar_t = decltype(zero);
    const FwdArgs<scalar_t> args{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(), lse.data_ptr<float>(), visited.data_ptr<int32_t>(),
                                 strides_of(q), strides_of(k), strides_of(v), strides_of(out), static_cast<int>(H),
                                 static_cast<int>(H / k.size(1)), lay, static_cast<int>(D),
                                 static_cast<float>(scale) * kLog2e, md, hm, band, drop, rb};
    C10_CUDA_CHECK((launch_fwd<scalar_t, decltype(dpl)::value>(args, grid, stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, visited};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                            const OptT& mask, const OptT& key_start, const OptT& key_end,
                                            const OptT& key_needs_mask, const OptT& block_state, const OptT& head_mask,
                                            bool additive, bool causal, double scale, double dropout_p,
                                            const OptT& rng, int64_t block_m, int64_t block_n,
                                            const OptT& cu_seqlens_q, const OptT& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, int64_t window_left, int64_t window_right,
                                            const OptT& c2p, const OptT& p2c, const OptT& rel_index) {
  check_inputs(q, k, v, block_m, block_n);
  const Band band = Band::of(window_left, window_right, causal);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fused_attn: grad_out and out must match q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "fused_attn: lse must be contiguous float32 [B, H, Sq] ([1, H, Tq] when packed)");
  const c10::cuda::CUDAGuard guard(q.device());
  const SeqLayout lay = make_seq_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                                        key_start, block_state, head_mask);
  const MaskDesc md = make_mask_desc(q, k.size(2), mask, additive, key_start, key_end, key_needs_mask, block_state,
                                     block_m, block_n);
  const HeadMask hm = make_head_mask(head_mask, q);
  const DropoutParams drop = make_dropout(dropout_p, rng, q.device());   // the kernels read rng
  const int64_t B = grid_batch(q, cu_seqlens_q), H = q.size(1), D = q.size(3);
  const int64_t nqb = (lay.max_q + TILE - 1) / TILE, nkb = (lay.max_k + TILE - 1) / TILE;
  TORCH_CHECK(nqb <= 65535 && nkb <= 65535, "fused_attn (cuda): sequence too long");
  Tensor dq, dk, dv, dc2p, dp2c;
  allocate_backward(q, k, v, lay, dq, dk, dv);
  const RelBias rb = make_rel_bias(q, k, lay, c2p, p2c, rel_index, &dc2p, &dp2c);   // zeroed fp32 gradients
  if (q.numel() == 0 || k.numel() == 0 || B * H == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dc2p, dp2c};
  // grouped-query k / v: dK, dV per query head into [.., H, Sk, D], summed over each group below
  const int64_t group = H / k.size(1);
  Tensor dk_h = dk, dv_h = dv;
  if (group > 1) {
    if (lay.packed()) {   // token-major like zeros_token_major: rows in no sequence stay 0
      dk_h = at::zeros({k.size(0), k.size(2), H, k.size(3)}, k.options()).transpose(1, 2);
      dv_h = at::zeros({k.size(0), k.size(2), H, k.size(3)}, k.options()).transpose(1, 2);
    } else {
      dk_h = at::empty({k.size(0), H, k.size(2), k.size(3)}, k.options());
      dv_h = at::empty({k.size(0), H, k.size(2), k.size(3)}, k.options());
    }
  }
  // rowsum(dO * O) with O as stored (rounded to the input dtype, like the eager graph)
  const Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float qk_scale = static_cast<float>(scale) * kLog2e;
  dispatch(q.scalar_type(), D, [&](auto zero, auto dpl) {
    using scalar_t = decltype(zero);
    constexpr int DPL = decltype(dpl)::value;
    const BwdArgs<scalar_t> args{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                 grad_out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(),
                                 dq.data_ptr<scalar_t>(), dk_h.data_ptr<scalar_t>(), dv_h.data_ptr<scalar_t>(),
                                 strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out), strides_of(dq),
                                 strides_of(dk_h), strides_of(dv_h), static_cast<int>(H), static_cast<int>(group), lay,
                                 static_cast<int>(D), qk_scale, static_cast<float>(scale), md, hm, band, drop, rb};
    if (nkb > 0) {   // (a packed batch's max_seqlen may be 0)
      C10_CUDA_CHECK((launch_bwd_dkdv<scalar_t, DPL>(args, dim3(static_cast<unsigned>(B * H), static_cast<unsigned>(nkb)),
                                                     stream)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (nqb > 0) {
      C10_CUDA_CHECK((launch_bwd_dq<scalar_t, DPL>(args, dim3(static_cast<unsigned>(B * H), static_cast<unsigned>(nqb)),
                                                   stream)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (group > 1) {
    const int64_t Hk = k.size(1);
    dk.copy_(dk_h.unflatten(1, {Hk, group}).to(at::kFloat).sum(2));
    dv.copy_(dv_h.unflatten(1, {Hk, group}).to(at::kFloat).sum(2));
  }
  return {dq, dk, dv, dc2p, dp2c};
}

Tensor dropout_keep_cuda(const Tensor& rng, int64_t batch, int64_t heads, int64_t q_len, int64_t k_len,
                         double dropout_p) {
  const c10::cuda::CUDAGuard guard(rng.device());
  const DropoutParams drop = make_dropout(dropout_p, rng, rng.device());
  Tensor keep = at::empty({batch, heads, q_len, k_len}, rng.options().dtype(at::kBool));
  const int64_t n = keep.numel();
  if (n == 0) return keep;
  const int threads = 256;
  FA_LAUNCH(dropout_keep_kernel, static_cast<unsigned>((n + threads - 1) / threads), threads, 0,
            c10::cuda::getCurrentCUDAStream())(keep.data_ptr<bool>(), batch * heads * q_len, q_len, k_len,
                                               drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace cuda
}  // namespace fused_attn_kernels

#if !defined(FUSED_ATTN_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("fwd", &fused_attn_kernels::cuda::fwd_cuda);
  m.impl("bwd", &fused_attn_kernels::cuda::bwd_cuda);
  m.impl("dropout_keep", &fused_attn_kernels::cuda::dropout_keep_cuda);
}
#endif
