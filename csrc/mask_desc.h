// What the CPU and CUDA kernels share about a call, as plain pointers and strides: the reduced
// mask (fused_attn.masks.ReducedMask), the head mask, and where each sequence's rows lie (padded
// or packed batches), plus the host-side code that fills them from the op's tensor arguments.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>

// FUSED_ATTN_KERNELS_ONLY: the descriptions alone, without ATen and the host code that fills them
// from the ops' tensors (the CUDA kernel files, csrc/cuda/attn_*.cu, compile in seconds without ATen).
#if !defined(FUSED_ATTN_KERNELS_ONLY)
#include <ATen/ATen.h>
#endif

#include "philox.h"

namespace fused_attn_kernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kHidden = -1.0e4f;  // masks.HIDDEN_THRESHOLD: additive entries <= this hide the key

enum MaskMode : int { kNone = 0, kKeys = 1, kBlocks = 2 };
enum MaskType : int { kU8 = 0, kF32 = 1, kF16 = 2, kBF16 = 3 };

// score + a mask offset in log2 units.  A hidden key (offset -inf) scores -inf whatever k holds:
// adding would turn a NaN in a hidden key's k into a NaN row (NaN + -inf = NaN).
FA_HOST_DEVICE float mask_add(float score, float offset) {
  return offset < -3.0e38f ? offset : score + offset;
}

struct MaskDesc {
  int mode = kNone;
  bool additive = false;
  int type = kU8;
  const void* values = nullptr;          // [Bm, Hm, Sqm, Sk], stride 0 on broadcast dims
  int64_t ms_b = 0, ms_h = 0, ms_m = 0, ms_n = 0;
  const int32_t* key_start = nullptr;    // kind "keys": [B]
  const int32_t* key_end = nullptr;
  const int32_t* key_needs_mask = nullptr;
  // kind "blocks": tile states [Bm, Hm, nQB|1, nKB] int8 (0 empty, 1 partial, 2 full) for the
  // kernel's BLOCK_M x BLOCK_N tiles (fused_attn.masks.BlockMap.state)
  const int8_t* state = nullptr;
  int64_t ss_b = 0, ss_h = 0, ss_m = 0, ss_n = 0;
  int64_t n_kb = 0;

  FA_HOST_DEVICE int8_t tile(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return state[b * ss_b + h * ss_h + qb * ss_m + kb * ss_n];
  }
};

// The local window of a call (FlashAttention-2's window_size) with causal folded in (causal: right =
// 0): query i sees key j iff i + off - left <= j <= i + off + right, off = Sk - Sq of its sequence;
// -1 = unbounded on that side.  Inactive (-1, -1) for calls with neither.
struct Band {
  int64_t left = -1, right = -1;

  FA_HOST_DEVICE static Band of(int64_t window_left, int64_t window_right, bool causal) {
    Band w;
    w.left = window_left < 0 ? -1 : window_left;
    w.right = causal ? 0 : (window_right < 0 ? -1 : window_right);
    return w;
  }
  FA_HOST_DEVICE bool active() const { return left >= 0 || right >= 0; }
  FA_HOST_DEVICE bool sees(int64_t i, int64_t j, int64_t off) const {
    const int64_t d = j - i - off;
    return (left < 0 || d >= -left) && (right < 0 || d <= right);
  }
  // The keys [lo, hi) that queries [i_first, i_last] can see, inside [lo, hi) (loop bounds).
  FA_HOST_DEVICE void clamp_keys(int64_t i_first, int64_t i_last, int64_t off, int64_t& lo, int64_t& hi) const {
    if (left >= 0 && i_first + off - left > lo) lo = i_first + off - left;
    if (right >= 0 && i_last + off + right + 1 < hi) hi = i_last + off + right + 1;
  }
  // Some (query, key) of queries [i_first, i_last] x keys [j_first, j_last] lies outside the band:
  // the tile needs the per-element condition.
  FA_HOST_DEVICE bool cuts(int64_t i_first, int64_t i_last, int64_t j_first, int64_t j_last, int64_t off) const {
    return (right >= 0 && j_last > i_first + off + right) || (left >= 0 && j_first < i_last + off - left);
  }
};

struct HeadMask {
  const float* ptr = nullptr;            // [1|B, H] fp32
  int64_t s_b = 0, s_h = 0;
};

// Sequence b of a call: the batch entry and the first rows of its queries and keys, its lengths.
struct Seq {
  int64_t b;        // batch index into q / k / v / out / lse: b when padded, 0 when packed
  int64_t q0, k0;   // first query row (dim 2 of q, out, lse) and first key row (dim 2 of k, v)
  int64_t sq, sk;   // query and key rows of the sequence
};

