"""Hugging Face glue shared by FusedBertSelfAttention and ``attn_implementation="fused_attn"``:

* :func:`fused_attention_forward` -- HF's attention-function contract
  ``(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> (out, weights)``
  with ``out`` [B, Sq, H, D];  runs ``fused_attn.attention`` (or eager math when the caller asked
  for the attention probabilities, which the fused kernel never forms).
* :func:`fused_attn_mask` -- HF's mask-function contract (``AttentionMaskInterface``).  Instead of a
  dense [B, 1, Sq, Sk] tensor it returns a :class:`FusedMask`: the key-padding mask plus a causal
  flag, reduced to a ``fused_attn.ReducedMask`` once, by the first layer that uses it, and reused
  by every other layer of the forward pass (and by the backward pass).
* :func:`register` -- adds both under the name "fused_attn".

Imports transformers lazily: importing this module does not import it.
"""
from __future__ import annotations

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

    Holds the key padding ([B, Sk] bool, True = real token; None = no padding) and a causal flag
    (bottom-right aligned), or, for patterns it does not describe that way (sliding windows,
    packed sequences, custom mask functions), HF's own dense boolean mask.  ``resolve`` reduces it
    for one (heads, Sq, Sk) once and caches the ``ReducedMask`` on this object.
    """

    __slots__ = ("batch", "q_len", "k_len", "padding", "_dense", "_dense_kw", "causal", "packed", "_reduced",
                 "_seqlens", "_from_positions")

    def __init__(self, batch: int, q_len: int, k_len: int, padding: Optional[torch.Tensor] = None,
                 dense: Optional[torch.Tensor] = None, causal: bool = False,
                 packed: Optional[torch.Tensor] = None, dense_kw: Optional[dict] = None):
        self.batch, self.q_len, self.k_len = batch, q_len, k_len
        self.padding, self._dense, self.causal = padding, dense, causal
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
        return (f"FusedMask(B={self.batch}, Sq={self.q_len}, Sk={self.k_len}, {what}, "
                f"causal={self.causal})")


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
    for the padding and causal patterns.  Other patterns get HF's own boolean mask inside."""
    from transformers import masking_utils as mu

    batch = kw["batch_size"]
    kv_length = kw["kv_length"]
    kv_offset = kw.get("kv_offset", 0) or 0
    mask_function = kw.get("mask_function")
    attention_mask = kw.get("attention_mask")
    q_length = kw.get("q_length")
    q_offset = kw.get("q_offset", 0)
    if q_length is None and kw.get("cache_position") is not None:    # transformers 4.5x protocol
        q_length, q_offset = kw["cache_position"].shape[0], None

    plain_ints = isinstance(kv_offset, int) and (q_offset is None or isinstance(q_offset, int))
    if plain_ints and attention_mask is not None and attention_mask.dim() != 2:
        plain_ints = False
    if plain_ints and mask_function is getattr(mu, "bidirectional_mask_function", _ABSENT):
        return FusedMask(batch, q_length, kv_length, padding=_key_padding(attention_mask, kv_length, kv_offset))
    if (plain_ints and mask_function is mu.causal_mask_function and q_offset is not None
            and q_offset + q_length == kv_offset + kv_length):       # bottom-right aligned causal
        return FusedMask(batch, q_length, kv_length, padding=_key_padding(attention_mask, kv_length, kv_offset),
                         causal=True)
    packed = _packed_sequence_ids(mask_function, mu)
    if (plain_ints and packed is not None and q_offset == 0 and kv_offset == 0 and q_length == kv_length
            and (attention_mask is None or attention_mask.dim() == 2)):
        base, ids = packed          # HF found packed sequences in position_ids (a flattened batch)
        return FusedMask(batch, q_length, kv_length, padding=_key_padding(attention_mask, kv_length, kv_offset),
                         causal=base is mu.causal_mask_function, packed=ids)
    # anything else (sliding windows, custom mask functions, static caches): HF's exact boolean
    # mask, built when a layer first needs it and reduced to a block map once like any other mask
    if q_length is None:
        dense = mu.sdpa_mask(**{**kw, "allow_is_causal_skip": False})
        return None if dense is None else FusedMask(batch, dense.shape[-2], dense.shape[-1], dense=dense)
    return FusedMask(batch, q_length, kv_length, dense_kw={**kw, "allow_is_causal_skip": False,
                                                           "allow_is_bidirectional_skip": False})


