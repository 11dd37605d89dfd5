"""Hugging Face glue shared by FusedBertSelfAttention and ``attn_implementation="fused_attn"``:

* :func:`fused_attention_forward` -- HF's attention-function contract
  ``(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> (out, weights)``
  with ``out`` [B, Sq, H, D];  runs ``fused_attn.attention`` / ``varlen_attention`` (or eager math
  when the caller asked for the attention probabilities, which the fused kernel never forms), with
  grouped-query k/v as they come (no repeat_kv) and sliding windows as ``window_size``.
* :func:`fused_attn_mask` -- HF's mask-function contract (``AttentionMaskInterface``).  Instead of a
  dense [B, 1, Sq, Sk] tensor it returns a :class:`FusedMask`: the key-padding mask plus a causal
  flag, a sliding window and packed-sequence ids; the padding is reduced to a
  ``fused_attn.ReducedMask`` once, by the first layer that uses it, and reused by every other
  layer of the forward pass (and by the backward pass).
* :func:`register` -- adds both under the name "fused_attn".

Imports transformers lazily: importing this module does not import it.
"""
from __future__ import annotations

import inspect
import sys
from typing import Dict, Optional, Tuple

import torch

from .. import masks, reference
from ..functional import attention as fused_attention
from ..functional import varlen_attention
from ..masks import ReducedMask

NAME = "fused_attn"

# kwargs of HF attention functions whose semantics the fused kernel does not have
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")
_ABSENT = object()    # module level: torch.compile cannot trace object() inside the mask function


class FusedMask:
    """The mask the "fused_attn" mask function hands every attention layer of one forward pass.

    Holds the key padding ([B, Sk] bool, True = real token; None = no padding), a causal flag
    (bottom-right aligned), a sliding window in FlashAttention-2's ``(left, right)`` convention
    (``window``; (-1, -1) = none) and the sequence ids of packed sequences, or, for patterns it
    does not describe that way (custom mask functions, static caches), HF's own dense boolean
    mask.  ``resolve`` reduces the padding (or the dense mask) for one (heads, Sq, Sk) once and
    caches the ``ReducedMask`` on this object; the window and causal flag go to the kernel as
    arguments, so no [Sq, Sk] tensor exists for them.
    """

    __slots__ = ("batch", "q_len", "k_len", "padding", "_dense", "_dense_kw", "causal", "packed", "_reduced",
                 "_seqlens", "_from_positions", "window")

    def __init__(self, batch: int, q_len: int, k_len: int, padding: Optional[torch.Tensor] = None,
                 dense: Optional[torch.Tensor] = None, causal: bool = False,
                 packed: Optional[torch.Tensor] = None, dense_kw: Optional[dict] = None,
                 window: Tuple[int, int] = (-1, -1)):
        self.batch, self.q_len, self.k_len = batch, q_len, k_len
        self.padding, self._dense, self.causal = padding, dense, causal
        self.window = window
        self.packed = packed              # [B, S] sequence ids of packed sequences (HF's detection)
        self._dense_kw = dense_kw         # HF's sdpa_mask arguments: the dense mask, built on first use
        self._reduced: Dict[Tuple[int, int, int], ReducedMask] = {}
        self._seqlens = None
        self._from_positions = None

    @property
    def dense(self) -> Optional[torch.Tensor]:
        """HF's boolean [B, 1, Sq, Sk] mask for patterns without a cheaper description (built the
        first time a layer needs it: never, when every layer takes the packed varlen path)."""
        if self._dense is None and self._dense_kw is not None:
            from transformers import masking_utils as mu
            self._dense = mu.sdpa_mask(**self._dense_kw)
            self._dense_kw = None
        return self._dense

    def seqlens(self):
        """The packed sequences of a ``packed`` mask as fused_attn.packing.SeqLens (cached)."""
        if self._seqlens is None:
            from ..packing import seqlens_from_sequence_ids
            self._seqlens = seqlens_from_sequence_ids(self.packed)
        return self._seqlens

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """Shape of the equivalent HF 4D mask, for code that inspects ``attention_mask.shape``."""
        return (self.batch, 1, self.q_len, self.k_len)

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    def contiguous(self) -> "FusedMask":
        """HF's generate() calls ``.contiguous()`` on the mask it prepares for a static cache."""
        return self

    @property
    def is_dense(self) -> bool:
        """Does this mask carry HF's dense boolean mask (a pattern without a cheaper description)?"""
        return self._dense is not None or bool(self._dense_kw)

    @property
    def device(self):
        for src in (self._dense, self.padding, self.packed):
            if src is not None:
                return src.device
        return None if self._dense_kw is None else torch.device(self._dense_kw.get("device", "cpu"))

    def resolve(self, heads: int, q_len: int, k_len: int, device) -> ReducedMask:
        key = (heads, q_len, k_len)
        red = self._reduced.get(key)
        if red is None:
            src = self.dense if self.dense is not None else self.padding
            if self.packed is not None:        # the padded path of a packed batch: block-diagonal
                ids = self.packed
                src = ids[:, :, None] == ids[:, None, :]
                if self.padding is not None:
                    src = src & self.padding[:, None, :]
            red = masks.reduce_mask(src, self.batch, heads, q_len, k_len, device=device)
            self._reduced[key] = red
        return red

    def __repr__(self) -> str:
        what = ("packed" if self.packed is not None else "dense" if self._dense is not None or self._dense_kw
                else "padding" if self.padding is not None else "no padding")
        win = "" if self.window == (-1, -1) else f", window={self.window}"
        return (f"FusedMask(B={self.batch}, Sq={self.q_len}, Sk={self.k_len}, {what}, "
                f"causal={self.causal}{win})")