// Rows [r0, r0 + n) of a packed sequence from its cu_seqlens entries: clamped into [0, t), at most
// max_len rows.
FA_HOST_DEVICE void packed_rows(const int32_t* cu, int64_t b, int64_t t, int64_t max_len, int64_t& r0,
                                int64_t& n) {
  const int64_t a = cu[b], e = cu[b + 1];
  r0 = a < 0 ? 0 : (a > t ? t : a);
  const int64_t r1 = e < r0 ? r0 : (e > t ? t : e);
  n = r1 - r0 < max_len ? r1 - r0 : max_len;
}

// Where the sequences of a call lie.  Padded batches: q [B, H, Sq, D], sequence b is batch entry b,
// rows [0, Sq) x [0, Sk).  Packed ("varlen") batches: q [1, H, Tq, D], k / v [1, H, Tk, D],
// sequence b is rows [cu_q[b], cu_q[b + 1]) x [cu_k[b], cu_k[b + 1]).  Either way the kernels run
// one sequence per batch index b with the row offsets and lengths of seq(b); causal is
// bottom-right aligned per sequence.  Whatever the values in cu_q / cu_k, seq(b) stays inside the
// tensors (the values are validated only where that costs no host sync).
struct SeqLayout {
  const int32_t* cu_q = nullptr;   // packed: [B + 1] row starts; nullptr when padded
  const int32_t* cu_k = nullptr;
  int64_t tq = 0, tk = 0;          // rows along dim 2 of q and of k (padded: Sq, Sk)
  int64_t max_q = 0, max_k = 0;    // bound on a sequence's rows (padded: Sq, Sk)

  FA_HOST_DEVICE bool packed() const { return cu_q != nullptr; }

  FA_HOST_DEVICE Seq seq(int64_t b) const {
    if (cu_q == nullptr) return Seq{b, 0, 0, max_q, max_k};
    int64_t q0, sq, k0, sk;
    packed_rows(cu_q, b, tq, max_q, q0, sq);
    packed_rows(cu_k, b, tk, max_k, k0, sk);
    return Seq{0, q0, k0, sq, sk};
  }

  // Index of row q0 of head h in lse (and the backward's delta), [B | 1, H, tq] contiguous.
  FA_HOST_DEVICE int64_t lse_row(const Seq& s, int64_t h, int64_t H) const { return (s.b * H + h) * tq + s.q0; }

  // Key stride of the dropout counter: the keep-mask of a packed batch is that of the same batch
  // padded to [B, H, max_q, max_k] (philox.h), so the engines draw the same dropout either way.
  FA_HOST_DEVICE int64_t dropout_k_len() const { return max_k; }
};

