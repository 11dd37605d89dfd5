"""Triton launcher: tile sizes, grid, kernel arguments.  Kernels live in triton_fwd.py (forward),
triton_bwd.py (dK/dV, delta), triton_bwd_dq.py (dQ) and triton_keep.py (the keep-mask testing
hook); their shared @triton.jit helpers in triton_common.py."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .._rng import check_rng
from ..masks import ReducedMask
from . import Engine
from .triton_launch import Variants, launch

try:  # imports never fail: keep the reason, report it in reasons()
    import triton

    from . import triton_bwd, triton_bwd_dq, triton_common, triton_fwd, triton_keep
    _IMPORT_ERROR: Optional[str] = None
    # MASK_MODE of each ReducedMask.kind
    _MASK_MODE = {"none": triton_common.MASK_NONE.value, "keys": triton_common.MASK_KEYS.value,
                  "blocks": triton_common.MASK_BLOCKS.value}
except Exception as e:  # pragma: no cover - depends on the installation
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

MAX_HEAD_DIM = 256


# Host-side integer helpers.  triton.cdiv / triton.next_power_of_2 are constexpr functions whose
# wrapper costs microseconds per call on the host, which adds up on the per-call launch path.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


# (forward, dK/dV, dQ) tiles that replace the table below: see override_tiles
_TILE_OVERRIDE: Optional[Tuple[TileConfig, TileConfig, TileConfig]] = None


@contextlib.contextmanager
def override_tiles(fwd: TileConfig, dkdv: TileConfig, dq: TileConfig):
    """Testing hook (tests/fuzz_checks.py draws tiles per case): every launch inside the block uses these
    tiles.  Launch plans and the keep-mask policy depend on the tiles, so their caches are emptied
    on the way in and out.  Not for concurrent use."""
    global _TILE_OVERRIDE
    saved, _TILE_OVERRIDE = _TILE_OVERRIDE, (fwd, dkdv, dq)
    _clear_caches()
    try:
        yield
    finally:
        _TILE_OVERRIDE = saved
        _clear_caches()


def fwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Forward tile sizes by head dim, dtype and GPU generation (measured with benchmarks/tune.py)."""
    if _TILE_OVERRIDE is not None:
        return _TILE_OVERRIDE[0]
    if device.type != "cuda":                      # Triton interpreter: small tiles, many blocks
        return TileConfig(32, 16, 4, 1)
    major, _ = _capability(device.index if device.index is not None else torch.cuda.current_device())
    bd = _pow2(head_dim)
    if dtype == torch.float32:                     # fp32 runs the ieee dot: registers are the limit
        return TileConfig(64, 32, 4, 2) if bd <= 64 else TileConfig(32, 32, 4, 2)
    if bd <= 64:
        return TileConfig(128, 64, 4, 3) if major >= 9 else TileConfig(128, 64, 4, 2)
    if bd <= 128:   # 3 stages of 64x128 K/V tiles + a mask tile overflow 227 KB of shared memory
        return TileConfig(64, 128, 4, 2) if major >= 9 else TileConfig(64, 64, 4, 2)
    return TileConfig(64, 32, 4, 2)


# Kernel arguments, in the kernels' order, built on every call: keep them cheap.  They travel in
# groups, as tuples (triton_common's conventions): one tuple per kernel parameter.

_NO_BLOCK_STRIDES = (0,) * 6
_ABSENT = (None, 0, 0)          # an unused optional tensor (head mask, keep-bits) and its 2 strides
_NO_DQ_ACC = (None, 0, 0, 0, 0)