# --------------------------------------------------------------------------------------------
# mask function (AttentionMaskInterface)


def _key_padding(attention_mask: Optional[torch.Tensor], kv_length: int, kv_offset) -> Optional[torch.Tensor]:
    """HF's 2D padding mask [B, >= kv_offset + kv_length] -> the [B, kv_length] slice of the keys."""
    if attention_mask is None:
        return None
    pad = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    short = kv_offset + kv_length - pad.shape[-1]
    if short > 0:                      # HF pads a short padding mask with "hidden" keys
        pad = torch.nn.functional.pad(pad, (0, short), value=False)
    return pad[:, kv_offset:kv_offset + kv_length]


def fused_attn_mask(**kw) -> Optional[FusedMask]:
    """AttentionMaskInterface entry: a :class:`FusedMask`, never a dense [B, 1, Sq, Sk] tensor
    for padding, causal, sliding-window (HF's ``sliding_window_*_mask_function``) and packed-sequence
    patterns and their combinations.  Other patterns get HF's own boolean mask inside."""
    from transformers import masking_utils as mu

    batch = kw["batch_size"]
    kv_length = kw["kv_length"]
    kv_offset = kw.get("kv_offset", 0) or 0
    mask_function = kw.get("mask_function")
    attention_mask = kw.get("attention_mask")
    if isinstance(attention_mask, FusedMask):     # generate() prepared it already (static caches)
        return attention_mask
    q_length = kw.get("q_length")
    q_offset = kw.get("q_offset", 0)
    if q_length is None and kw.get("cache_position") is not None:    # transformers 4.5x protocol
        q_length, q_offset = kw["cache_position"].shape[0], None

    plain_ints = isinstance(kv_offset, int) and (q_offset is None or isinstance(q_offset, int))
    if plain_ints and attention_mask is not None and attention_mask.dim() != 2:
        plain_ints = False
    parts = _mask_parts(mask_function, mu, kw) if plain_ints else None
    if parts is not None:
        causal, window, packed = parts
        # bottom-right aligned queries: FA2's convention for causal and windows
        aligned = q_offset is not None and q_offset + q_length == kv_offset + kv_length
        if packed is not None:          # HF found packed sequences in position_ids (a flattened batch)
            ok = (q_offset == 0 and kv_offset == 0 and q_length == kv_length and packed.shape[-1] == q_length
                  and packed.shape[0] in (1, batch))
        else:
            ok = aligned or (not causal and window == (-1, -1))
        if ok:
            return FusedMask(batch, q_length, kv_length, padding=_key_padding(attention_mask, kv_length, kv_offset),
                             causal=causal, packed=packed, window=window)
    # anything else (custom mask functions, static caches, a window under torch.compile that it cannot
    # read): HF's exact boolean mask, built when a layer first needs it and reduced to a block map once
    if q_length is None:
        dense = mu.sdpa_mask(**{**kw, "allow_is_causal_skip": False})
        return None if dense is None else FusedMask(batch, dense.shape[-2], dense.shape[-1], dense=dense)
    return FusedMask(batch, q_length, kv_length, dense_kw={**kw, "allow_is_causal_skip": False,
                                                           "allow_is_bidirectional_skip": False})