#if !defined(FUSED_ATTN_KERNELS_ONLY)
inline int64_t bcast_stride(const at::Tensor& t, int dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

// Fill a MaskDesc from the op's optional arguments (the mode follows from which are given).
inline MaskDesc make_mask_desc(const at::Tensor& q, int64_t k_len, const std::optional<at::Tensor>& mask,
                               bool additive, const std::optional<at::Tensor>& key_start,
                               const std::optional<at::Tensor>& key_end,
                               const std::optional<at::Tensor>& key_needs_mask,
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
    for (const auto* t : {&key_start, &key_end, &key_needs_mask}) {
      TORCH_CHECK(t->has_value() && (*t)->scalar_type() == at::kInt && (*t)->dim() == 1 &&
                      (*t)->size(0) == B && (*t)->is_contiguous() && (*t)->device() == q.device(),
                  "fused_attn: key_start / key_end / key_needs_mask must be contiguous int32 [", B, "] on ",
                  q.device());
    }
    m.key_start = key_start->data_ptr<int32_t>();
    m.key_end = key_end->data_ptr<int32_t>();
    m.key_needs_mask = key_needs_mask->data_ptr<int32_t>();
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

// Dropout parameters of a call: p, the scale, and the (seed, offset) tensor rng (contiguous int64 [2]
// on `device`), whose values the kernels read -- DropoutParams::load_state() -- never this function.
inline DropoutParams make_dropout(double p, const std::optional<at::Tensor>& rng, const at::Device& device) {
  if (!(p > 0.0)) return DropoutParams::make(0.0, nullptr);
  TORCH_CHECK(rng.has_value(), "fused_attn: dropout_p > 0 needs rng, the (seed, offset) int64 tensor [2]");
  const auto& t = *rng;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == 2 && t.is_contiguous() &&
                  t.device() == device,
              "fused_attn: rng must be a contiguous int64 tensor [2] (seed, offset) on ", device, ", got ",
              t.sizes(), " ", t.scalar_type(), " on ", t.device());
  return DropoutParams::make(p, t.data_ptr<int64_t>());
}

// The SeqLayout of a call: padded when cu_seqlens_q / _k are absent, packed when both are given
// (then q [1, H, Tq, D], k [1, H, Tk, D], cu_seqlens int32 [B + 1] on q's device, and no mask
// values, key ranges, block map or head mask: the op's TORCH_CHECKs say so).
inline SeqLayout make_seq_layout(const at::Tensor& q, const at::Tensor& k,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& key_start,
                                 const std::optional<at::Tensor>& block_state,
                                 const std::optional<at::Tensor>& head_mask) {
  SeqLayout s;
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "fused_attn: cu_seqlens_q and cu_seqlens_k must be given together");
  s.tq = q.size(2);
  s.tk = k.size(2);
  if (!cu_seqlens_q.has_value()) {
    s.max_q = s.tq;
    s.max_k = s.tk;
    return s;
  }
  const auto& cq = *cu_seqlens_q;
  const auto& ck = *cu_seqlens_k;
  for (const auto* t : {&cq, &ck}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) >= 1 && t->is_contiguous() &&
                    t->device() == q.device(),
                "fused_attn: cu_seqlens must be contiguous int32 [B + 1] on ", q.device(), ", got ", t->sizes(),
                " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(cq.size(0) == ck.size(0), "fused_attn: cu_seqlens_q ", cq.sizes(), " and cu_seqlens_k ",
              ck.sizes(), " give different batch sizes");
  TORCH_CHECK(q.size(0) == 1 && k.size(0) == 1,
              "fused_attn: packed (varlen) q / k / v must be [1, H, T, D], got ", q.sizes(), ", ", k.sizes());
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "fused_attn: max_seqlen_q / _k must be >= 0, got ",
              max_seqlen_q, ", ", max_seqlen_k);
  TORCH_CHECK(!mask.has_value() && !key_start.has_value() && !block_state.has_value(),
              "fused_attn: packed (varlen) attention takes no mask values, key ranges or block map");
  TORCH_CHECK(!head_mask.has_value(), "fused_attn: packed (varlen) attention takes no head_mask");
  s.cu_q = cq.data_ptr<int32_t>();
  s.cu_k = ck.data_ptr<int32_t>();
  s.max_q = max_seqlen_q;
  s.max_k = max_seqlen_k;
  return s;
}
#endif  // !FUSED_ATTN_KERNELS_ONLY

// DeBERTa's disentangled score (fused_attn.DisentangledBias): score(i, j) += c2p[i, c] + p2c[j, c]
// before the scale, with c = index[i - j + max_k - 1] (i, j positions inside the sequence,
// max_k = SeqLayout::max_k, which is Sk when padded).  The tables are fp32 [B, H, rows, P] (packed:
// [1, H, T, P]) with any strides; a table may be absent (nullptr).  The backward's fp32 gradients
// dc2p / dp2c are contiguous, shaped like the tables, and start at zero.
struct RelBias {
  const float* c2p = nullptr;
  const float* p2c = nullptr;
  const int32_t* index = nullptr;        // [max_q + max_k - 1], values in [0, P)
  int64_t P = 0;
  int64_t cs_b = 0, cs_h = 0, cs_r = 0, cs_p = 0;   // c2p strides
  int64_t ps_b = 0, ps_h = 0, ps_r = 0, ps_p = 0;   // p2c strides
  float* dc2p = nullptr;
  float* dp2c = nullptr;

  FA_HOST_DEVICE bool on() const { return index != nullptr; }
  // row 0 of sequence s, head h, of each table (the tables of an absent side: nullptr)
  FA_HOST_DEVICE const float* c2p_rows(const Seq& s, int64_t h) const {
    return c2p ? c2p + s.b * cs_b + h * cs_h + s.q0 * cs_r : nullptr;
  }
  FA_HOST_DEVICE const float* p2c_rows(const Seq& s, int64_t h) const {
    return p2c ? p2c + s.b * ps_b + h * ps_h + s.k0 * ps_r : nullptr;
  }
};

