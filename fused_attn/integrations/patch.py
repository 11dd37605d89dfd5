"""patch(model) / unpatch(model) / patched(model): swap every BertSelfAttention-like module of a
loaded Hugging Face model for FusedBertSelfAttention, and back.

A module qualifies by structure, not by class name: query / key / value ``nn.Linear`` and a
``dropout``, nothing else, ``num_attention_heads`` x ``attention_head_size`` == the projections'
width, absolute positions only, and a forward whose arguments are among BertSelfAttention's.
That covers BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, Data2VecText, ERNIE, ... which share its
code.  Weights, buffers, hooks, device, dtype and train/eval state are shared with the original
module (nothing is copied), so patching is cheap, idempotent and reversible.

Masks: in transformers 4.x the "sdpa" models build a dense [B, 1, S, S] mask; patch switches
their mask preparation to the eager [B, 1, 1, S] key-padding form (cheapest for fused_attn).  In
transformers 5.x patch also selects ``attn_implementation="fused_attn"`` so HF's mask function
hands every layer one reduced mask (and cross-attention layers use fused_attn too).  unpatch
restores both.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import List, Tuple

from torch import nn

from . import deberta, hf_attention, packed_interface
from . import padding_free as pf
from .bert import (TRANSFORMERS_5, FusedBertSelfAttention, _forward_params, _rebuild,  # noqa: F401
                   fused_class_for, is_bert_self_attention_like, swap, unswap)

_STATE = "_fused_attn_patch_state"


def _hf_models(model: nn.Module) -> List[nn.Module]:
    """The outermost modules of ``model`` that can switch attn_implementation (``model`` itself for
    a Hugging Face model; the wrapped model of a SentenceTransformer, ...)."""
    if hasattr(model, "set_attn_implementation"):
        return [model]
    found: List[nn.Module] = []
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and not any(
                m is not f and any(s is m for s in f.modules()) for f in found):
            found.append(m)
    return found


def _check_patch_args(model, backend) -> None:
    """patch's own mistakes, said at patch time rather than at the first forward (or never)."""
    if not isinstance(model, nn.Module):
        hint = (f" (a model name? load it first: AutoModel.from_pretrained({model!r}))" if isinstance(model, str)
                else "")
        raise TypeError(f"model: expected a torch.nn.Module (a loaded Hugging Face model, or one that contains it), "
                        f"got {type(model).__name__}{hint}")
    from ..backends import names
    if backend not in ("auto",) + tuple(names()):
        raise ValueError(f"backend: {backend!r} is not one of 'auto', " + ", ".join(repr(n) for n in names()))


def patch(model: nn.Module, backend: str = "auto", padding_free: bool = False) -> nn.Module:
    """Replace every BertSelfAttention-like module of ``model`` by its fused version, in place.

    ``backend`` is passed to ``fused_attn.attention`` / ``varlen_attention`` ("auto" honours
    FUSED_ATTN_BACKEND), by the swapped modules and by every layer that reaches fused_attn through
    transformers' attention interface (their ``fused_attn_backend`` attribute).
    ``padding_free=True`` also makes every BERT-family encoder run on packed tokens (the real
    tokens only, ``fused_attn.varlen_attention``; outputs zero at padding): see
    fused_attn/integrations/padding_free.py.  ``model`` may be a Hugging Face model or anything that
    contains one (e.g. a SentenceTransformer).  With transformers 5, a model with no such module whose
    attention goes through transformers' attention interface (ModernBERT, GTE, NomicBERT, Jina v3,
    EuroBERT, Llama, ...) is switched to ``attn_implementation="fused_attn"`` instead, with a warning
    that says so (unpatch switches it back).
    Idempotent (already fused modules are kept, their backend updated); returns ``model``.
    """
    _check_patch_args(model, backend)
    state = model.__dict__.get(_STATE) or {"attn_impl": [], "mask_attrs": []}
    swapped = swap(model, FusedBertSelfAttention, is_bert_self_attention_like, fused_class_for, backend)
    bert_swapped = swapped
    if padding_free:
        swapped += pf.enable(model, backend) + packed_interface.enable(model, backend)
    # DeBERTa-v2/v3: its own attention and encoder (rel_bias)
    swapped += deberta.enable(model, backend, padding_free)
    if swapped == 0 and _STATE not in model.__dict__:
        if padding_free and packed_interface.warn_modernbert_4x(model):     # its own (only) warning
            return model
        if TRANSFORMERS_5 and _switch_to_interface(model, state):
            hf_attention.set_backend(model, backend)
            if padding_free:
                warnings.warn(f"fused_attn.patch: padding_free=True does not cover {type(model).__name__} (families that "
                              "run on packed tokens: fused_attn.integrations.packed_interface.FAMILIES); it runs on "
                              "the padded batch", stacklevel=2)
            return model
        warnings.warn(f"fused_attn.patch: no BertSelfAttention-like module{' or BERT-family encoder' if padding_free else ''} "
                      f"in {type(model).__name__}; nothing was changed{_interface_hint(model)}", stacklevel=2)
        return model
    if not TRANSFORMERS_5:
        # 4.x "sdpa" models expand the padding mask to a dense [B, 1, S, S]; the eager form
        # [B, 1, 1, S] says the same thing and reduces to per-row key ranges
        for m in model.modules():
            if getattr(m, "attn_implementation", None) == "sdpa" and hasattr(m, "get_extended_attention_mask") \
                    and not any(m is x for x in state["mask_attrs"]):
                state["mask_attrs"].append(m)
                m.attn_implementation = "eager"
    elif (bert_swapped or any(isinstance(m, FusedBertSelfAttention) for m in model.modules())
          or pf.is_padding_free(model) or packed_interface.is_packed(model)):
        # (a DeBERTa-only model keeps its attn_implementation)
        done = {id(m) for m, _ in state["attn_impl"]}
        for m in _hf_models(model):
            previous = m.config._attn_implementation
            if id(m) in done or previous == "fused_attn":
                continue
            from .hf_attention import register
            register()
            m.set_attn_implementation("fused_attn")
            if m.config._attn_implementation == "fused_attn":
                state["attn_impl"].append((m, previous))
    if TRANSFORMERS_5:       # the layers that call fused_attn through the interface use the same backend
        hf_attention.set_backend(model, backend)
    model.__dict__[_STATE] = state
    return model


