// fwd.cuh's kernel for c10::BFloat16 inputs (one file per kernel and dtype: a parallel build compiles them
// side by side).
#if !defined(FUSED_ATTN_CUDA_EMULATION)
#define FUSED_ATTN_KERNELS_ONLY 1   // no ATen (attn_kernels.cuh)
#endif
#include "fwd.cuh"

FA_INSTANTIATE_FWD(c10::BFloat16)