def _packed_sequence_ids(mask_function, mu):
    """(base mask function, [B, S] sequence ids) when ``mask_function`` is HF's
    ``and_masks(causal_mask_function or bidirectional_mask_function,
    packed_sequence_mask_function(ids))`` -- what create_causal_mask builds for a flattened batch --
    else None.  Read from the closures, so anything else falls back to the exact dense mask."""
    cells = _closure(mask_function) if getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask" else {}
    parts = cells.get("mask_functions")
    bases = (mu.causal_mask_function, getattr(mu, "bidirectional_mask_function", None))
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[0] not in bases:
        return None
    inner = parts[1]
    if getattr(inner, "__qualname__", "") != "packed_sequence_mask_function.<locals>.inner_mask":
        return None
    ids = _closure(inner).get("packed_sequence_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    return parts[0], ids


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
                    head_mask: Optional[torch.Tensor], training: bool):
    """fused_attn's semantics (the reference, in fp32) that also returns the probabilities
    ([B, H, Sq, Sk], query's dtype); used when the caller asks for them."""
    B, H, Sq, _ = query.shape
    Sk = key.shape[2]
    if isinstance(mask, FusedMask):
        causal = causal or mask.causal
        mask = mask.resolve(H, Sq, Sk, query.device)
    hm, hm_ok = _head_mask_vector(head_mask, H)
    p = dropout_p if training else 0.0
    out, probs = reference.attention(query, key, value, mask, causal, p, scale, hm if hm_ok else None,
                                     return_probs=True)
    if not hm_ok:        # a head mask that varies over queries or keys: HF multiplies the probabilities
        probs = probs * head_mask.to(probs.dtype)
        out = torch.matmul(probs, value.to(probs.dtype)).to(query.dtype)
    return out, probs.to(query.dtype)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    kv_heads = t.shape[1]
    if kv_heads == heads:
        return t
    if heads % kv_heads:
        raise ValueError(f"fused_attn: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    return t.repeat_interleave(heads // kv_heads, dim=1)


def _packed_batch(attention_mask, query: torch.Tensor, kwargs):
    """The packed sequences of a flattened batch, as HF's flash-attention path finds them, or None:
    ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments, position_ids [1, T] that restart
    (HF's detection), or a FusedMask of packed sequence ids.  Never with a padding mask."""
    from ..packing import SeqLens, seqlens_from_position_ids

    if isinstance(attention_mask, FusedMask):
        if attention_mask.padding is not None or attention_mask._dense is not None or attention_mask._dense_kw:
            return None
        if attention_mask.packed is not None:
            return attention_mask.seqlens() if attention_mask.packed.shape[1] == query.shape[2] else None
    elif attention_mask is not None:
        return None
    B, _, Sq, _ = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        return SeqLens(cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32),
                       int(max_q), int(max_k))
    pos = kwargs.get("position_ids")
    if B != 1 or not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] != 1 or pos.shape[1] != Sq:
        return None
    if isinstance(attention_mask, FusedMask):            # once per forward pass, not once per layer
        cached = attention_mask._from_positions
        if cached is not None and cached[0] is pos:
            return cached[1]
    restarts = torch.arange(Sq, device=pos.device) + pos.min() != pos
    seqs = seqlens_from_position_ids(pos) if bool(restarts.any()) else None
    if isinstance(attention_mask, FusedMask):
        attention_mask._from_positions = (pos, seqs)
    return seqs


def fused_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, scaling: Optional[float] = None,
                            dropout: float = 0.0, head_mask: Optional[torch.Tensor] = None,
                            is_causal: Optional[bool] = None, **kwargs):
    """HF attention function: query [B, H, Sq, D], key/value [B, Hkv, Sk, D] -> (out [B, Sq, H, D],
    probabilities or None).

    ``attention_mask``: a :class:`FusedMask` (from :func:`fused_attn_mask`), HF's boolean or
    additive 4D masks, a ``ReducedMask`` or None; None means "causal if the module is".  Dropout
    happens in the kernel; ``output_attentions`` switches this call to eager math."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fused_attn: the attention argument {name!r} is not supported "
                                      f"(module {type(module).__name__}); use another attn_implementation")
    if type(attention_mask).__name__ == "BlockMask":
        raise TypeError("attention_mask: got a FlexAttention BlockMask; load the model with "
                        "attn_implementation='fused_attn' so HF builds a mask fused_attn reads")
    heads = query.shape[1]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    B, H, Sq, D = query.shape
    Sk = key.shape[2]
    scale = D ** -0.5 if scaling is None else float(scaling)
    causal = False
    mask = attention_mask
    if isinstance(attention_mask, FusedMask):
        causal = attention_mask.causal
        mask = attention_mask.resolve(H, Sq, Sk, query.device)
    elif attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    hm, hm_ok = _head_mask_vector(head_mask, H)
    training = bool(getattr(module, "training", False))
    p = float(dropout) if training else 0.0
    wants_attentions = _wants_attentions(module, kwargs)
    if not wants_attentions and hm is None:
        seqs = _packed_batch(attention_mask, query, kwargs)
        if seqs is not None:        # a flattened batch (DataCollatorWithFlattening): no mask at all
            if isinstance(attention_mask, FusedMask):
                causal = attention_mask.causal
            elif attention_mask is None:
                causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
            q, k, v = (t.transpose(1, 2).reshape(-1, H, D) for t in (query, key, value))
            out = varlen_attention(q, k, v, seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.max_seqlen_q,
                                   seqs.max_seqlen_k, dropout_p=p, scale=scale, causal=causal,
                                   backend=getattr(module, "fused_attn_backend", "auto"))
            return out.view(B, Sq, H, D), None
    if wants_attentions or not hm_ok:
        out, probs = eager_attention(query, key, value, mask, causal, p, scale, head_mask, training)
        return out.transpose(1, 2).contiguous(), probs
    out = fused_attention(query, key, value, attention_mask=mask, causal=causal, dropout_p=p,
                          scale=scale, head_mask=hm, backend=getattr(module, "fused_attn_backend", "auto"))
    return out.transpose(1, 2).contiguous(), None


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
    return name
