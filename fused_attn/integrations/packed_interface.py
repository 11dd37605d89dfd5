"""``patch(model, padding_free=True)`` for models whose attention goes through transformers'
attention interface (transformers 5): ModernBERT, GTE, NomicBERT, Jina embeddings v3, EuroBERT.

One mechanism for every such family, no layout per family: the base model runs on packed tokens.
Its forward gets an instance wrapper (:class:`PackedForward`) that, for a call with a 2D padding
mask,

* gathers every per-token input (``input_ids``, ``token_type_ids``, ``position_ids``,
  ``inputs_embeds``: whatever is [B, S, ...]) to one row of real tokens, [1, T, ...];
* keeps HF's positions: ``position_ids`` are those of the call (by default the column index, as HF
  computes them), gathered at the real tokens -- so with right padding they restart at 0 for each
  sequence, and with left padding they are what HF's padded forward uses (a RoPE model sees the
  same relative positions either way);
* calls the model's own forward with ``attention_mask=None`` and HF's flash-style keyword
  arguments ``cu_seq_lens_q/k`` and ``max_length_q/k``, which the model hands to every attention
  call and which ``attn_implementation="fused_attn"`` routes to ``varlen_attention`` (local layers:
  the window per sequence);
* scatters the per-token outputs back to [B, S, ...] with zeros at padding (``last_hidden_state``
  and each of ``hidden_states``), and re-runs a ``pooler`` submodule on the scattered output (the
  pooler inside the base model saw packed tokens, whose first token is only sequence 0's).

A family qualifies (:func:`qualifies`) when all of these hold: transformers 5; its base model class
is in :data:`FAMILIES` (a family is listed once a test shows packed == eager on real tokens,
outputs and gradients: the list is what was checked, not a guess from structure); the model
declares ``_supports_flash_attn`` (it passes the flash keyword arguments through to every
attention call, as HF's own DataCollatorWithFlattening relies on); its forward takes
``attention_mask`` and ``**kwargs``; and it is not a decoder.  To add a family: add the base model's
class name to FAMILIES and its tiny config to tests/test_padding_free_interface.py.

What a call needs that packed tokens cannot give runs the padded path, with one warning per model
and reason: output_attentions, caches, a mask that is not [B, S] 0/1, an attn_implementation other
than fused_attn (sdpa and eager ignore the sequence boundaries).  Calls without a padding mask run
unchanged (there is nothing to remove).  Padding holes inside a row (0s between 1s) are packed too:
a local (sliding-window) layer then measures the window in real tokens, HF in columns.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..packing import Unpadded, gather_tokens, scatter_tokens, unpad_info
from . import instance_forward

#: base model classes (by name, defined under transformers.models) checked against eager on packed tokens
FAMILIES = ("ModernBertModel", "GteModel", "NomicBertModel", "JinaEmbeddingsV3Model", "EuroBertModel")

_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _transformers_5() -> bool:
    from .bert import TRANSFORMERS_5
    return TRANSFORMERS_5


def family_of(module: nn.Module) -> Optional[str]:
    """The FAMILIES entry ``module`` is (or subclasses), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in FAMILIES and cls.__module__.startswith("transformers.models."):
            return cls.__name__
    return None


def _is_modernbert_4x(module: nn.Module) -> bool:
    return (not _transformers_5() and any(c.__name__ == "ModernBertModel" and c.__module__.startswith("transformers.")
                                          for c in type(module).__mro__))


def qualifies(module: nn.Module) -> bool:
    """Can ``module`` (a base model) run padding-free through the attention interface?  See the
    module docstring."""
    if not _transformers_5() or family_of(module) is None:
        return False
    if not getattr(module, "_supports_flash_attn", False):
        return False
    cfg = getattr(module, "config", None)
    if cfg is None or getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    params = inspect.signature(type(module).forward).parameters
    return "attention_mask" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())


