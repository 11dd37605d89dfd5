// bwd_dkdv.cuh's kernel for float inputs (one file per kernel and dtype: a parallel build compiles them
// side by side).
#if !defined(FUSED_ATTN_CUDA_EMULATION)
#define FUSED_ATTN_KERNELS_ONLY 1   // no ATen (attn_kernels.cuh)
#endif
#include "bwd_dkdv.cuh"

FA_INSTANTIATE_BWD_DKDV(float)