_BIDIRECTIONAL_WINDOW = "sliding_window_bidirectional_overlay.<locals>.inner_mask"   # |q - kv| <= w
_CAUSAL_WINDOW = "sliding_window_overlay.<locals>.inner_mask"                         # kv > q - w
_PACKED = "packed_sequence_mask_function.<locals>.inner_mask"
_AND = "and_masks.<locals>.and_mask"


def _mask_parts(mask_function, mu, kw):
    """(causal, window, packed sequence ids or None) when ``mask_function`` is one of HF's patterns
    that fused_attn describes without a dense mask, else None:

    * ``bidirectional_mask_function`` / ``causal_mask_function``;
    * ``and_masks`` of one of those with HF's sliding-window overlays
      (``sliding_window_bidirectional_overlay(w)``: |q - kv| <= w, i.e. window (w, w);
      ``sliding_window_overlay(w)``: kv > q - w, i.e. window (w - 1, -1), capped by causal at 0)
      and/or ``packed_sequence_mask_function(ids)`` -- what create_*_mask build.

    Read from the closures.  torch.compile cannot read the closure of a function made inside the
    compiled region, so there only the plain functions are recognised, and the bidirectional window
    by what HF's ``create_bidirectional_sliding_window_mask`` passes alongside it (``local_size``,
    ``allow_is_bidirectional_skip`` and no ``use_vmap``; a test pins that this matches the closure);
    other windows then get the dense mask (exact, not cheap)."""
    if mask_function is mu.causal_mask_function:
        return True, (-1, -1), None
    if mask_function is getattr(mu, "bidirectional_mask_function", _ABSENT):
        return False, (-1, -1), None
    if getattr(mask_function, "__qualname__", "") != _AND:
        return None
    if torch.compiler.is_compiling():
        size = kw.get("local_size")
        if (isinstance(size, int) and size >= 0 and "allow_is_bidirectional_skip" in kw and not kw.get("use_vmap")
                and kw.get("or_mask_function") is None and kw.get("and_mask_function") is None):
            return False, (size, size), None
        return None
    leaves = _and_leaves(mask_function)
    if leaves is None:
        return None
    bases = [f for f in leaves if f is mu.causal_mask_function or f is getattr(mu, "bidirectional_mask_function", _ABSENT)]
    if len(bases) != 1:
        return None
    causal = bases[0] is mu.causal_mask_function
    left = right = -1
    packed = None
    for f in leaves:
        if f is bases[0]:
            continue
        name = getattr(f, "__qualname__", "")
        cells = _closure(f)
        if name in (_BIDIRECTIONAL_WINDOW, _CAUSAL_WINDOW):
            w = cells.get("sliding_window")
            if not isinstance(w, int) or isinstance(w, bool) or w < (0 if name == _BIDIRECTIONAL_WINDOW else 1):
                return None
            lw, rw = (w, w) if name == _BIDIRECTIONAL_WINDOW else (w - 1, -1)
            left = lw if left < 0 else min(left, lw)
            right = rw if right < 0 else (right if rw < 0 else min(right, rw))
        elif name == _PACKED and packed is None:
            packed = cells.get("packed_sequence_mask")
            if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
                return None
        else:
            return None
    return causal, (left, right), packed


def _and_leaves(fn, depth: int = 0):
    """The functions an ``and_masks(...)`` combines, nested ``and_masks`` flattened; None if a
    closure cannot be read."""
    if getattr(fn, "__qualname__", "") != _AND:
        return [fn]
    parts = _closure(fn).get("mask_functions")
    if not isinstance(parts, tuple) or depth > 8:
        return None
    out = []
    for p in parts:
        sub = _and_leaves(p, depth + 1)
        if sub is None:
            return None
        out += sub
    return out


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    except ValueError:           # an empty cell
        return {}


# --------------------------------------------------------------------------------------------
# attention function (AttentionInterface)