def warn_modernbert_4x(model: nn.Module) -> bool:
    """transformers 4.x ModernBERT: not covered (its sdpa / eager classes pad; its flash_attention_2
    path unpads the whole model by itself).  Warns (patch's only warning for it); True if ``model``
    holds one."""
    found = [m for m in model.modules() if _is_modernbert_4x(m)]
    if found:
        warnings.warn("fused_attn padding_free: ModernBERT on transformers 4.x is not made padding-free (it needs "
                      "transformers >= 5, whose ModernBERT calls the attention interface; on 4.x, "
                      "attn_implementation='flash_attention_2' on a GPU unpads the model itself). The model runs "
                      "padded.", stacklevel=3)
    return bool(found)


# --------------------------------------------------------------------------------------------
# the wrapper


def _collector_wants_attentions() -> bool:
    from .padding_free import _collector
    c = _collector()
    return bool(c) and ("attentions" in c or "cross_attentions" in c)


def _has_holes(real: torch.Tensor) -> bool:
    """Does a row of the [B, S] bool mask have a 0 between two 1s?  (One host sync.)"""
    S = real.shape[1]
    n = real.sum(dim=1)
    first = real.int().argmax(dim=1)
    last = S - 1 - real.flip(1).int().argmax(dim=1)
    return bool(((last - first + 1 != n) & (n > 0)).any())


