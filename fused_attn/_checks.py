"""Argument checks shared by every entry point (functional API, reference, backends).

Everything here raises before any kernel runs, naming the argument and the shapes involved.
"""
from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .masks import _MaskCache

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


@dataclass(frozen=True)
class Shapes:
    batch: int
    heads: int
    q_len: int
    k_len: int
    head_dim: int
    kv_heads: int = 0       # heads of k / v (grouped-query when < heads); 0: same as heads

    @property
    def group(self) -> int:
        """Query heads per k / v head."""
        return self.heads // (self.kv_heads or self.heads)


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensors(q, k, v, layout: str, dtypes) -> None:
    """q, k, v are tensors of len(layout) dims (e.g. "BHSD"), one supported dtype, one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(layout):
            what = " (packed tokens)" if layout == "THD" else ""
            raise ValueError(f"{name}: expected {len(layout)} dims [{', '.join(layout)}]{what}, got shape {_shape(t)}")
        if t.dtype not in dtypes:
            hint = ("; no engine takes float64: convert the inputs with .float() (a patched Hugging Face model "
                    "in float64, e.g. after model.double(): model.float(), or fused_attn.unpatch(model) to keep "
                    "float64)") if t.dtype == torch.float64 else ""
            raise TypeError(f"{name}: dtype {t.dtype} is not supported "
                            f"(expected one of {', '.join(str(d) for d in dtypes)}){hint}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")


def check_qkv(q, k, v, dtypes=KERNEL_DTYPES) -> Shapes:
    _check_tensors(q, k, v, "BHSD", dtypes)
    b, h, sq, d = q.shape
    if h < 1 or d < 1:      # B, Sq, Sk may be 0 (an empty result, as SDPA)
        raise ValueError(f"q: heads and head dim must be >= 1, got q {_shape(q)}, k {_shape(k)}")
    if k.shape[0] != b or k.shape[3] != d or not _kv_heads_ok(h, k.shape[1]):
        raise ValueError(f"k: shape {_shape(k)} does not match q {_shape(q)} "
                         f"(expected [{b}, H_kv, Sk, {d}] with {h} % H_kv == 0)")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {_shape(v)} must equal k's shape {_shape(k)}")
    return Shapes(b, h, sq, k.shape[2], d, k.shape[1])


def _kv_heads_ok(heads: int, kv_heads: int) -> bool:
    """Grouped-query k / v: H_kv heads, each read by H // H_kv query heads (H % H_kv == 0)."""
    return 1 <= kv_heads <= heads and heads % kv_heads == 0


NO_WINDOW = (-1, -1)


def check_window(window_size) -> tuple:
    """window_size as a pair of Python ints (left, right), each >= -1 (-1: unbounded on that side)."""
    if isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        np = sys.modules.get("numpy")
        vals = []
        for w in window_size:
            if isinstance(w, bool) or not (isinstance(w, numbers.Integral) or
                                           (np is not None and isinstance(w, np.integer))):
                break
            vals.append(int(w))
        else:
            if vals[0] >= -1 and vals[1] >= -1:
                return (vals[0], vals[1])
    raise ValueError(f"window_size: expected a pair of ints (left, right), each >= -1 (-1 = unbounded), "
                     f"got {window_size!r}")


def check_scalars(dropout_p: float, scale: Optional[float], head_dim: int) -> float:
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p: must be a float in [0, 1), got {dropout_p!r}")
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or not float(scale) == float(scale):
        raise TypeError(f"scale: expected a float or None, got {scale!r}")
    return float(scale)


def check_causal(causal) -> bool:
    """causal as a bool: True / False, and also 0 / 1 (Python or NumPy ints) and NumPy bools."""
    if isinstance(causal, bool):
        return causal
    np = sys.modules.get("numpy")
    if np is not None and isinstance(causal, np.bool_):
        return bool(causal)
    if isinstance(causal, numbers.Integral) and causal in (0, 1):
        return bool(causal)
    raise TypeError(f"causal: expected a bool (or 0 / 1), got {causal!r} ({type(causal).__name__})")