def _switch_to_interface(model: nn.Module, state: dict) -> bool:
    """transformers 5: a model with no module to swap whose attention goes through transformers'
    attention interface (ModernBERT, GTE, NomicBERT, Jina v3, EuroBERT, Llama, ...) is switched to
    ``attn_implementation="fused_attn"`` (register() + set_attn_implementation), with a warning that
    says so; unpatch restores the previous implementation.  False when no part of ``model`` can."""
    from .hf_attention import NAME, register, uses_attention_interface

    models = [m for m in _hf_models(model) if uses_attention_interface(m)]
    if not models:
        return False
    register()
    switched = []
    for m in models:
        previous = m.config._attn_implementation
        if previous == NAME:
            continue
        m.set_attn_implementation(NAME)
        if m.config._attn_implementation == NAME:
            state["attn_impl"].append((m, previous))
            switched.append(f"{type(m).__name__} (was {previous!r})")
    if not switched:
        return False
    model.__dict__[_STATE] = state
    warnings.warn(f"fused_attn.patch: {type(model).__name__} has no BertSelfAttention-like module to swap, but its "
                  f"attention goes through transformers' attention interface: switched {', '.join(switched)} to "
                  f"attn_implementation={NAME!r}, as fused_attn.register() + model.set_attn_implementation({NAME!r}) "
                  f"would; fused_attn.unpatch(model) switches back", stacklevel=3)
    return True


def _interface_hint(model: nn.Module) -> str:
    """What to try instead, for patch()'s "nothing was changed" warning."""
    from .hf_attention import uses_attention_interface
    models = _hf_models(model)
    if models and not any(uses_attention_interface(m) for m in models):
        return (f" ({type(models[0]).__name__} does not call transformers' attention interface either, so "
                f"attn_implementation='fused_attn' would not change it)")
    return ("; if its attention goes through transformers' attention interface, fused_attn.register() and "
            "attn_implementation='fused_attn' run fused_attn there")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original module classes (same weights), encoders, hooks, mask form and
    attn_implementation.  A no-op on a model that is not patched; returns ``model``."""
    pf.disable(model)
    packed_interface.disable(model)
    hf_attention.clear_backend(model)
    deberta.disable(model)
    unswap(model, FusedBertSelfAttention)
    # the state patch() left on model or on any module inside it (patch(st[0].auto_model), then
    # unpatch(st) restores the attn_implementation too)
    for holder in list(model.modules()):
        state = holder.__dict__.pop(_STATE, None)
        if state:
            for m in state["mask_attrs"]:
                m.attn_implementation = "sdpa"
            for m, previous in reversed(state["attn_impl"]):
                m.set_attn_implementation(previous)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, backend: str = "auto", padding_free: bool = False):
    """``with fused_attn.patched(model): ...`` -- patched inside the block, restored after (a model
    that was already patched before the block stays patched)."""
    _check_patch_args(model, backend)
    already = is_patched(model)
    patch(model, backend=backend, padding_free=padding_free)
    try:
        yield model
    finally:
        if not already:
            unpatch(model)


def is_patched(model: nn.Module) -> bool:
    return (any(isinstance(m, FusedBertSelfAttention) for m in model.modules()) or pf.is_padding_free(model)
            or packed_interface.is_packed(model) or deberta.is_patched(model)
            or bool((model.__dict__.get(_STATE) or {}).get("attn_impl")))


def fused_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every fused attention module in ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (FusedBertSelfAttention, deberta.FusedDisentangledSelfAttention))]


__all__ = ["patch", "unpatch", "patched", "is_patched", "fused_modules", "fused_class_for",
           "is_bert_self_attention_like"]