#if !defined(FUSED_ATTN_KERNELS_ONLY)
// The RelBias of a call (off when rel_index is absent) and, for the backward (grads), its zeroed
// gradients dc2p / dp2c (empty tensors for an absent table).
inline RelBias make_rel_bias(const at::Tensor& q, const at::Tensor& k, const SeqLayout& lay,
                             const std::optional<at::Tensor>& c2p, const std::optional<at::Tensor>& p2c,
                             const std::optional<at::Tensor>& index, at::Tensor* dc2p = nullptr,
                             at::Tensor* dp2c = nullptr) {
  RelBias r;
  if (dc2p) *dc2p = at::empty({0}, q.options().dtype(at::kFloat));
  if (dp2c) *dp2c = at::empty({0}, q.options().dtype(at::kFloat));
  if (!index.has_value()) {
    TORCH_CHECK(!c2p.has_value() && !p2c.has_value(), "fused_attn: c2p / p2c given without rel_index");
    return r;
  }
  const auto& ix = *index;
  TORCH_CHECK(ix.scalar_type() == at::kInt && ix.dim() == 1 && ix.size(0) == lay.max_q + lay.max_k - 1 &&
                  ix.is_contiguous() && ix.device() == q.device(),
              "fused_attn: rel_index must be contiguous int32 [", lay.max_q + lay.max_k - 1, "] on ", q.device(),
              ", got ", ix.sizes(), " ", ix.scalar_type());
  r.index = ix.data_ptr<int32_t>();
  r.P = -1;
  for (int side = 0; side < 2; ++side) {
    const auto& t = side == 0 ? c2p : p2c;
    if (!t.has_value()) continue;
    const auto& ref = side == 0 ? q : k;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->size(0) == ref.size(0) &&
                    t->size(1) == q.size(1) && t->size(2) == ref.size(2) && (r.P < 0 || t->size(3) == r.P) &&
                    t->device() == q.device(),
                "fused_attn: ", side == 0 ? "c2p" : "p2c", " must be float32 [", ref.size(0), ", ", q.size(1),
                ", ", ref.size(2), ", P] on ", q.device(), ", got ", t->sizes(), " ", t->scalar_type());
    r.P = t->size(3);
    at::Tensor* grad = side == 0 ? dc2p : dp2c;
    if (grad) *grad = at::zeros(t->sizes(), t->options());
    if (side == 0) {
      r.c2p = t->data_ptr<float>();
      r.cs_b = t->stride(0); r.cs_h = t->stride(1); r.cs_r = t->stride(2); r.cs_p = t->stride(3);
      if (grad) r.dc2p = grad->data_ptr<float>();
    } else {
      r.p2c = t->data_ptr<float>();
      r.ps_b = t->stride(0); r.ps_h = t->stride(1); r.ps_r = t->stride(2); r.ps_p = t->stride(3);
      if (grad) r.dp2c = grad->data_ptr<float>();
    }
  }
  TORCH_CHECK(r.P > 0, "fused_attn: rel_index given without c2p or p2c");
  return r;
}

// Batch size of a call: q.size(0) when padded, the number of sequences when packed.
inline int64_t seq_count(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens_q) {
  return cu_seqlens_q.has_value() ? cu_seqlens_q->size(0) - 1 : q.size(0);
}

// t's shape with zeros, laid out token-major ([N, T, H, D] seen as [N, H, T, D]): the packed
// results as contiguous [T, H, D] tensors.
inline at::Tensor zeros_token_major(const at::Tensor& t) {
  return at::zeros({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
}

// The forward's results: out like q, lse [B, H, Sq] fp32, visited key tiles [B, H, query tiles].
// Padded, the kernels write every element.  Packed, rows in no sequence and query tiles past a
// sequence's end are never written: they start as out = 0, lse = +inf, visited = 0.
inline void allocate_forward(const at::Tensor& q, const SeqLayout& lay, int64_t B, int64_t block_m,
                             at::Tensor& out, at::Tensor& lse, at::Tensor& visited) {
  const int64_t H = q.size(1), nqb = (lay.max_q + block_m - 1) / block_m;
  const auto f32 = q.options().dtype(at::kFloat), i32 = q.options().dtype(at::kInt);
  if (!lay.packed()) {
    out = at::empty_like(q);
    lse = at::empty({B, H, q.size(2)}, f32);
    visited = at::empty({B, H, nqb}, i32);
    return;
  }
  out = zeros_token_major(q);
  lse = at::full({1, H, q.size(2)}, std::numeric_limits<float>::infinity(), f32);
  visited = at::zeros({B, H, nqb}, i32);
}

// The backward's dq, dk, dv (shaped like q, k, v); zeros when packed (rows in no sequence).
inline void allocate_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const SeqLayout& lay,
                              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  if (!lay.packed()) {
    dq = at::empty_like(q);
    dk = at::empty_like(k);
    dv = at::empty_like(v);
    return;
  }
  dq = zeros_token_major(q);
  dk = zeros_token_major(k);
  dv = zeros_token_major(v);
}
#endif  // !FUSED_ATTN_KERNELS_ONLY

}  // namespace fused_attn_kernels