def _wants_attentions(module, kwargs) -> bool:
    """Did the caller ask for the attention probabilities (output_attentions)?"""
    if kwargs.get("output_attentions"):
        return True
    # transformers 5.x records them through hooks: the active collector lists what it wants.  Looked
    # up in sys.modules (5.x's modeling code has imported it): torch.compile cannot trace the
    # failing import of older versions, which have no collector (the kwarg decides)
    capturing = sys.modules.get("transformers.utils.output_capturing")
    if capturing is None or not hasattr(capturing, "_active_collector"):
        return False
    collected = capturing._active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _head_mask_vector(head_mask: Optional[torch.Tensor], heads: int):
    """HF's per-layer head mask ([H], [B, H], [1|B, H, 1, 1]) -> fused_attn's [H] / [B, H].
    Returns (vector, ok); ok is False for a mask that varies over queries or keys."""
    if head_mask is None:
        return None, True
    hm = head_mask
    if hm.dim() == 4:
        if hm.shape[2] != 1 or hm.shape[3] != 1:
            return None, False
        hm = hm[:, :, 0, 0]
    if hm.dim() == 2 and hm.shape[0] == 1:
        hm = hm[0]
    if hm.dim() == 1 and hm.shape[0] == 1 and heads != 1:
        hm = hm.expand(heads)
    if hm.dim() == 2 and hm.shape[1] == 1 and heads != 1:
        hm = hm.expand(-1, heads)
    return hm, True


def eager_attention(query, key, value, mask, causal: bool, dropout_p: float, scale: float,
                    head_mask: Optional[torch.Tensor], training: bool, window: Tuple[int, int] = (-1, -1)):
    """fused_attn's semantics (the reference, in fp32) that also returns the probabilities
    ([B, H, Sq, Sk], query's dtype); used when the caller asks for them."""
    B, H, Sq, _ = query.shape
    Sk = key.shape[2]
    if isinstance(mask, FusedMask):
        causal = causal or mask.causal
        mask = mask.resolve(H, Sq, Sk, query.device)
    hm, hm_ok = _head_mask_vector(head_mask, H)
    p = dropout_p if training else 0.0
    extra = {} if window == (-1, -1) else {"window_size": window}
    out, probs = reference.attention(query, key, value, mask, causal, p, scale, hm if hm_ok else None,
                                     return_probs=True, **extra)
    if not hm_ok:        # a head mask that varies over queries or keys: HF multiplies the probabilities
        probs = probs * head_mask.to(probs.dtype)
        out = torch.matmul(probs, _repeat_kv(value, H).to(probs.dtype)).to(query.dtype)
    return out, probs.to(query.dtype)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, heads, S, D] (only for the eager probabilities path's head mask)."""
    kv_heads = t.shape[1]
    if kv_heads == heads:
        return t
    if heads % kv_heads:
        raise ValueError(f"fused_attn: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    return t.repeat_interleave(heads // kv_heads, dim=1)


def _packed_batch(attention_mask, query: torch.Tensor, kwargs):
    """The packed sequences of a flattened batch, as HF's flash-attention path finds them, or None:
    ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments (HF's flash contract: they define the
    sequences, whatever pattern the mask describes besides), position_ids [1, T] that restart (HF's
    detection), or a FusedMask of packed sequence ids.  Never with a padding mask."""
    from ..packing import SeqLens, seqlens_from_position_ids

    fused = isinstance(attention_mask, FusedMask)
    if fused:
        if attention_mask.padding is not None:
            return None
        if attention_mask.packed is not None:
            return attention_mask.seqlens() if attention_mask.packed.shape[1] == query.shape[2] else None
        if attention_mask._dense is not None or (attention_mask._dense_kw or {}).get("attention_mask") is not None:
            return None     # a dense mask that may hold padding: its exact pattern is kept
    elif attention_mask is not None:
        return None
    B, _, Sq, _ = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        return SeqLens(cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32),
                       int(max_q), int(max_k))
    pos = kwargs.get("position_ids")
    if fused and attention_mask.is_dense:       # HF's exact mask of a pattern fused_attn did not read
        return None
    if B != 1 or not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] != 1 or pos.shape[1] != Sq:
        return None
    if fused:            # once per forward pass, not once per layer
        cached = attention_mask._from_positions
        if cached is not None and cached[0] is pos:
            return cached[1]
    restarts = torch.arange(Sq, device=pos.device) + pos.min() != pos
    seqs = seqlens_from_position_ids(pos) if bool(restarts.any()) else None
    if fused:
        attention_mask._from_positions = (pos, seqs)
    return seqs