def check_head_mask(head_mask, s: Shapes, device) -> Optional[torch.Tensor]:
    """Returns head_mask as a float [B|1, H] tensor (or None)."""
    if head_mask is None:
        return None
    if not isinstance(head_mask, torch.Tensor):
        raise TypeError(f"head_mask: expected a torch.Tensor or None, got {type(head_mask).__name__}")
    if head_mask.device != device:
        raise ValueError(f"head_mask: is on {head_mask.device} but q is on {device}")
    if tuple(head_mask.shape) == (s.heads,):
        return head_mask[None, :]
    if tuple(head_mask.shape) == (s.batch, s.heads):
        return head_mask
    raise ValueError(f"head_mask: shape {_shape(head_mask)} is not [H] = [{s.heads}] "
                     f"or [B, H] = [{s.batch}, {s.heads}]")


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=KERNEL_DTYPES,
                 check_values: Optional[bool] = None):
    """Checks a packed batch (q [Tq, H, D], k / v [Tk, H, D], cu_seqlens int32 [B + 1]) and returns
    its fused_attn.packing.SeqLens.  The values of cu_seqlens (start 0, monotone, end T, lengths
    <= max_seqlen) are checked where that costs no host synchronisation -- CPU tensors -- or when
    check_values / FUSED_ATTN_DEBUG=1 asks for it."""
    from .packing import SeqLens, debug_checks

    _check_tensors(q, k, v, "THD", dtypes)
    if q.shape[1] < 1 or q.shape[2] < 1:
        raise ValueError(f"q: heads and head dim must be >= 1, got shape {_shape(q)}")
    if k.shape[2] != q.shape[2] or not _kv_heads_ok(q.shape[1], k.shape[1]):
        raise ValueError(f"k: shape {_shape(k)} does not match q {_shape(q)} (expected [Tk, H_kv, "
                         f"{q.shape[2]}] with {q.shape[1]} % H_kv == 0)")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {_shape(v)} must equal k's shape {_shape(k)}")
    cus = []
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 torch.Tensor [B + 1], got {type(cu).__name__}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: dtype {cu.dtype}, expected torch.int32 (or int64, converted)")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name}: expected shape [B + 1] with B >= 0, got {_shape(cu)}")
        if cu.device != q.device:
            raise ValueError(f"{name}: is on {cu.device} but q is on {q.device}")
        cus.append(_as_int32(cu))
    if cus[0].shape != cus[1].shape:
        raise ValueError(f"cu_seqlens_q {_shape(cus[0])} and cu_seqlens_k {_shape(cus[1])}: different batch sizes")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"{name}: expected a Python int, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{name}: must be >= 0, got {m}")
    if check_values is None:   # (under torch.compile a check would break the graph)
        check_values = (q.device.type == "cpu" or debug_checks()) and not torch.compiler.is_compiling()
    if check_values:
        for name, cu, total, mx in (("cu_seqlens_q", cus[0], q.shape[0], max_seqlen_q),
                                    ("cu_seqlens_k", cus[1], k.shape[0], max_seqlen_k)):
            _check_cu_values(name, cu, total, mx)
    return SeqLens(cus[0], cus[1], int(max_seqlen_q), int(max_seqlen_k))


_CU32 = _MaskCache()        # int64 cu_seqlens -> its int32 copy