class PackedForward:
    """The base model's ``forward`` while padding-free: pack, call ``previous``, unpack."""

    __slots__ = ("module", "previous", "backend", "active", "__weakref__")

    def __init__(self, module: nn.Module, previous, backend: str):
        self.module, self.previous, self.backend = module, previous, backend
        self.active = True                  # False once disable() took it away (unpatch)

    def _original(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def _windowed(self) -> bool:
        """Has the model local (sliding-window) attention layers?"""
        return any(getattr(m, "sliding_window", None) for m in self.module.modules())

    def _bind(self, args, kwargs) -> Dict[str, Any]:
        sig = inspect.signature(type(self.module).forward)
        try:
            bound = sig.bind(self.module, *args, **kwargs).arguments
        except TypeError:
            return {}
        out = dict(bound)
        out.pop("self", None)
        for name, p in sig.parameters.items():
            if p.kind is p.VAR_KEYWORD and name in out:
                out.update(out.pop(name))
        return out

    def _reason(self, a: Dict[str, Any]) -> Optional[str]:
        """Why this call runs unchanged ('' = silently), or None to pack it."""
        mask = a.get("attention_mask")
        if any(a.get(k) is not None for k in _FLASH_KWARGS):
            return ""                                   # already packed by the caller
        if mask is None:
            return ""
        ids = a.get("input_ids")
        ref = ids if isinstance(ids, torch.Tensor) else a.get("inputs_embeds")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return "an attention_mask that is not the 2D padding mask [B, S]"
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2 or tuple(ref.shape[:2]) != tuple(mask.shape):
            return f"an attention_mask of shape {list(mask.shape)} for inputs of another shape"
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            return "a floating-point attention_mask with values other than 0 and 1"
        cfg = self.module.config
        if cfg._attn_implementation != "fused_attn":
            return f"attn_implementation={cfg._attn_implementation!r} (only 'fused_attn' reads the sequence boundaries)"
        if a.get("output_attentions") or getattr(cfg, "output_attentions", False) or _collector_wants_attentions():
            return "output_attentions"
        if a.get("past_key_values") is not None or a.get("use_cache"):
            return "past key values / use_cache"
        B, S = mask.shape
        for name, v in a.items():
            if name in ("attention_mask", "input_ids", "inputs_embeds", "token_type_ids", "position_ids"):
                continue
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                return f"the tensor argument {name!r} (not known to be per token)"
        return None

    def __call__(self, *args, **kwargs):
        original = self._original()
        a = self._bind(args, kwargs)
        why = self._reason(a) if a else ""
        if why is not None:
            if why:
                self._warn(why)
            return original(*args, **kwargs)
        return self._packed(original, a)

    def _warn(self, why: str) -> None:
        warned = self.module.__dict__.setdefault("_fused_pf_warned", set())
        if why not in warned:
            warned.add(why)
            warnings.warn(f"fused_attn padding_free: {type(self.module).__name__} cannot run {why} on packed tokens; "
                          "that call runs the padded path. Said once per model and reason.", stacklevel=3)

    def _packed(self, original, a: Dict[str, Any]):
        mask = a["attention_mask"]
        real = mask if mask.dtype == torch.bool else mask != 0
        ids, embeds = a.get("input_ids"), a.get("inputs_embeds")
        ref = ids if isinstance(ids, torch.Tensor) else embeds
        B, S = real.shape
        real = real.to(ref.device)
        if self._windowed() and _has_holes(real):
            self._warn("a padding mask with holes (0s between real tokens) on a model with sliding-window layers "
                       "(the window would count real tokens, HF's counts columns)")
            return original(**a)
        un = unpad_info(real)
        pos = a.get("position_ids")
        if pos is None:
            pos = torch.arange(S, device=ref.device).unsqueeze(0)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        a["position_ids"] = pos.expand(B, S)
        for name in ("input_ids", "inputs_embeds", "token_type_ids", "position_ids"):
            v = a.get(name)
            if isinstance(v, torch.Tensor):
                if v.shape[0] == 1 and B != 1:
                    v = v.expand(B, *v.shape[1:])
                a[name] = gather_tokens(v, un).unsqueeze(0)
        s = un.seqs
        a.update(attention_mask=None, cu_seq_lens_q=s.cu_seqlens_q, cu_seq_lens_k=s.cu_seqlens_k,
                 max_length_q=s.max_seqlen_q, max_length_k=s.max_seqlen_k)
        out = original(**a)
        if not self.active:
            # unpatch() ran while this call was in flight: the layers after it ran attn_implementation's
            # previous function (sdpa, eager), which ignores cu_seq_lens and attends across sequences
            raise RuntimeError(f"fused_attn padding_free: {type(self.module).__name__} was unpatched while this "
                               "call was in flight (its packed tokens may have met another attention); "
                               "patch and unpatch between calls")
        return self._unpack(out, un)

    def _unpack(self, out, un: Unpadded):
        T = un.tokens

        def back(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == T:
                return scatter_tokens(v[0], un)
            if isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) or t is None for t in v):
                return tuple(back(t) for t in v)
            return v

        pooler = self.module._modules.get("pooler")
        if isinstance(out, tuple):
            vals = [back(v) for v in out]
            if pooler is not None and len(vals) > 1 and isinstance(vals[1], torch.Tensor):
                vals[1] = pooler(vals[0])
            return type(out)(vals)
        for key in list(out.keys()):
            out[key] = back(out[key])
        if pooler is not None and out.get("pooler_output") is not None:
            out["pooler_output"] = pooler(out["last_hidden_state"])
        return out


# --------------------------------------------------------------------------------------------
# enable / disable


def base_models(model: nn.Module):
    return [m for m in model.modules() if qualifies(m)]


def enable(model: nn.Module, backend: str = "auto") -> int:
    """Make every qualifying base model inside ``model`` padding-free; returns how many."""
    n = 0
    for base in base_models(model):
        slot = instance_forward.call_slot(base)
        current = base.__dict__.get(slot)
        if isinstance(current, PackedForward):
            current.backend = backend
            continue
        base.__dict__[slot] = PackedForward(base, current, backend)
        n += 1
    return n


def disable(model: nn.Module) -> None:
    for m in model.modules():
        for slot in ("forward", instance_forward.OLD_FORWARD):
            fwd = m.__dict__.get(slot)
            if isinstance(fwd, PackedForward):
                fwd.active = False
                if fwd.previous is not None:
                    m.__dict__[slot] = fwd.previous
                else:
                    del m.__dict__[slot]
                m.__dict__.pop("_fused_pf_warned", None)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m.__dict__.get(s), PackedForward) for m in model.modules()
               for s in ("forward", instance_forward.OLD_FORWARD))