def _mask_args(red: ReducedMask, cfg: TileConfig, causal: bool, dummy: torch.Tensor, transposed: bool = False):
    """The kernels' (mask, key_range, blocks): the reduced mask's values (Mask and its 4 strides);
    KeyStart, KeyEnd, KeyNeedsMask (MASK_KEYS); the lists of PARTIAL and FULL blocks and their 6
    strides (MASK_BLOCKS: the key blocks of every query block, or with ``transposed`` the query
    blocks of every key block).  Dummies where unused (MASK_MODE tells the kernel which are)."""
    kind = red.kind
    if kind == "none":
        return (dummy, 0, 0, 0, 0), (dummy, dummy, dummy), (dummy, dummy, dummy, dummy, *_NO_BLOCK_STRIDES)
    values = red.values
    if kind == "keys":
        return ((values, *values.stride()), (red.key_start, red.key_end, red.key_needs_mask),
                (dummy, dummy, dummy, dummy, *_NO_BLOCK_STRIDES))
    bm = red.block_map(cfg.block_m, cfg.block_n, causal)
    return ((values, *values.stride()), (dummy, dummy, dummy),
            _list_args(bm.transposed_lists() if transposed else bm.kv))


def _list_args(lists):
    """The kernels' blocks argument of masks.BlockLists (stride 0 on broadcast dims)."""
    cnt, idx = lists.part_count, lists.part_index
    cs = [0 if cnt.shape[i] == 1 else cnt.stride(i) for i in range(3)]
    is_ = [0 if idx.shape[i] == 1 else idx.stride(i) for i in range(3)]
    return (lists.part_count, lists.part_index, lists.full_count, lists.full_index, *cs, *is_)


def _seq_args(q, k, varlen):
    """(B, Sq, Sk, batch-stride factor, (Tq, Tk), lse_strides): the packed lengths end the kernels'
    seqs argument (CuSeqQ, CuSeqK, Tq, Tk; _seqs), lse_strides is the lse's (batch, head).  Padded:
    q [B, H, Sq, D].  Packed (varlen, a fused_attn.packing.SeqLens): q is the [1, H, Tq, D] view of
    [Tq, H, D], B sequences of at most max_seqlen rows, lse [H, Tq]."""
    H = q.shape[1]
    if varlen is None:
        B, _, Sq, _ = q.shape
        Sk = k.shape[2]
        return B, Sq, Sk, 1, (Sq, Sk), (H * Sq, Sq)
    Tq, Tk = q.shape[2], k.shape[2]
    return varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k, 0, (Tq, Tk), (0, Tq)


def _seqs(varlen, lengths, dummy):
    """The kernels' seqs argument: (CuSeqQ, CuSeqK, Tq, Tk); dummies and (Sq, Sk) when padded."""
    if varlen is None:
        return (dummy, dummy, *lengths)
    return (varlen.cu_seqlens_q, varlen.cu_seqlens_k, *lengths)


def _strides(t, batch_factor):
    """A tensor's (batch, head, row, dim) strides; batch_factor 0 for a packed batch."""
    st = t.stride()
    return (st[0] * batch_factor, st[1], st[2], st[3])


def _rel_tables(rel_bias):
    """DeBERTa's (c2p, p2c, index) as the kernels read them: tables with a unit column stride, the
    index int32; None without rel_bias."""
    if rel_bias is None:
        return None
    c2p, p2c, index = rel_bias
    unit = tuple(None if t is None else (t if t.stride(-1) == 1 else t.contiguous()) for t in (c2p, p2c))
    return (*unit, index.to(torch.int32).contiguous())


def _rel_key(rel):
    """What the tables decide in a launch plan (REL_BIAS, their strides and P)."""
    if rel is None:
        return None
    return tuple(None if t is None else (t.shape[-1], t.stride(), t.dtype) for t in rel[:2])


def _rel_flags(rel) -> int:
    """The kernels' REL_BIAS bits (triton_common.REL_C2P, REL_P2C)."""
    if rel is None:
        return 0
    return (rel[0] is not None) * triton_common.REL_C2P + (rel[1] is not None) * triton_common.REL_P2C