def _kwarg_window(sliding_window) -> Tuple[int, int]:
    """HF's ``sliding_window`` attention argument -> FlashAttention-2's (left, right), as HF's flash
    path reads it: ``(sliding_window - 1, sliding_window - 1)`` (causal caps right at 0).  ModernBERT
    passes ``config.sliding_window + 1`` = local_attention // 2 + 1: window (w, w), w = local_attention // 2,
    the |q - k| <= w of its mask; Mistral-style causal models pass w: their mask's q - w < k <= q."""
    if sliding_window is None or isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        return (-1, -1)
    if sliding_window < 1:
        raise ValueError(f"fused_attn: sliding_window must be a positive int or None, got {sliding_window}")
    return (sliding_window - 1, sliding_window - 1)


def fused_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, scaling: Optional[float] = None,
                            dropout: float = 0.0, head_mask: Optional[torch.Tensor] = None,
                            is_causal: Optional[bool] = None, **kwargs):
    """HF attention function: query [B, H, Sq, D], key/value [B, Hkv, Sk, D] -> (out [B, Sq, H, D],
    probabilities or None).

    ``attention_mask``: a :class:`FusedMask` (from :func:`fused_attn_mask`), HF's boolean or
    additive 4D masks, a ``ReducedMask`` or None; None means "causal if the module is".  Sliding
    windows: a FusedMask's own window (what HF's mask says, as eager reads it); with any other mask,
    the ``sliding_window`` argument (as HF's flash path reads it; see :func:`_kwarg_window`), which is
    also the window of a packed batch whose mask fused_attn could not read.  Dropout happens in the
    kernel; ``output_attentions`` switches this call to eager math."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fused_attn: the attention argument {name!r} is not supported "
                                      f"(module {type(module).__name__}); use another attn_implementation")
    if type(attention_mask).__name__ == "BlockMask":
        raise TypeError("attention_mask: got a FlexAttention BlockMask; load the model with "
                        "attn_implementation='fused_attn' so HF builds a mask fused_attn reads")
    B, H, Sq, D = query.shape        # key / value may have fewer heads (grouped-query): read in place
    Sk = key.shape[2]
    scale = D ** -0.5 if scaling is None else float(scaling)
    fused = isinstance(attention_mask, FusedMask)
    module_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    kwarg_window = _kwarg_window(kwargs.get("sliding_window"))
    causal, window, mask = False, kwarg_window, attention_mask
    if fused:
        causal = attention_mask.causal
        window = (-1, -1) if attention_mask.is_dense else attention_mask.window    # a dense mask holds it
    elif attention_mask is None:
        causal = module_causal
    hm, hm_ok = _head_mask_vector(head_mask, H)
    training = bool(getattr(module, "training", False))
    p = float(dropout) if training else 0.0
    backend = getattr(module, BACKEND_ATTR, "auto")
    wants_attentions = _wants_attentions(module, kwargs)
    if not wants_attentions and hm is None:
        seqs = _packed_batch(attention_mask, query, kwargs)
        if seqs is not None:        # a flattened batch (DataCollatorWithFlattening): no mask at all
            if fused and attention_mask.is_dense:     # HF's flash contract: the module's causality and window
                causal, window = module_causal, kwarg_window
            q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], D) for t in (query, key, value))
            extra = {} if window == (-1, -1) else {"window_size": window}
            out = varlen_attention(q, k, v, seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.max_seqlen_q,
                                   seqs.max_seqlen_k, dropout_p=p, scale=scale, causal=causal,
                                   backend=backend, **extra)
            return out.view(B, Sq, H, D), None
    if fused:
        mask = attention_mask.resolve(H, Sq, Sk, query.device)
    if wants_attentions or not hm_ok:
        out, probs = eager_attention(query, key, value, mask, causal, p, scale, head_mask, training, window)
        return out.transpose(1, 2).contiguous(), probs
    extra = {} if window == (-1, -1) else {"window_size": window}
    out = fused_attention(query, key, value, attention_mask=mask, causal=causal, dropout_p=p,
                          scale=scale, head_mask=hm, backend=backend, **extra)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# patch(model, backend=...) for models whose attention goes through the interface

#: the attribute fused_attention_forward reads on the calling module ("auto" when absent)
BACKEND_ATTR = "fused_attn_backend"


def calls_interface(module: torch.nn.Module) -> bool:
    """Is ``module`` an attention layer that calls transformers' attention interface (its forward
    names ``ALL_ATTENTION_FUNCTIONS``, as every such layer of transformers 5 does)?  Those are the
    modules HF passes to the attention function as ``module``."""
    fwd = getattr(type(module), "forward", None)
    code = getattr(inspect.unwrap(fwd), "__code__", None) if fwd is not None else None
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def set_backend(model: torch.nn.Module, backend: str) -> int:
    """Make every interface attention layer of ``model`` call fused_attn with ``backend`` (what
    ``patch(model, backend=...)`` chose; "auto" removes the setting).  Returns how many layers."""
    n = 0
    for m in model.modules():
        if calls_interface(m):
            if backend == "auto":
                m.__dict__.pop(BACKEND_ATTR, None)
            else:
                m.__dict__[BACKEND_ATTR] = backend
            n += 1
    return n


def clear_backend(model: torch.nn.Module) -> None:
    """Undo :func:`set_backend` (unpatch)."""
    for m in model.modules():
        if calls_interface(m):
            m.__dict__.pop(BACKEND_ATTR, None)


# --------------------------------------------------------------------------------------------


def register(name: str = NAME) -> str:
    """Make ``attn_implementation="fused_attn"`` available in transformers (AttentionInterface and
    AttentionMaskInterface; both are needed: without the mask function HF passes no padding mask
    to a custom implementation).  Idempotent; returns the name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise RuntimeError("fused_attn.register() needs transformers with AttentionInterface and "
                           "AttentionMaskInterface (>= 4.53); with older versions use fused_attn.patch(model)"
                           ) from e
    AttentionInterface.register(name, fused_attention_forward)
    AttentionMaskInterface.register(name, fused_attn_mask)
    _REGISTERED.add(name)
    _install_bypass_warning()
    return name


