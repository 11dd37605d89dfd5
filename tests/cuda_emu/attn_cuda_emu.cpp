// csrc/cuda/attn_*.cu compiled for the CPU under the CUDA emulation of cuda_emu.h, registered as
// torch.ops.fused_attn_cuda_emu.{fwd, bwd, dropout_keep} (the fused_attn ops' schemas, op_schema.h).
// The test suite's "cuda-emu" engine routes the "cuda" backend's calls here (tests/_cuda_emu.py).
#undef _FORTIFY_SOURCE   // its longjmp check rejects the emulation's jumps between fiber stacks
#define FUSED_ATTN_CUDA_EMULATION 1
#include "cuda_emu.h"

#define FA_LAUNCH(kernel, grid, block, smem, stream) ::fa_emu::launch(kernel, grid, block, smem, stream)

// The storage behind the kernels' `extern __shared__ float smem[]` (one per OS thread).
namespace fused_attn_kernels {
namespace cuda {
__shared__ float smem[fa_emu::kSmemFloats];
}  // namespace cuda
}  // namespace fused_attn_kernels

// The kernel files, then the ops (one translation unit here; several in the extension's build).
#include "cuda/fwd_f32.cu"
#include "cuda/fwd_f16.cu"
#include "cuda/fwd_bf16.cu"
#include "cuda/bwd_dkdv_f32.cu"
#include "cuda/bwd_dkdv_f16.cu"
#include "cuda/bwd_dkdv_bf16.cu"
#include "cuda/bwd_dq_f32.cu"
#include "cuda/bwd_dq_f16.cu"
#include "cuda/bwd_dq_bf16.cu"
#include "cuda/attn_cuda.cu"
#include "op_schema.h"

float* fa_emu::dynamic_smem() { return fused_attn_kernels::cuda::smem; }

TORCH_LIBRARY(fused_attn_cuda_emu, m) {
  m.def(fused_attn_kernels::kFwdSchema, &fused_attn_kernels::cuda::fwd_cuda);
  m.def(fused_attn_kernels::kBwdSchema, &fused_attn_kernels::cuda::bwd_cuda);
  m.def(fused_attn_kernels::kDropoutKeepSchema, &fused_attn_kernels::cuda::dropout_keep_cuda);
}

// -- the emulation's own checks (tests/test_cuda_emu.py): small kernels with known results, and
// kernels with the bugs the emulation promises to catch.  They live in the kernels' namespace so
// that their `extern __shared__` declarations name the same storage.
namespace fused_attn_kernels {
namespace cuda {

// out[t] = sum of the lane ids of t's warp (xor butterfly) + 100 * (lane 3's id + warp * 32)
__global__ void emu_check_shuffles(float* out) {
  float x = static_cast<float>(threadIdx.x % 32);
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  out[blockIdx.x * blockDim.x + threadIdx.x] = x + 100.f * __shfl_sync(FULL, static_cast<float>(threadIdx.x), 3);
}

// out[t] = t + 1 of the block (mod its size), through shared memory and a barrier
__global__ void emu_check_shared(float* out) {
  extern __shared__ float smem[];
  smem[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = smem[(threadIdx.x + 1) % blockDim.x];
}

__global__ void emu_bug_divergent_barrier(float*) {
  if (threadIdx.x < 16) __syncthreads();
}

__global__ void emu_bug_early_exit_shuffle(float* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_sync(FULL, 1.f, 0);
}

__global__ void emu_bug_partial_mask_shuffle(float* out) {
  out[threadIdx.x] = __shfl_sync(0xffffu, 1.f, 0);
}

__global__ void emu_bug_shared_overflow(float*) {
  extern __shared__ float smem[];
  smem[threadIdx.x + 1] = 1.f;   // the launch asks for blockDim.x floats
}

__global__ void emu_bug_uninitialized_shared(float* out) {
  extern __shared__ float smem[];
  out[threadIdx.x] = smem[threadIdx.x];
}

at::Tensor emu_selftest(const std::string& which, int64_t blocks, int64_t threads) {
  at::Tensor out = at::zeros({blocks * threads}, at::kFloat);
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  const size_t floats = static_cast<size_t>(threads) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  float* o = out.data_ptr<float>();
  if (which == "shuffles") FA_LAUNCH(emu_check_shuffles, grid, block, 0, stream)(o);
  else if (which == "shared") FA_LAUNCH(emu_check_shared, grid, block, floats, stream)(o);
  else if (which == "divergent_barrier") FA_LAUNCH(emu_bug_divergent_barrier, grid, block, 0, stream)(o);
  else if (which == "early_exit_shuffle") FA_LAUNCH(emu_bug_early_exit_shuffle, grid, block, 0, stream)(o);
  else if (which == "partial_mask_shuffle") FA_LAUNCH(emu_bug_partial_mask_shuffle, grid, block, 0, stream)(o);
  else if (which == "shared_overflow") FA_LAUNCH(emu_bug_shared_overflow, grid, block, floats, stream)(o);
  else if (which == "uninitialized_shared") FA_LAUNCH(emu_bug_uninitialized_shared, grid, block, floats, stream)(o);
  else if (which == "too_much_shared") FA_LAUNCH(emu_check_shared, grid, block, 64 * 1024, stream)(o);
  else TORCH_CHECK(false, "emu_selftest: unknown case ", which);
  return out;
}

}  // namespace cuda
}  // namespace fused_attn_kernels

TORCH_LIBRARY_FRAGMENT(fused_attn_cuda_emu, m) {
  m.def("selftest", &fused_attn_kernels::cuda::emu_selftest);
}
