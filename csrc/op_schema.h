// Schemas of the fused_attn ops: registered by fused_attn.cpp (TORCH_LIBRARY(fused_attn)) and, for
// the test suite's CUDA emulation, by tests/cuda_emu/attn_cuda_emu.cpp under its own namespace, so
// both take the same arguments with the same names and defaults.
//
// cu_seqlens_q / _k (int32 [B + 1], both or neither) switch to packed ("varlen") batches:
// q [1, H, Tq, D], k / v [1, H, Tk, D], lse [1, H, Tq], sequence b at rows cu[b] .. cu[b + 1] (at
// most max_seqlen_q / _k of them); see SeqLayout in mask_desc.h.
//
// window_left / window_right: the local band (FlashAttention-2's window_size, causal folded in by
// the caller: right = 0 when causal): query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq +
// right, per sequence; -1 = unbounded on that side.
//
// rng: the dropout Philox (seed, offset), a contiguous int64 tensor [2] on q's device that the kernels
// read (the CUDA kernels on the device: graph-safe); required when dropout_p > 0.  dropout_keep draws
// the keep-mask on rng's device.
#pragma once

namespace fused_attn_kernels {

constexpr const char* kFwdSchema =
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_start, Tensor? key_end, Tensor? key_needs_mask, "
    "Tensor? block_state, Tensor? head_mask, bool additive, bool causal, "
    "float scale, float dropout_p, Tensor? rng, int block_m, int block_n, "
    "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, "
    "int window_left=-1, int window_right=-1) "
    "-> (Tensor out, Tensor lse, Tensor visited)";

constexpr const char* kBwdSchema =
    "bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
    "Tensor? key_start, Tensor? key_end, Tensor? key_needs_mask, Tensor? block_state, Tensor? head_mask, "
    "bool additive, bool causal, float scale, float dropout_p, Tensor? rng, int block_m, int block_n, "
    "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, "
    "int window_left=-1, int window_right=-1) "
    "-> (Tensor dq, Tensor dk, Tensor dv)";

constexpr const char* kDropoutKeepSchema =
    "dropout_keep(Tensor rng, int batch, int heads, int q_len, int k_len, float dropout_p) -> Tensor";

}  // namespace fused_attn_kernels