def _rel_args(rel, bf: int, dummy: torch.Tensor):
    """The kernels' rel argument: C2P, P2C, RelIndex, the tables' (batch, head, row) strides and P;
    dummies where unused (REL_BIAS tells the kernels which tables they read)."""
    if rel is None:
        return (dummy, dummy, dummy, 0, 0, 0, 0, 0, 0, 1)
    c2p, p2c, index = rel
    st = [(0, 0, 0) if t is None else (t.stride(0) * bf, t.stride(1), t.stride(2)) for t in (c2p, p2c)]
    width = (c2p if c2p is not None else p2c).shape[-1]
    return (dummy if c2p is None else c2p, dummy if p2c is None else p2c, index, *st[0], *st[1], width)


def _rel_grad_args(grads: tuple, dummy: torch.Tensor):
    """The backward kernels' rel_grads argument: the fp32 table gradients (REL_GRAD), dummies where unused."""
    return tuple(dummy if g is None else g for g in grads)


def _rel_grads(rel):
    """Zeroed fp32 gradients of the tables with the tables' strides (the kernels add into them with
    the tables' strides), and the tables, made contiguous where zeros_like could not copy a layout."""
    if rel is None:
        return None, None, None
    out = []
    tables = list(rel[:2])
    for i, t in enumerate(tables):
        if t is None:
            out.append(None)
            continue
        g = torch.zeros_like(t, dtype=torch.float32)
        if g.stride() != t.stride():
            tables[i] = t = t.contiguous()
            g = torch.zeros_like(t, dtype=torch.float32)
        out.append(g)
    return (*tables, rel[2]), out[0], out[1]


def _head_mask_args(head_mask: Optional[torch.Tensor]):
    """(HeadMask, stride_hb, stride_hh) of a [1 or B, H] head mask (stride 0 over a broadcast batch);
    HeadMask None: none."""
    if head_mask is None:
        return _ABSENT
    return head_mask, (0 if head_mask.shape[0] == 1 else head_mask.stride(0)), head_mask.stride(1)


def _dropout_args(dropout_p: float, rng: Optional[torch.Tensor], q: torch.Tensor, dummy: torch.Tensor):
    """The kernels' dropout argument (Rng, dropout_p, dropout_scale): the (seed, offset) tensor they load, and the
    factor on kept probabilities, 1 / (1 - p) rounded once from double (as the reference's value:
    an fp32 1 / (1 - p) would be off by an ulp for p = 0.6)."""
    if dropout_p <= 0.0:
        return dummy, 0.0, 1.0
    if rng is None:
        raise ValueError("dropout_p > 0 needs the rng tensor (seed, offset)")
    check_rng(rng, q.device)
    return rng, float(dropout_p), 1.0 / (1.0 - float(dropout_p))