_REGISTERED = set()
_WARNED = set()


def uses_attention_interface(model_or_class) -> bool:
    """Does this Hugging Face model class call transformers' attention interface (so that
    ``attn_implementation="fused_attn"`` reaches fused_attn)?  transformers' own test
    (``_can_set_attn_implementation``: its modeling file has an attention module that calls
    ``ALL_ATTENTION_FUNCTIONS``); True where transformers has no such test."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    test = getattr(cls, "_can_set_attn_implementation", None)
    if test is None:
        return True
    try:
        return bool(test())
    except Exception:          # a class whose source cannot be read: transformers says False itself
        return False


def warn_if_bypassed(model_or_class, implementation: str = NAME) -> bool:
    """Warn (once per modeling module) when a model accepts ``attn_implementation=implementation``
    but its attention layers never call the interface, so nothing fused runs (DeBERTa-v2 in
    transformers 5.18, ModernBERT in 4.57).  Returns True when it is such a model."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if uses_attention_interface(cls):
        return False
    if cls.__module__ not in _WARNED:
        _WARNED.add(cls.__module__)
        import warnings
        warnings.warn(f"fused_attn: {cls.__name__} accepts attn_implementation={implementation!r} but its attention "
                      f"layers do not call transformers' attention interface, so fused_attn never runs in it (it "
                      f"keeps its own attention code). {_instead(cls)}", stacklevel=4)
    return True


def _instead(cls: type) -> str:
    """What to call instead, in the bypass warning.  DeBERTa-v2/v3: transformers has no hook at model
    init that could swap its attention classes (its layers are not hub-kernel layers either), so
    fused_attn does not re-class a model behind from_pretrained's back; patch() is the route."""
    if cls.__module__.rsplit(".", 1)[-1] == "modeling_deberta_v2":
        return ("fused_attn fuses DeBERTa-v2/v3 through patch(): load the model as usual, then call "
                "fused_attn.patch(model) (padded) or fused_attn.patch(model, padding_free=True); "
                "attn_implementation does not matter to it.")
    return ("Use fused_attn.patch(model) if fused_attn supports this family (docs/huggingface.md, the routes "
            "table), or another attn_implementation.")


def _install_bypass_warning() -> None:
    """Wrap ``PreTrainedModel.get_correct_attn_implementation`` (what transformers calls when a model
    is built or switched with an attn_implementation) so that choosing a registered fused_attn name
    for a model that never calls the interface warns (:func:`warn_if_bypassed`).  Installed once by
    :func:`register`; the result is transformers' own, unchanged."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    orig = getattr(PreTrainedModel, "get_correct_attn_implementation", None)
    if orig is None or getattr(orig, "_fused_attn_wrapped", False):
        return

    def get_correct_attn_implementation(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if isinstance(out, str) and out in _REGISTERED:
            warn_if_bypassed(self, out)
        return out

    get_correct_attn_implementation._fused_attn_wrapped = True
    get_correct_attn_implementation.__wrapped__ = orig
    get_correct_attn_implementation.__doc__ = orig.__doc__
    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation
