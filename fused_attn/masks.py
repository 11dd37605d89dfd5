"""Mask validation and reduction: every accepted ``attention_mask`` form -> one cheap, exact
description that the kernels consume (docs/design.md, "Masks" and "Skipping work").

Pure torch, no kernels, no host synchronisation: everything here is a handful of vectorised
tensor ops, so it is cheap, traceable, and computed once per mask (see ``reduce_mask``'s cache).

Two reduced forms exist:

* ``kind == "keys"`` -- a key-padding mask (``[B, Sk]``, or a 4D mask broadcast over heads and
  queries such as HF's ``[B, 1, 1, Sk]`` extended mask).  Per batch row ``b`` the visible keys lie
  in ``[key_start[b], key_end[b])``; the kernels' loop bounds shrink to that range.  When the row
  is a contiguous run of visible keys carrying no additive value (right or left padding, the
  tokenizer's case) ``key_needs_mask[b] == 0`` and no mask is loaded at all; otherwise the kernel
  loads the row's mask values tile by tile inside the range.
* ``kind == "blocks"`` -- any other mask (per-pair ``[B, Sq, Sk]``, 4D masks that vary over heads
  or queries).  ``block_map(BLOCK_M, BLOCK_N, causal)`` classifies each (query block, key block)
  tile as empty (skipped), full (no mask load) or partial (mask tile loaded), and lists the
  non-empty key blocks of every query block in ascending order, like FlexAttention's BlockMask.

``kind == "none"`` means no mask at all (causal alone is handled by loop bounds in the kernels).

Visibility rule: bool/int masks: nonzero = may attend.  Float (additive) masks: the value is
added to the scores in fp32, and an entry ``<= HIDDEN_THRESHOLD`` (-1e4, which covers HF's old
-10000.0, ``finfo(dtype).min`` and ``-inf``) hides the key.
"""
from __future__ import annotations

import collections
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

HIDDEN_THRESHOLD = -1e4

# Block states of a (query block, key block) tile.
EMPTY, PARTIAL, FULL = 0, 1, 2


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, torch.Tensor) else repr(t)


@dataclass
class BlockLists:
    """For every row of tiles (a query block, or in the transpose a key block): how many PARTIAL
    and FULL tiles it has (``*_count`` [Bm, Hm, n]) and which (``*_index`` [Bm, Hm, n, m], the
    listed blocks first, ascending).  EMPTY tiles are in neither list: kernels never visit them."""

    part_count: torch.Tensor
    part_index: torch.Tensor
    full_count: torch.Tensor
    full_index: torch.Tensor


def _lists(state: torch.Tensor) -> BlockLists:
    def one(sel):
        count = sel.sum(-1, dtype=torch.int32)
        # stable sort on "not selected" keeps the selected blocks first and in ascending order
        index = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count.contiguous(), index.contiguous()

    pc, pi = one(state == PARTIAL)
    fc, fi = one(state == FULL)
    return BlockLists(pc, pi, fc, fi)


@dataclass
class BlockMap:
    """Tile classification for one (BLOCK_M, BLOCK_N, causal) triple.

    ``state``: [Bm, Hm, nQB, nKB] int8 (EMPTY / PARTIAL / FULL); nQB is 1 when the mask is the
    same for every query block.  The C++ kernels walk ``state`` itself; the Triton kernels take
    split lists (a loop over PARTIAL tiles, then one over FULL tiles, no branch inside): ``kv``
    -- the key blocks of each query block (forward, dQ) -- and ``transposed_lists()`` -- the
    query blocks of each key block (dK / dV), built on first use.
    """

    block_m: int
    block_n: int
    state: torch.Tensor
    kv: BlockLists
    num_q_blocks: int
    _cache: dict = field(default_factory=dict, repr=False)

    def _state_t(self):
        return self.state.expand(-1, -1, self.num_q_blocks, -1).transpose(-1, -2)

    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def transposed_lists(self) -> BlockLists:
        return self._get("t_lists", lambda: _lists(self._state_t()))


@dataclass
class ReducedMask:
    """The reduced, kernel-ready description of an attention mask (see module docstring).

    Build it with :func:`reduce_mask`; pass it as ``attention_mask`` to reuse it across calls
    (e.g. across the layers of a model) -- ``fused_attn.attention`` accepts it directly.
    """

    kind: str                      # "none" | "keys" | "blocks"
    batch: int
    heads: int
    q_len: int
    k_len: int
    # Mask values to load, as a 4D view [Bm, Hm, Sqm, Sk] (stride 0 where broadcast), uint8
    # visibility (1 = may attend) or float additive.  None for kind "none".
    values: Optional[torch.Tensor] = None
    additive: bool = False
    # kind "keys": [B] int32; key_needs_mask[b] != 0: row b must load its mask values inside
    # [key_start[b], key_end[b]) (holes or additive values there)
    key_start: Optional[torch.Tensor] = None
    key_end: Optional[torch.Tensor] = None
    key_needs_mask: Optional[torch.Tensor] = None
    # set when a deferred (CUDA) check of the values found a float 0/1 or NaN mask: every later use raises
    error: Optional[str] = field(default=None, repr=False)
    _block_maps: Dict[Tuple[int, int, bool], BlockMap] = field(default_factory=dict, repr=False)

    @property
    def device(self):
        return self.values.device if self.values is not None else None

    def __repr__(self) -> str:   # short: the dataclass default prints every tensor in full
        v = self.values
        what = "" if v is None else (f", values={'additive ' if self.additive else ''}{str(v.dtype)[6:]}"
                                     f"{list(v.shape)} on {v.device}")
        return (f"ReducedMask(kind={self.kind!r}, B={self.batch}, H={self.heads}, Sq={self.q_len}, "
                f"Sk={self.k_len}{what}, block_maps={len(self._block_maps)})")

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device) -> None:
        if (self.batch, self.heads, self.q_len, self.k_len) != (batch, heads, q_len, k_len):
            raise ValueError(
                f"attention_mask: this ReducedMask was built for (B, H, Sq, Sk) = "
                f"{(self.batch, self.heads, self.q_len, self.k_len)}, but q/k give "
                f"{(batch, heads, q_len, k_len)}")
        if self.values is not None and self.values.device != device:
            raise ValueError(f"attention_mask: ReducedMask is on {self.values.device}, q is on {device}")

    def visible(self) -> torch.Tensor:
        """Dense visibility as a bool view broadcastable to [B, H, Sq, Sk] (True = may attend)."""
        if self.values is None:
            raise ValueError("visible(): a 'none' mask hides nothing")
        if self.additive:
            return self.values > HIDDEN_THRESHOLD
        return self.values != 0

    def block_map(self, block_m: int, block_n: int, causal: bool) -> BlockMap:
        """Tile classification for kernels with these tile sizes; cached on this object."""
        key = (block_m, block_n, bool(causal))
        bm = self._block_maps.get(key)
        if bm is None:
            bm = self._build_block_map(block_m, block_n, bool(causal))
            self._block_maps[key] = bm
        return bm

    def _build_block_map(self, block_m: int, block_n: int, causal: bool) -> BlockMap:
        sq, sk = self.q_len, self.k_len
        nqb, nkb = -(-sq // block_m), -(-sk // block_n)
        vis = self.visible()                                   # [Bm, Hm, Sqm, Sk]
        bm_, hm_, sqm, _ = vis.shape
        pad_n = nkb * block_n - sk
        if sqm == 1:
            # same mask for every query: classify key blocks once, broadcast over query blocks
            any_v = torch.nn.functional.pad(vis, (0, pad_n), value=False)
            any_v = any_v.view(bm_, hm_, 1, nkb, block_n).any(-1)
            # the tile at the Sk edge is never FULL: the kernel bounds-checks only PARTIAL tiles
            all_v = torch.nn.functional.pad(vis, (0, pad_n), value=False)
            all_v = all_v.view(bm_, hm_, 1, nkb, block_n).all(-1)
            nz = None
            if self.additive:
                nz = torch.nn.functional.pad((self.values != 0) & vis, (0, pad_n), value=False)
                nz = nz.view(bm_, hm_, 1, nkb, block_n).any(-1)
        else:
            pad_m = nqb * block_m - sq
            v = torch.nn.functional.pad(vis, (0, pad_n, 0, pad_m), value=False)
            v = v.view(bm_, hm_, nqb, block_m, nkb, block_n)
            any_v = v.any(-1).any(-2)
            # query rows past Sq are never stored, so they do not stop a tile from being FULL
            v_all = torch.nn.functional.pad(vis, (0, pad_n), value=False)
            v_all = torch.nn.functional.pad(v_all, (0, 0, 0, pad_m), value=True)
            all_v = v_all.view(bm_, hm_, nqb, block_m, nkb, block_n).all(-1).all(-2)
            nz = None
            if self.additive:
                nz = torch.nn.functional.pad((self.values != 0) & vis, (0, pad_n, 0, pad_m), value=False)
                nz = nz.view(bm_, hm_, nqb, block_m, nkb, block_n).any(-1).any(-2)
        full = all_v if nz is None else all_v & ~nz
        state = torch.where(any_v, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)
        if causal:
            state = torch.minimum(state, causal_block_state(sq, sk, block_m, block_n, state.device))
        return BlockMap(block_m, block_n, state, _lists(state), nqb)


def causal_block_state(sq: int, sk: int, block_m: int, block_n: int, device) -> torch.Tensor:
    """[1, 1, nQB, nKB] int8 tile states of the bottom-right aligned causal mask alone.

    Query i sees key j iff j <= i + (sk - sq).  Tiles at the Sk edge are never FULL.
    """
    nqb, nkb = -(-sq // block_m), -(-sk // block_n)
    off = sk - sq
    q0 = torch.arange(nqb, device=device)[:, None] * block_m          # first query row of the tile
    q1 = torch.clamp(q0 + block_m, max=sq) - 1                        # last real query row
    k0 = torch.arange(nkb, device=device)[None, :] * block_n
    k1 = k0 + block_n - 1
    any_v = k0 <= q1 + off
    full = (k1 <= q0 + off) & (k1 < sk)
    state = torch.where(any_v, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)
    return state[None, None]


# --------------------------------------------------------------------------------------------
# validation + reduction


def _normalize(mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int) -> torch.Tensor:
    """Check the shape of a raw mask and return it as a 4D view [Bm, Hm, Sqm, Sk]."""
    shape = tuple(mask.shape)
    expect = (f"expected [B, Sk] = [{batch}, {k_len}], [B, Sq, Sk] = [{batch}, {q_len}, {k_len}] "
              f"or broadcastable [B|1, H|1, Sq|1, Sk] = [{batch}|1, {heads}|1, {q_len}|1, {k_len}]")
    if mask.dim() == 2:
        if shape != (batch, k_len):
            raise ValueError(f"attention_mask: key-padding mask has shape {_shape(mask)}; {expect}")
        return mask[:, None, None, :]
    if mask.dim() == 3:
        if shape != (batch, q_len, k_len):
            raise ValueError(f"attention_mask: per-pair mask has shape {_shape(mask)}; {expect}")
        return mask[:, None, :, :]
    if mask.dim() == 4:
        b, h, m, n = shape
        if b not in (1, batch) or h not in (1, heads) or m not in (1, q_len) or n != k_len:
            raise ValueError(f"attention_mask: 4D mask has shape {_shape(mask)}; {expect}")
        return mask
    raise ValueError(f"attention_mask: rank {mask.dim()} (shape {_shape(mask)}) is not accepted; {expect}")


def _layout_hint(mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int) -> str:
    """A hint when the mask would fit q, k, v given in HF's [B, S, H, D] layout (dims 1 and 2
    swapped; with self-attention's Sk == Sq, k's dim 1 is the real Sk)."""
    try:
        _normalize(mask, batch, q_len, heads, heads)
    except ValueError:
        return ""
    return (f". The mask would fit q, k, v of shape [B, S, H, D] = [{batch}, {heads}, {q_len}, D]: "
            f"fused_attn takes [B, H, S, D], so pass q.transpose(1, 2), k.transpose(1, 2), "
            f"v.transpose(1, 2) (strided views are read in place, not copied)")


def _stride0(t: torch.Tensor) -> torch.Tensor:
    """Give broadcast (size-1) dims stride 0 so kernels can index every dim the same way."""
    return t.as_strided(t.shape, [0 if s == 1 else st for s, st in zip(t.shape, t.stride())])


def reduce_mask(attention_mask, batch: int, heads: int, q_len: int, k_len: int,
                device=None, *, float01_bias: bool = False) -> ReducedMask:
    """Validate ``attention_mask`` for q [batch, heads, q_len, D], k [batch, heads, k_len, D] and
    reduce it (see the module docstring).  Results for the same mask tensor (unchanged since) and
    the same shapes are cached, so the layers of a model share one reduction.

    A float (additive) mask holding only 0s and 1s, with at least one 1, is refused (ValueError):
    it is a padding mask cast to float, which hides nothing.  ``float01_bias=True`` (or
    ``FUSED_ATTN_FLOAT01_BIAS=1``) accepts it as a genuine +1 bias; pass the returned ReducedMask as
    ``attention_mask``.  A float mask holding NaN is refused whatever the flags (docs/design.md,
    "Masks")."""
    if not torch.compiler.is_compiling() and _PENDING:
        _poll_checks()
    if isinstance(attention_mask, ReducedMask):
        if attention_mask.error is not None:
            raise ValueError(attention_mask.error)
        attention_mask.check(batch, heads, q_len, k_len, device if device is not None else attention_mask.device)
        return attention_mask
    if attention_mask is None:
        return ReducedMask("none", batch, heads, q_len, k_len)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, a fused_attn ReducedMask or None, "
                        f"got {type(attention_mask).__name__}")
    if device is not None and attention_mask.device != torch.device(device):
        raise ValueError(f"attention_mask: mask is on {attention_mask.device} but q is on {device}")
    if torch.compiler.is_compiling():
        return _reduce(attention_mask, batch, heads, q_len, k_len)
    key = (batch, heads, q_len, k_len)
    hit = _CACHE.get(attention_mask, key)
    if hit is not None:
        if hit.error is not None:
            raise ValueError(hit.error)
        return hit
    version = None if attention_mask.is_inference() else attention_mask._version   # before reducing
    red = _reduce(attention_mask, batch, heads, q_len, k_len)
    if red.additive:
        _check_additive(red, attention_mask, float01_bias)
    if not float01_bias:        # (an opt-out holds for the ReducedMask returned, not for the tensor)
        _CACHE.put(attention_mask, key, red, version)
    if red.values is not None:
        _BY_VALUES.put(red.values, (red.kind,) + key, red)
    return red


# -- additive masks: a padding mask cast to float, NaN -------------------------------------------
# Float masks are additive, so a float mask of 0s and 1s hides nothing: almost surely
# `attention_mask.float()`.  It is refused, like a mask holding NaN (SDPA would return NaN rows;
# the kernels would hide the entry).  The check reads the values once per mask tensor (cache miss
# of reduce_mask, so once per forward of a model, not per layer).  CPU masks: checked in the call.
# CUDA masks: the statistics are computed on the GPU and copied to pinned memory behind an event
# (no host sync); the next reduce_mask call that finds the event done raises (the next layer of
# the same forward, typically).  FUSED_ATTN_DEBUG=1 checks CUDA masks in the call (one host sync).
FLOAT01_BIAS_ENV = "FUSED_ATTN_FLOAT01_BIAS"
_PENDING: "collections.deque" = collections.deque()   # (stats in pinned memory, event, reduction, what, dtype, ok)
_PENDING_LOCK = threading.Lock()


def _float01_error(what: str, dtype) -> str:
    return (f"attention_mask: {what} holds only 0s and 1s. Float masks are additive (added to the scores), "
            f"so its 1.0 and 0.0 both mean 'attend' and nothing is hidden: the result would be wrong. A padding "
            f"mask (1 = attend): pass mask.bool() (or the integer mask). An additive mask: (1 - mask) * "
            f"torch.finfo({dtype}).min (0 = attend, finfo.min = hidden). A genuine +1 bias: "
            f"fused_attn.reduce_mask(mask, B, H, Sq, Sk, float01_bias=True) as attention_mask, or "
            f"{FLOAT01_BIAS_ENV}=1")


def _nan_error(what: str) -> str:
    return (f"attention_mask: {what} contains NaN. fused_attn refuses it rather than hide the entry or "
            f"spread NaN over the row (SDPA returns NaN there); find where the NaN comes from, or replace it "
            f"(torch.nan_to_num(mask, nan=0.0) attends, nan=float('-inf') hides)")


def _stats(values: torch.Tensor) -> torch.Tensor:
    """[min, max] of v * (v - 1) (both 0 iff every v is 0 or 1; NaN iff some v is NaN) and max(v),
    as one fp32 tensor [3]: four small kernels, no host sync."""
    t = values * (values - 1)
    lo, hi = torch.aminmax(t)
    return torch.stack([lo.float(), hi.float(), values.amax().float()])


def _verdict(stats, what: str, dtype, float01_ok: bool) -> Optional[str]:
    """The error message for these statistics, or None when the mask is fine."""
    lo, hi, top = stats
    if lo != lo or hi != hi or top != top:
        return _nan_error(what)
    if not float01_ok and lo == 0 and hi == 0 and top == 1:
        return _float01_error(what, dtype)
    return None


def _check_additive(red: ReducedMask, mask: torch.Tensor, float01_bias: bool) -> None:
    from .packing import debug_checks

    values = red.values
    ok = float01_bias or os.environ.get(FLOAT01_BIAS_ENV, "0") not in ("", "0")
    what = f"a float mask ({mask.dtype}, shape {_shape(mask)})"
    if values.device.type == "cpu" or (values.device.type == "cuda" and debug_checks()
                                        and not torch.cuda.is_current_stream_capturing()):
        error = _verdict(_stats(values).tolist(), what, mask.dtype, ok)
        if error is not None:
            raise ValueError(error)
    elif values.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        host = torch.empty(3, dtype=torch.float32, pin_memory=True)
        host.copy_(_stats(values), non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        _defer(host, ready, red, what, mask.dtype, ok)


def _defer(host: torch.Tensor, ready, red: ReducedMask, what: str, dtype, ok: bool) -> None:
    """Queue a check whose statistics land in `host` once `ready` (anything with .query()) is done."""
    _PENDING.append((host, ready, red, what, dtype, ok))


def _poll_checks() -> None:
    """Raise for the first finished CUDA check that found a float 0/1 or NaN mask (no waiting); the
    mask's reduction keeps the error, so every later use of it raises too."""
    if not _PENDING_LOCK.acquire(blocking=False):
        return
    try:
        while _PENDING and _PENDING[0][1].query():
            host, _, red, what, dtype, ok = _PENDING.popleft()
            red.error = _verdict(host.tolist(), f"{what}, passed to an earlier call on the GPU (checked without "
                                                f"a host sync, so that call's result is wrong; FUSED_ATTN_DEBUG=1 "
                                                f"raises in the call itself),", dtype, ok)
            if red.error is not None:
                raise ValueError(red.error)
    finally:
        _PENDING_LOCK.release()


def rebuild(kind, batch, heads, q_len, k_len, values, additive, key_start, key_end, key_needs_mask) -> ReducedMask:
    """The ReducedMask whose tensors these are (the same object when it is still alive, so its
    cached block maps are reused; the custom ops in fused_attn.ops receive only tensors)."""
    if kind == "none":
        return ReducedMask("none", batch, heads, q_len, k_len)
    hit = _BY_VALUES.get(values, (kind, batch, heads, q_len, k_len))
    if hit is not None:
        return hit
    return ReducedMask(kind, batch, heads, q_len, k_len, values=values, additive=additive,
                       key_start=key_start, key_end=key_end, key_needs_mask=key_needs_mask)


def _reduce(mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int) -> ReducedMask:
    try:
        m4 = _normalize(mask, batch, heads, q_len, k_len)
    except ValueError as e:
        raise ValueError(str(e) + _layout_hint(mask, batch, heads, q_len, k_len)) from None
    if mask.dtype == torch.bool:
        values, additive = m4.view(torch.uint8), False
    elif mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        values, additive = (m4 != 0).view(torch.uint8), False
    elif mask.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        values, additive = (m4.float() if m4.dtype == torch.float64 else m4), True
    else:
        raise TypeError(f"attention_mask: dtype {mask.dtype} is not accepted "
                        f"(bool, integer, or float16/bfloat16/float32/float64 additive)")
    if batch == 0 or q_len == 0 or k_len == 0:      # nothing to compute (shape and dtype are checked)
        return ReducedMask("none", batch, heads, q_len, k_len)
    values = _stride0(values)
    if values.shape[1] == 1 and values.shape[2] == 1:
        return _reduce_keys(values, additive, batch, heads, q_len, k_len)
    return ReducedMask("blocks", batch, heads, q_len, k_len, values=values, additive=additive)


def _reduce_keys(values, additive, batch, heads, q_len, k_len) -> ReducedMask:
    row = values[:, 0, 0, :]                                            # [Bm, Sk]
    vis = row > HIDDEN_THRESHOLD if additive else row != 0
    count = vis.sum(-1)
    any_v = count > 0
    first = vis.to(torch.uint8).argmax(-1)                               # first visible key
    last = k_len - vis.flip(-1).to(torch.uint8).argmax(-1)              # one past the last visible
    start = torch.where(any_v, first, 0)
    end = torch.where(any_v, last, 0)
    needs_mask = count != end - start                                    # holes inside the run
    if additive:
        needs_mask = needs_mask | ((row != 0) & vis).any(-1)             # values to add
    rb = row.shape[0]
    expand = (lambda t: t.expand(batch)) if rb == 1 else (lambda t: t)
    return ReducedMask(
        "keys", batch, heads, q_len, k_len, values=values, additive=additive,
        key_start=expand(start.to(torch.int32)).contiguous(),
        key_end=expand(end.to(torch.int32)).contiguous(),
        key_needs_mask=expand(needs_mask.to(torch.int32)).contiguous())


def dense_mask(attention_mask, batch: int, heads: int, q_len: int, k_len: int):
    """(visible, bias) as tensors broadcastable to [B, H, Sq, Sk]: ``visible`` bool (None if no
    mask), ``bias`` fp32 additive values with hidden entries zeroed (None if not additive).
    Used by the reference; validates like :func:`reduce_mask`."""
    red = reduce_mask(attention_mask, batch, heads, q_len, k_len)
    if red.kind == "none":
        return None, None
    vis = red.visible()
    bias = torch.where(vis, red.values.float(), 0.0) if red.additive else None
    return vis, bias


class _MaskCache:
    """Tiny identity cache: same tensor object, same version counter, same shapes -> same
    reduction.  Holds weak references only, so it never keeps a mask alive.  Inference tensors
    (torch.inference_mode) are never cached: they have no version counter.

    Thread-safe: changes to the table (insert, evict, a dying mask's callback) hold a lock
    (re-entrant: dropping an evicted entry can run another mask's callback in the same thread);
    lookups are single dict reads.  An entry records the version the mask had *before* it was
    reduced, so a write from another thread during the reduction makes the entry stale."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: Dict[int, tuple] = {}
        self._lock = threading.RLock()

    def get(self, mask: torch.Tensor, key):
        e = self.entries.get(id(mask))
        if e is None or mask.is_inference():
            return None
        ref, version, k, red = e
        if ref() is not mask or version != mask._version or k != key:
            return None
        return red

    def put(self, mask: torch.Tensor, key, red, version: Optional[int] = None):
        """Cache `red` for `mask` at `version` (default: its version now)."""
        # Inference tensors have no version counter, so an in-place change could not be seen:
        # they are reduced on every call (HF's mask interface still reduces once per forward).
        if torch.compiler.is_compiling() or mask.is_inference():
            return
        mid = id(mask)
        try:
            ref = weakref.ref(mask, lambda _r, mid=mid: self._drop(mid, _r))
        except TypeError:
            return
        with self._lock:
            while len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            self.entries[mid] = (ref, mask._version if version is None else version, key, red)

    def _drop(self, mid: int, ref):
        with self._lock:
            e = self.entries.get(mid)
            if e is not None and e[0] is ref:         # not a newer entry under a reused id
                del self.entries[mid]

    def clear(self):
        with self._lock:
            self.entries.clear()


_CACHE = _MaskCache()        # user's mask tensor -> its reduction
_BY_VALUES = _MaskCache()    # reduction's values tensor -> the reduction (for fused_attn.ops)