def _constexprs(red: ReducedMask, causal: bool, dropout_p: float, varlen, D: int, block_d: int,
                cfg: TileConfig, window: Tuple[int, int] = (-1, -1)) -> dict:
    """The constexprs the forward and backward kernels share, and the launch options.  CAUSAL is
    triton_common.BAND with a local window (causal folded into it), else the causal flag.  A head
    mask, stored keep-bits and the single pass's dQ buffer are not constexprs: their tensor
    argument is None when unused."""
    band = window[0] >= 0 or window[1] >= 0
    return dict(MASK_MODE=_MASK_MODE[red.kind], CAUSAL=triton_common.BAND.value if band else bool(causal),
                DROPOUT=dropout_p > 0.0, VARLEN=varlen is not None, EVEN_D=block_d == D,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# -- the stored keep-mask (triton_common.KEEP_PAD has the layout)
KEEP_ENV = "FUSED_ATTN_DROPOUT_MASK"     # "auto" (size policy) | "store" | "regenerate"
KEEP_MAX_BYTES = 1 << 30


def keep_bits_shape(q, k, dropout_p: float, varlen=None) -> Optional[Tuple[int, int, int, int]]:
    """The shape of the int32 keep-mask words the forward stores for the backward, or None: the
    backward regenerates the mask.  Reading 1 bit per score costs far less than two Philox
    passes, so the mask is stored whenever its memory is acceptable: at most the size of q, k
    and v together (bits / (q + k + v) = S / (48 D) for S = Sq = Sk in fp16: S <= 3072 at D = 64)
    and at most KEEP_MAX_BYTES.  $FUSED_ATTN_DROPOUT_MASK=store / regenerate overrides (tests)."""
    if dropout_p <= 0.0:
        return None
    args = (os.environ.get(KEEP_ENV, "auto"), q.shape, k.shape, q.dtype, q.device, _varlen_key(varlen))
    try:
        return _keep_bits_shape(*args)
    except TypeError:   # symbolic sizes (the custom op's fake impl under dynamic shapes) don't hash
        return _keep_bits_shape.__wrapped__(*args)


@functools.lru_cache(maxsize=1024)
def _keep_bits_shape(mode, q_shape, k_shape, dtype, device, varlen_key):
    """keep_bits_shape() for the call's geometry (a function of these alone, computed once)."""
    if mode not in ("auto", "store", "regenerate"):
        raise ValueError(f"{KEEP_ENV}={mode!r}: expected 'auto', 'store' or 'regenerate'")
    D = q_shape[3]
    cfgs = (fwd_config(D, dtype, device), *bwd_config(D, dtype, device))
    # the forward writes whole words (BLOCK_M % 32), dQ reads them from a word boundary, and no
    # tile may reach past the padding
    if mode == "regenerate" or cfgs[0].block_m % 32 or cfgs[2].block_m % 32 or \
            max(max(c.block_m, c.block_n) for c in cfgs) > triton_common.KEEP_PAD:
        return None
    B, Sq, Sk = (q_shape[0], q_shape[2], k_shape[2]) if varlen_key is None else varlen_key
    pad = triton_common.KEEP_PAD
    shape = (B, q_shape[1], _cdiv(Sq, pad) * pad // 32, _cdiv(Sk, pad) * pad)
    if mode == "store":
        return shape
    nbytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]
    qkv_bytes = (math.prod(q_shape) + 2 * math.prod(k_shape)) * dtype.itemsize
    return shape if nbytes <= min(KEEP_MAX_BYTES, qkv_bytes) else None


def _keep_args(keep_bits, cfg: TileConfig, whole_words: bool = True):
    """The kernels' keep argument: (KeepBits, stride_kbh (one (batch, head)), stride_kw (one row of
    words)); KeepBits None: not stored.  Only dK/dV reads tiles that start inside a word (not whole_words)."""
    if keep_bits is None:
        return _ABSENT
    if (whole_words and cfg.block_m % 32) or max(cfg.block_m, cfg.block_n) > triton_common.KEEP_PAD:
        raise ValueError(f"stored keep-mask: tiles {cfg.block_m}x{cfg.block_n} do not fit its words")
    return keep_bits, keep_bits.stride(1), keep_bits.stride(2)


# Launch plans: what a call's shapes, strides, dtype and flags decide (tiles, grid, strides, sizes,
# constexprs), computed once per such signature, so a repeated call only allocates its outputs and
# binds its tensors.  Bounded: cleared when it grows past _PLANS_MAX signatures.
_PLANS: dict = {}
_PLANS_MAX = 1024


def _clear_caches() -> None:
    _PLANS.clear()
    _keep_bits_shape.cache_clear()


def _plan(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _varlen_key(varlen):
    return None if varlen is None else (varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k)


@dataclass(frozen=True)
class _FwdPlan:
    cfg: TileConfig
    grid: Tuple[int, int]
    visited_shape: Tuple[int, int, int]
    bf: int               # batch-stride factor (0: packed)
    head: tuple           # the kernel's q_strides, k_strides, v_strides
    tail: tuple           # (H, Sq, Sk, D), scale · log2(e), (kv_group, win_left, win_right)
    lengths: tuple        # Tq, Tk (the end of seqs)
    lse_strides: tuple
    constexprs: dict
    variants: Variants = field(default_factory=Variants)    # triton_launch's compiled variants


def _fwd_plan(q, k, v, red, causal, scale, dropout_p, head_mask, config, stats, varlen, keep_bits,
              window, rel=None) -> _FwdPlan:
    D, H = q.shape[3], q.shape[1]
    cfg = config or fwd_config(D, q.dtype, q.device)
    B, Sq, Sk, bf, lengths, lse_strides = _seq_args(q, k, varlen)
    n_qb = max(1, _cdiv(Sq, cfg.block_m))
    block_d = max(16, _pow2(D))
    kw = _constexprs(red, causal, dropout_p, varlen, D, block_d, cfg, window)
    return _FwdPlan(cfg, (n_qb, B * H), (B, H, n_qb), bf, (_strides(q, bf), _strides(k, bf), _strides(v, bf)),
                    ((H, Sq, Sk, D), scale * triton_common.LOG2E, _band_args(q, k, Sq, Sk, causal, window)),
                    lengths, lse_strides, dict(WRITE_STATS=stats, REL_BIAS=_rel_flags(rel), **kw))


def _band_args(q, k, Sq: int, Sk: int, causal: bool, window) -> tuple:
    """The kernels' (kv_group, win_left, win_right): query heads per k / v head, and how far left /
    right of the diagonal (j - i = Sk - Sq) a query sees: the window's sides, 0 on the right when
    causal, and a reach past every key (Sq + Sk + 1) for an unbounded side."""
    far = Sq + Sk + 1
    left, right = window
    return (q.shape[1] // k.shape[1], left if left >= 0 else far,
            0 if causal else (right if right >= 0 else far))


def forward(q, k, v, red: ReducedMask, causal: bool, scale: float, dropout_p: float,
            head_mask: Optional[torch.Tensor], rng: Optional[torch.Tensor] = None,
            config: Optional[TileConfig] = None, stats: bool = False, varlen=None, keep_bits=None,
            window: Tuple[int, int] = (-1, -1), rel_bias=None):
    """Returns (out [B, H, Sq, D] in q.dtype, lse [B, H, Sq] fp32 in log2 units[, stats]).
    With ``varlen``, q / k / v are [1, H, T, D] views of packed tensors (see _seq_args).  With
    ``keep_bits`` (int32, keep_bits_shape()), the dropout keep-mask is also written there.
    window: the (left, right) band, causal folded in; k / v may have fewer heads (grouped-query).
    rel_bias: DeBERTa's (c2p, p2c, index) (fused_attn.DisentangledBias), gathered per tile."""
    has_bits = keep_bits is not None
    rel = _rel_tables(rel_bias)
    key = ("fwd", q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, red.kind, causal,
           scale, dropout_p, head_mask is None, config, stats, _varlen_key(varlen), has_bits, window, _rel_key(rel))
    plan = _plan(key, lambda: _fwd_plan(q, k, v, red, causal, scale, dropout_p, head_mask, config, stats, varlen,
                                        has_bits, window, rel))
    out = torch.empty_like(q)   # keeps q's layout when dense, e.g. HF's [B, S, H, D] storage
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    dummy = lse
    visited = torch.zeros(plan.visited_shape, device=q.device, dtype=torch.int32) if stats else dummy
    launch(triton_fwd.attn_fwd_kernel, plan.grid, (
        q, k, v, out, lse, visited, *plan.head, _strides(out, plan.bf), *plan.tail,
        _seqs(varlen, plan.lengths, dummy), plan.lse_strides, *_mask_args(red, plan.cfg, causal, dummy),
        _head_mask_args(head_mask), _keep_args(keep_bits, plan.cfg),
        _dropout_args(dropout_p, rng, q, dummy), _rel_args(rel, plan.bf, dummy)), plan.constexprs, plan.variants)
    if stats:
        return out, lse, visited
    return out, lse


def bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> Tuple[TileConfig, TileConfig]:
    """(dK/dV tiles, dQ tiles).  dK/dV keeps a key tile resident and streams query tiles, dQ the
    reverse; each kernel gets its own (BLOCK_M, BLOCK_N) and so its own block map."""
    if _TILE_OVERRIDE is not None:
        return _TILE_OVERRIDE[1], _TILE_OVERRIDE[2]
    if device.type != "cuda":
        return TileConfig(16, 32, 4, 1), TileConfig(32, 16, 4, 1)
    bd = _pow2(head_dim)
    if dtype == torch.float32:
        return TileConfig(32, 32, 4, 2), TileConfig(32, 32, 4, 2)
    if bd <= 128:
        return TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)
    return TileConfig(32, 32, 4, 2), TileConfig(32, 32, 4, 2)


DELTA_BLOCK_M = 64


DETERMINISTIC_ENV = "FUSED_ATTN_DETERMINISTIC"


def single_pass_backward() -> bool:
    """Whether the backward takes FlashAttention-2's single pass (dQ added by fp32 atomics, not
    bitwise repeatable): only with $FUSED_ATTN_DETERMINISTIC=0, and never while torch demands
    deterministic algorithms."""
    return os.environ.get(DETERMINISTIC_ENV, "1") == "0" and not torch.are_deterministic_algorithms_enabled()


@dataclass(frozen=True)
class _BwdPlan:
    cfg: TileConfig              # dK/dV tiles
    dq_cfg: TileConfig           # dQ tiles
    delta_grid: Tuple[int, int]
    delta_args: tuple            # out / grad_out strides, H, rows, D
    bf: int                      # batch-stride factor (0: packed)
    inputs: tuple                # q, k, v, grad_out strides
    dkdv_grid: Tuple[int, int]
    dq_grid: Tuple[int, int]
    sizes: tuple                 # the kernels' sizes (H, Sq, Sk, D), scales (scale · log2(e), scale), band
    lengths: tuple               # Tq, Tk (the end of seqs)
    lse_strides: tuple
    delta_constexprs: dict
    dkdv_constexprs: Tuple[dict, dict]    # [single pass]
    dq_constexprs: dict
    # triton_launch's compiled variants of each kernel
    delta_variants: Variants = field(default_factory=Variants)
    dkdv_variants: Tuple[Variants, Variants] = field(default_factory=lambda: (Variants(), Variants()))  # [single pass]
    dq_variants: Variants = field(default_factory=Variants)


def _bwd_plan(grad_out, q, k, v, out, red, causal, scale, dropout_p, head_mask, config, dq_config,
              varlen, keep_bits, window, rel=None) -> _BwdPlan:
    H, D = q.shape[1], q.shape[3]
    B, Sq, Sk, bf, lengths, lse_strides = _seq_args(q, k, varlen)
    if config is None:
        config, dq_config = bwd_config(D, q.dtype, q.device)
    dq_config = dq_config or config
    block_d = max(16, _pow2(D))
    dkdv = _constexprs(red, causal, dropout_p, varlen, D, block_d, config, window)
    # REL_GRAD: dK/dV owns key rows (dp2c), dQ query rows (dc2p); the single pass adds both in dK/dV
    flags = _rel_flags(rel)
    c2p_bit, p2c_bit = flags & triton_common.REL_C2P, flags & triton_common.REL_P2C
    return _BwdPlan(
        config, dq_config,
        (_cdiv(q.shape[2], DELTA_BLOCK_M), q.shape[0] * H), (*out.stride(), *grad_out.stride(), H, q.shape[2], D),
        bf, (_strides(q, bf), _strides(k, bf), _strides(v, bf), _strides(grad_out, bf)),
        (max(1, _cdiv(Sk, config.block_n)), B * H), (max(1, _cdiv(Sq, dq_config.block_m)), B * H),
        ((H, Sq, Sk, D), (scale * triton_common.LOG2E, scale), _band_args(q, k, Sq, Sk, causal, window)),
        lengths, lse_strides,
        dict(BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d),
        tuple(dict(dkdv, REL_BIAS=flags, REL_GRAD=p2c_bit | (c2p_bit if atomic else 0)) for atomic in (False, True)),
        dict(_constexprs(red, causal, dropout_p, varlen, D, block_d, dq_config, window),
             REL_BIAS=flags, REL_GRAD=c2p_bit))


def backward(grad_out, q, k, v, out, lse, red: ReducedMask, causal: bool, scale: float,
             dropout_p: float, head_mask: Optional[torch.Tensor], rng: Optional[torch.Tensor] = None,
             config: Optional[TileConfig] = None, dq_config: Optional[TileConfig] = None, varlen=None,
             keep_bits=None, atomic_dq: Optional[bool] = None, window: Tuple[int, int] = (-1, -1),
             rel_bias=None):
    """Returns (dq, dk, dv) in the dtypes and layouts of q, k, v (with rel_bias also dc2p, dp2c,
    fp32, None for a missing table).  config / dq_config override
    the tiles of the dK/dV and dQ kernels (dq_config defaults to config).  keep_bits: the words
    the forward stored (else the keep-mask is regenerated).  atomic_dq: the single pass (default
    single_pass_backward()).  window: the forward's.  Grouped-query k / v (fewer heads than q): the
    dK/dV kernel writes one fp32 gradient per query head, summed over each group here (exact up to
    the fp32 sum; dk, dv are then contiguous)."""
    atomic = single_pass_backward() if atomic_dq is None else atomic_dq
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    has_bits = keep_bits is not None
    rel, dc2p, dp2c = _rel_grads(_rel_tables(rel_bias))
    key = ("bwd", q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.stride(), grad_out.stride(), q.dtype,
           q.device, red.kind, causal, scale, dropout_p, head_mask is None, config, dq_config, _varlen_key(varlen),
           has_bits, window, _rel_key(rel))
    plan = _plan(key, lambda: _bwd_plan(grad_out, q, k, v, out, red, causal, scale, dropout_p, head_mask, config,
                                        dq_config, varlen, has_bits, window, rel))
    # rowsum(dO ∘ O), laid out like lse: a row-wise op, so packed rows need no sequence bounds
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    launch(triton_bwd.bwd_delta_kernel, plan.delta_grid, (out, grad_out, delta, *plan.delta_args),
           plan.delta_constexprs, plan.delta_variants)
    # the single pass adds into fp32 zeros (rows no key block reaches stay 0)
    dq = torch.zeros_like(q, dtype=torch.float32) if atomic else torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    if group > 1:    # per query head, summed over the group below
        dk = torch.empty((k.shape[0], q.shape[1], k.shape[2], k.shape[3]), device=k.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    dummy = lse
    tail = (*plan.sizes, _seqs(varlen, plan.lengths, dummy), plan.lse_strides)
    head = _head_mask_args(head_mask)
    drop = _dropout_args(dropout_p, rng, q, dummy)
    rel_args = _rel_args(rel, plan.bf, dummy)
    launch(triton_bwd.attn_bwd_dkdv_kernel, plan.dkdv_grid, (
        q, k, v, grad_out, lse, delta, dk, dv, *plan.inputs, _strides(dk, plan.bf), _strides(dv, plan.bf), *tail,
        *_mask_args(red, plan.cfg, causal, dummy, transposed=True), head,
        _keep_args(keep_bits, plan.cfg, whole_words=False),
        (dq, *_strides(dq, plan.bf)) if atomic else _NO_DQ_ACC, drop,
        rel_args, _rel_grad_args((dc2p, dp2c), dummy)),
        plan.dkdv_constexprs[atomic], plan.dkdv_variants[atomic])
    if group > 1:
        dk, dv = (t.unflatten(1, (k.shape[1], group)).sum(2).to(k.dtype) for t in (dk, dv))
    tables = () if rel is None else (dc2p, dp2c)
    if atomic:
        return (dq.to(q.dtype), dk, dv, *tables)
    launch(triton_bwd_dq.attn_bwd_dq_kernel, plan.dq_grid, (
        q, k, v, grad_out, lse, delta, dq, *plan.inputs, _strides(dq, plan.bf), *tail,
        *_mask_args(red, plan.dq_cfg, causal, dummy), head, _keep_args(keep_bits, plan.dq_cfg), drop,
        rel_args, _rel_grad_args((dc2p,), dummy)),
        plan.dq_constexprs, plan.dq_variants)
    return (dq, dk, dv, *tables)


def dropout_keep_mask(batch: int, heads: int, q_len: int, k_len: int, dropout_p: float,
                      rng: torch.Tensor) -> torch.Tensor:
    """The bool keep-mask [B, H, Sq, Sk] the kernels apply for the (seed, offset) in rng, on rng's
    device: a testing hook, so the reference can apply exactly the same dropout."""
    check_rng(rng, rng.device)
    keep = torch.empty((batch, heads, q_len, k_len), dtype=torch.int8, device=rng.device)
    grid = (_cdiv(q_len, 32), _cdiv(k_len, 32), batch * heads)
    triton_keep.dropout_keep_kernel[grid](keep, heads, q_len, k_len, rng, float(dropout_p),
                                          BLOCK_M=32, BLOCK_N=32)
    return keep.bool()


class TritonEngine(Engine):
    """The Triton kernels: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)."""

    name = "triton"
    device_type = "cuda"
    max_head_dim = MAX_HEAD_DIM
    features = frozenset({"window", "gqa", "rel_bias"})

    def unavailable(self) -> Optional[str]:
        return _IMPORT_ERROR

    def reasons(self, q: torch.Tensor) -> List[str]:
        out = []
        if _IMPORT_ERROR is not None:
            out.append(_IMPORT_ERROR)
        if q.device.type != "cuda" and not interpreting():
            out.append(f"tensors are on {q.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)")
        if q.dtype not in self.dtypes:
            out.append(f"dtype {q.dtype} is not supported ({', '.join(str(d) for d in self.dtypes)})")
        if q.shape[-1] > MAX_HEAD_DIM:
            out.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
        return out

    def forward(self, q, k, v, red, *, causal, dropout_p, scale, head_mask=None, rng=None, varlen=None,
                stats=False, keep_bits=None, window_size=(-1, -1), rel_bias=None):
        return forward(q, k, v, red, causal, scale, dropout_p, head_mask, rng, stats=stats, varlen=varlen,
                       keep_bits=keep_bits, window=tuple(window_size), rel_bias=rel_bias)

    def backward(self, grad_out, q, k, v, out, lse, red, *, causal, dropout_p, scale, head_mask=None, rng=None,
                 varlen=None, keep_bits=None, window_size=(-1, -1), rel_bias=None):
        grads = backward(grad_out, q, k, v, out, lse, red, causal, scale, dropout_p, head_mask, rng, varlen=varlen,
                         keep_bits=keep_bits, window=tuple(window_size), rel_bias=rel_bias)
        if rel_bias is None:
            return grads
        # the table gradients in the tables' dtypes
        return (*grads[:3], *(None if t is None else g.to(t.dtype) for g, t in zip(grads[3:], rel_bias[:2])))

    def keep_bits_shape(self, q, k, dropout_p, varlen=None):
        return keep_bits_shape(q, k, dropout_p, varlen)

    def keep_mask(self, batch, heads, q_len, k_len, dropout_p, rng):
        return dropout_keep_mask(batch, heads, q_len, k_len, dropout_p, rng)


ENGINE = TritonEngine()