def _as_int32(cu: torch.Tensor) -> torch.Tensor:
    """cu_seqlens as the kernels read them: contiguous int32.  An int64 one (``lengths.cumsum(0)``)
    is converted once per tensor (one small kernel, no host sync), cached on the tensor's identity and
    version, so a model's layers share the copy.  Values >= 2^31 would not fit; q / k with that many
    rows are refused by the size checks anyway."""
    if cu.dtype == torch.int32:
        return cu.contiguous()
    hit = _CU32.get(cu, cu.shape)
    if hit is None:
        hit = cu.to(torch.int32).contiguous()
        _CU32.put(cu, cu.shape, hit)
    return hit


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {vals[0]}")
    lengths = [b - a for a, b in zip(vals, vals[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(f"{name}: must be non-decreasing, but entry {bad + 1} ({vals[bad + 1]}) < entry {bad} "
                         f"({vals[bad]})")
    if vals[-1] != total:
        raise ValueError(f"{name}: last entry {vals[-1]} must equal the number of packed rows {total}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen_{name[-1]}: {max_seqlen} is below the longest sequence ({longest}) "
                         f"in {name}")


# -- size limits of the kernels (docs/attention.md, "Size limits") ----------------------------------------
INT32_MAX = 2**31 - 1
TRITON_MAX_GRID_Y = 65535        # CUDA's gridDim.y limit; Triton launches (query blocks, B * H)
CUDA_TILE = 32                   # csrc/cuda tiles; grid (B * H, blocks of 32 rows), gridDim.y <= 65535
CUDA_MAX_GRID_Y = 65535


class _Lazy:
    """A string built when formatted: error texts cost nothing on the hot path."""

    def __init__(self, make):
        self.make = make

    def __format__(self, spec):
        return format(self.make(), spec)


def _extent(t: torch.Tensor) -> int:
    """Largest element offset inside one [S, D] slice of a [B, H, S, D] tensor."""
    _, _, s, d = t.shape
    _, _, st_s, st_d = t.stride()
    return (s - 1) * abs(st_s) + (d - 1) * abs(st_d)


class Geometry:
    """Shape and strides of a tensor that need not exist (the padded equivalent of a packed batch):
    what check_sizes reads of q, k, v, and cheaper to build than a meta tensor."""

    __slots__ = ("shape", "_stride")

    def __init__(self, shape, stride):
        self.shape, self._stride = tuple(shape), tuple(stride)

    def stride(self):
        return self._stride


def check_sizes(q, k, v, red, dropout_p: float, engine: str) -> None:
    """Raise ValueError when a call is too large for `engine`'s index arithmetic, before any
    kernel runs (red: the ReducedMask; engine: "triton", "cuda", "cpu" or "reference").

    - dropout, every engine: the Philox counter of element (i, j) is ((i // 4) * Sk + j, b * H + h)
      as 32-bit words, so ceil(Sq / 4) * Sk must stay <= 2^32 (else the keep-mask repeats);
    - triton: offsets inside one (batch, head) slice are 32-bit (row * row stride + col * col
      stride, for q, k, v, the output and the mask; batch / head bases are 64-bit), and B * H is
      grid dimension y (<= 65535);
    - cuda: query / key blocks of 32 rows are grid dimension y (<= 65535), B * H dimension x;
    - cpu: 64-bit offsets throughout; only the dropout limit applies.
    """
    if engine == "reference":
        return
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    shape = _Lazy(lambda: f"q {_shape(q)}, k {_shape(k)}")      # formatted only for an error
    if dropout_p > 0.0 and (-(-sq // 4) * sk > 2**32 or b * h > 2**32):
        raise ValueError(
            f"dropout_p > 0 with {shape}: the dropout RNG counts (query // 4) * Sk + key in 32 bits, so "
            f"ceil(Sq / 4) * Sk must be <= 2^32 (here {-(-sq // 4) * sk}); the keep-mask would repeat. "
            f"Split the sequence or apply dropout outside the kernel")
    if engine == "triton":
        if b * h > TRITON_MAX_GRID_Y:
            raise ValueError(f"{shape}: the Triton kernels launch B * H = {b * h} programs on grid axis y, "
                             f"at most {TRITON_MAX_GRID_Y}; split the batch")
        ext_q, ext_k, ext_v = _extent(q), _extent(k), _extent(v)
        out_extent = max(ext_q, sq * q.shape[3] - 1)     # out: q's layout or contiguous
        if max(ext_q, ext_k, ext_v, out_extent) <= INT32_MAX:   # the common case: one comparison
            ext_q = ext_k = ext_v = out_extent = 0
        for name, ext in (("q", ext_q), ("k", ext_k), ("v", ext_v), ("out", out_extent)):
            if ext > INT32_MAX:
                raise ValueError(
                    f"{name}: one (batch, head) slice of {shape} spans {ext + 1} elements (strides "
                    f"{tuple((q if name in ('q', 'out') else k).stride())}); the Triton kernels index inside a "
                    f"slice with 32-bit offsets (< 2^31). Make it contiguous [B, H, S, D] or split the sequence")
        if red.values is not None:
            m = red.values
            ext = (m.shape[2] - 1) * m.stride(2) + (m.shape[3] - 1) * abs(m.stride(3))
            if ext > INT32_MAX:
                raise ValueError(f"attention_mask: one (batch, head) slice of the mask spans {ext + 1} elements "
                                 f"(Sq x Sk = {sq} x {sk}); the Triton kernels index masks with 32-bit offsets "
                                 f"(< 2^31). Use a key-padding mask [B, Sk] or split the sequence")
    if engine == "cuda":
        blocks = max(-(-sq // CUDA_TILE), -(-sk // CUDA_TILE))
        if blocks > CUDA_MAX_GRID_Y or b * h > INT32_MAX:
            raise ValueError(f"{shape}: the CUDA kernels launch (B * H, blocks of {CUDA_TILE} rows) = "
                             f"({b * h}, {blocks}) blocks; at most ({INT32_MAX}, {CUDA_MAX_GRID_Y}). "
                             f"Split the sequence or the batch")
