"""``patch(model, padding_free=True)``: BERT-family encoders that never compute padding.

The embeddings run on the padded batch as before (position ids unchanged).  The encoder then
gathers the real tokens once ([1, T, hidden], T = number of real tokens, from the tokenizer's 2D
attention_mask), runs every layer on them -- the linears, LayerNorms, GELU and dropouts are HF's own
submodules, attention is ``fused_attn.varlen_attention`` -- and scatters the result back once to
[B, S, hidden] with zeros at padding.  Poolers and heads see the shapes they saw before.

How it is wired (all of it undone by ``unpatch``):

* the encoder (``.encoder`` of BertModel-like models, ``.transformer`` of DistilBertModel) gets a
  subclass of its own class whose ``forward`` runs the packed path, or the original forward when it
  cannot serve the call (see ``_fallback_reason``: output_attentions, head_mask, decoders,
  cross-attention, caches, relative positions, a 3D/4D mask, accelerate hooks that matter on the
  attention blocks the packed layer does not call) -- with a one-time warning; a class swap keeps
  an accelerate hook on the encoder wrapping the right forward (instance_forward.py);
* the base model (the module owning ``.embeddings`` and the encoder) gets a forward pre-hook that
  binds the call's arguments and pushes the 2D attention_mask (and the flags above) onto a
  ``contextvars`` stack, and a forward hook (always called) that pops it: each thread / async
  context sees only its own calls, nested models their own entries;
* every layer is called as a module on the packed tokens, so its hooks run (FSDP2's per-layer
  sharding, checkpoint wrappers, HF's gradient checkpointing, accelerate's hooks): see
  packed_layers.py.  HF 5's output-capturing hooks on the layers are muted during the packed loop;
  the encoder records the hidden states itself, padded.

Layers qualify by structure and code, not by class name: a BertLayer-like layer has exactly the
submodules attention (self + output), intermediate and output, and runs BertLayer's and
BertAttention's code (RoBERTa, XLM-R, CamemBERT, ELECTRA, Data2VecText, ERNIE, ... share it); its
self-attention is BertSelfAttention-like (bert.is_bert_self_attention_like).  DistilBERT's
TransformerBlock is recognised too.
"""
from __future__ import annotations

import contextvars
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..functional import varlen_attention
from ..packing import Unpadded, gather_tokens, scatter_tokens, unpad_info
from . import instance_forward, packed_layers
from .classes import subclass

STATE = "_fused_attn_padding_free"
_CALLS: contextvars.ContextVar = contextvars.ContextVar("fused_attn_padding_free_calls", default=())


# --------------------------------------------------------------------------------------------
# layer layouts


def _same_code(f, g) -> bool:
    """Do two functions run the same code (HF's "Copied from" classes do)?"""
    f, g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return f is not None and g is not None and f.co_code == g.co_code and f.co_names == g.co_names


def _linears(module: nn.Module, names) -> bool:
    return all(isinstance(module._modules.get(n), nn.Linear) for n in names)


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear whose call is its forward and nothing else (no hooks, parametrizations, PEFT
    or FSDP wrappers: those change the class or add hooks; no instance forward: accelerate's
    hooks, which may load offloaded weights in their pre_forward)."""
    return (type(m) is nn.Linear and "forward" not in m.__dict__ and not (m._forward_hooks or m._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


def _qkv_weights(lins, ws, bs):
    """The three linears' weights (and biases) concatenated, afresh in every forward: autograd routes
    the gradients back to the three layers.  Never cached: a copy kept across inference forwards
    (as before 2026-12-06) went stale when a weight changed through ``.data`` (``w.data.copy_(...)``,
    ``w.data.normal_()``), which bumps no version counter, and the model silently ran on the old
    weights; the copy saved 1.085x on one sentence of MiniLM (1 thread), nothing at 32."""
    return torch.cat(ws), None if bs[0] is None else torch.cat(bs)


def _project_qkv(q_lin, k_lin, v_lin, x: torch.Tensor):
    """The q, k, v projections of x.  Three plain linears of the same input run as one GEMM on their
    concatenated weights (one pass over x, one bias copy, one parallel region instead of three;
    autograd splits the gradients back; see _qkv_weights); the values are those of the three calls."""
    lins = (q_lin, k_lin, v_lin)
    if all(_plain_linear(m) for m in lins):
        ws = [m.weight for m in lins]
        bs = [m.bias for m in lins]
        if len({(w.dtype, w.device, w.shape[1]) for w in ws}) == 1 and (all(b is None for b in bs) or
                                                                          all(b is not None for b in bs)):
            w, b = _qkv_weights(lins, ws, bs)
            qkv = nn.functional.linear(x, w, b)
            return qkv.split([w.shape[0] for w in ws], dim=-1)
    return q_lin(x), k_lin(x), v_lin(x)


def _attend(att: nn.Module, q_lin, k_lin, v_lin, x: torch.Tensor, heads: int, head_dim: int,
            un: Unpadded, backend: str) -> torch.Tensor:
    """Self-attention of the packed tokens x [1, T, hidden] -> context [1, T, heads * head_dim]."""
    T = x.shape[1]
    q, k, v = (t.view(T, heads, head_dim) for t in _project_qkv(q_lin, k_lin, v_lin, x))
    s = un.seqs
    ctx = varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k,
                           dropout_p=float(att.dropout.p) if att.training else 0.0,
                           scale=float(getattr(att, "scaling", head_dim ** -0.5)), backend=backend)
    return ctx.reshape(1, T, heads * head_dim)


class _Layout:
    """A family's encoder layout; ``reference()`` gives HF's (encoder, layer, attention) classes."""

    @classmethod
    def encoder_ok(cls, encoder: nn.Module) -> bool:
        enc_ref, _, _ = cls.reference()
        return (set(encoder._modules) == {"layer"} and isinstance(encoder.layer, nn.ModuleList)
                and _same_code(type(encoder).forward, enc_ref.forward))


class _BertLayout(_Layout):
    """BertModel-like: ``.encoder.layer[i]`` = attention.{self, output}, intermediate, output."""

    name = "BERT"
    encoder_attr = "encoder"
    output_class = "BaseModelOutputWithPastAndCrossAttentions"

    @staticmethod
    def reference():
        from transformers.models.bert import modeling_bert as mb
        return mb.BertEncoder, mb.BertLayer, mb.BertAttention

    @classmethod
    def layer_ok(cls, layer: nn.Module) -> bool:
        from .bert import FusedBertSelfAttention, is_bert_self_attention_like

        _, layer_ref, att_ref = cls.reference()
        if set(layer._modules) != {"attention", "intermediate", "output"}:
            return False
        if not (_same_code(type(layer).forward, layer_ref.forward) and hasattr(layer, "feed_forward_chunk")):
            return False
        att = layer.attention
        if set(att._modules) != {"self", "output"} or not _same_code(type(att).forward, att_ref.forward):
            return False
        if getattr(att, "is_cross_attention", False) or getattr(layer, "is_decoder", False):
            return False
        sa = att.self
        return isinstance(sa, FusedBertSelfAttention) or is_bert_self_attention_like(sa)

    @staticmethod
    def bypassed(layer: nn.Module):
        """(name, module) of the submodules ``run`` does not call (it calls their children)."""
        return (("attention", layer.attention), ("attention.self", layer.attention.self))

    @staticmethod
    def run(layer: nn.Module, x: torch.Tensor, un: Unpadded, backend: str) -> torch.Tensor:
        from transformers.pytorch_utils import apply_chunking_to_forward

        sa = layer.attention.self
        ctx = _attend(sa, sa.query, sa.key, sa.value, x, sa.num_attention_heads, sa.attention_head_size, un, backend)
        attn = layer.attention.output(ctx, x)
        return apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward,
                                         layer.seq_len_dim, attn)


class _DistilBertLayout(_Layout):
    """DistilBertModel: ``.transformer.layer[i]`` = attention.{q,k,v,out}_lin, sa_layer_norm, ffn,
    output_layer_norm."""

    name = "DistilBERT"
    encoder_attr = "transformer"
    output_class = "BaseModelOutput"

    @staticmethod
    def reference():
        from transformers.models.distilbert import modeling_distilbert as md
        attention = getattr(md, "DistilBertSelfAttention", None) or md.MultiHeadSelfAttention
        return md.Transformer, md.TransformerBlock, attention

    @classmethod
    def layer_ok(cls, layer: nn.Module) -> bool:
        _, layer_ref, att_ref = cls.reference()
        if set(layer._modules) != {"attention", "sa_layer_norm", "ffn", "output_layer_norm"}:
            return False
        if not _same_code(type(layer).forward, layer_ref.forward):
            return False
        att = layer.attention
        if not isinstance(att, att_ref) or not _linears(att, ("q_lin", "k_lin", "v_lin", "out_lin")):
            return False
        heads, dim = getattr(att, "n_heads", None), getattr(att, "dim", None)
        return (isinstance(heads, int) and isinstance(dim, int) and dim % heads == 0
                and att.q_lin.out_features == dim and isinstance(att._modules.get("dropout"), nn.Dropout))

    @staticmethod
    def bypassed(layer: nn.Module):
        return (("attention", layer.attention),)

    @staticmethod
    def run(layer: nn.Module, x: torch.Tensor, un: Unpadded, backend: str) -> torch.Tensor:
        att = layer.attention
        head_dim = att.dim // att.n_heads
        ctx = _attend(att, att.q_lin, att.k_lin, att.v_lin, x, att.n_heads, head_dim, un, backend)
        sa = layer.sa_layer_norm(att.out_lin(ctx) + x)
        return layer.output_layer_norm(layer.ffn(sa) + sa)


LAYOUTS = (_BertLayout, _DistilBertLayout)


def _layout_of(base: nn.Module):
    """The layout whose encoder ``base`` owns (with .embeddings), or None."""
    if base._modules.get("embeddings") is None:
        return None
    for layout in LAYOUTS:
        enc = base._modules.get(layout.encoder_attr)
        if enc is None or isinstance(enc, _PaddingFreeEncoder):
            continue
        try:
            if layout.encoder_ok(enc):
                return layout
        except ImportError:
            continue
    return None


# --------------------------------------------------------------------------------------------
# the base model's hooks: the 2D mask of this call, for its encoder


@dataclass(frozen=True)
class _Call:
    owner: nn.Module
    encoder: nn.Module
    attention_mask: Any
    head_mask: Any
    output_attentions: Any
    encoder_hidden_states: Any
    past_key_values: Any
    # which enable() of the owner pushed it: an entry whose forward hook was removed by unpatch while
    # the call ran is never popped; after a new patch, a later call entered before the hooks were back
    # must not take it for its own (issue 23: patch / unpatch racing with calls)
    generation: Any = None


_GENERATION = "_fused_pf_generation"
_SIGNATURES: Dict[Any, inspect.Signature] = {}


def _bind(module: nn.Module, args, kwargs) -> Dict[str, Any]:
    fwd = module.forward
    key = type(module) if "forward" not in module.__dict__ else None
    sig = _SIGNATURES.get(key) if key is not None else None
    if sig is None:
        sig = inspect.signature(fwd)
        if key is not None:
            _SIGNATURES[key] = sig
    try:
        bound = sig.bind(*args, **kwargs).arguments
    except TypeError:       # the forward itself will say what is wrong with the call
        return {}
    out = dict(bound)
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


class _EnterCall:
    """Forward pre-hook (with kwargs) on the base model."""

    def __init__(self, encoder_attr: str):
        self.encoder_attr = encoder_attr

    def __call__(self, module, args, kwargs):
        a = _bind(module, args, kwargs)
        call = _Call(module, module._modules.get(self.encoder_attr), a.get("attention_mask"), a.get("head_mask"),
                     a.get("output_attentions"), a.get("encoder_hidden_states"), a.get("past_key_values"),
                     module.__dict__.get(_GENERATION))
        _CALLS.set(tuple(c for c in _CALLS.get() if _live(c)) + (call,))
        return None


class _ExitCall:
    """Forward hook (always called, also when the forward raised) on the base model."""

    def __call__(self, module, args, output):
        stack = _CALLS.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].owner is module:
                _CALLS.set(stack[:i] + stack[i + 1:])
                break
        return None


def _live(call: _Call) -> bool:
    return call.generation is not None and call.owner.__dict__.get(_GENERATION) is call.generation


def _current_call(encoder: nn.Module) -> Optional[_Call]:
    for call in reversed(_CALLS.get()):
        if call.encoder is encoder and _live(call):
            return call
    return None


# --------------------------------------------------------------------------------------------
# the encoder


def _collector():
    """transformers 5.x: the active output collector (what this forward records), else None.
    Looked up in sys.modules, as hf_attention does: an import that fails on 4.x cannot be traced."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    if capturing is None or not hasattr(capturing, "_active_collector"):
        return None
    return capturing._active_collector.get()


class _PaddingFreeEncoder:
    """Mixin put in front of the encoder's class by :func:`enable` (see the module docstring)."""

    _fused_pf_original_class: type = nn.Module
    _fused_pf_layout: Any = None

    def _fallback_reason(self, call: Optional[_Call], mask, a: Dict[str, Any], hidden: torch.Tensor) -> Optional[str]:
        """Why this call runs the padded path ('' = silently: nothing to unpad), or None."""
        if mask is None:
            return ""
        cfg = getattr(self, "config", None)
        if cfg is None and call is not None:
            cfg = getattr(call.owner, "config", None)
        if call is None:          # the base model's forward was called without its hooks
            call = _Call(None, self, mask, None, None, None, None)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return "an attention_mask that is not the 2D padding mask [B, S]"
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            return f"an attention_mask of shape {list(mask.shape)} for hidden states {list(hidden.shape)}"
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            return "a floating-point attention_mask with values other than 0 and 1"
        collector = _collector()
        if (call.output_attentions or a.get("output_attentions")
                or (call.output_attentions is None and getattr(cfg, "output_attentions", False))
                or (collector and ("attentions" in collector or "cross_attentions" in collector))):
            return "output_attentions"
        layer_heads = a.get("head_mask")
        if call.head_mask is not None or (isinstance(layer_heads, (list, tuple)) and any(h is not None for h in layer_heads)) \
                or isinstance(layer_heads, torch.Tensor):
            return "head_mask"
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            return "a decoder (is_decoder / cross-attention)"
        if call.encoder_hidden_states is not None or a.get("encoder_hidden_states") is not None:
            return "cross-attention (encoder_hidden_states)"
        if call.past_key_values is not None or a.get("past_key_values") is not None or a.get("use_cache"):
            return "past key values / use_cache"
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            return f"position_embedding_type={cfg.position_embedding_type!r}"
        layout = self._fused_pf_layout
        layers = [packed_layers.inner(layer) for layer in self.layer]
        bad = [i for i, layer in enumerate(layers) if not layout.layer_ok(layer)]
        if bad:
            return f"layers {bad} whose structure is not {layout.name}'s"
        hooked = [f"layer.{i}.{name}" for i, layer in enumerate(layers)
                  for name, m in layout.bypassed(layer) if instance_forward.hook_matters(m)]
        if hooked:          # e.g. cpu_offload(preload_module_classes=[an attention class])
            return f"accelerate hooks on {', '.join(hooked)} (modules the packed layer does not call)"
        return None

    def forward(self, *args, **kwargs):
        original = self._fused_pf_original_class.forward
        a = _bind_function(original, self, args, kwargs)
        hidden = a.get("hidden_states", a.get("x"))
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return original(self, *args, **kwargs)
        call = _current_call(self)
        if call is not None:
            mask = call.attention_mask
        else:                     # e.g. sentence-transformers calls model.forward() itself: no hooks ran
            mask = _padding_of(a.get("attention_mask", a.get("attn_mask")), hidden)
        why = self._fallback_reason(call, mask, a, hidden)
        if why is not None:
            if why:
                self._fused_pf_warn(why)
            return original(self, *args, **kwargs)
        return self._fused_pf_forward(hidden, mask if not mask.is_floating_point() else mask != 0, a)

    def _fused_pf_warn(self, why: str) -> None:
        warned = self.__dict__.setdefault("_fused_pf_warned", set())
        if why not in warned:
            warned.add(why)
            warnings.warn(f"fused_attn padding_free: {type(self).__name__} cannot run {why} on packed tokens; "
                          "that call runs the padded path (fused attention where possible). Said once per "
                          "model and reason.", stacklevel=4)

    def _fused_pf_forward(self, hidden: torch.Tensor, mask: torch.Tensor, a: Dict[str, Any]):
        from transformers import modeling_outputs

        layout, backend = self._fused_pf_layout, self.__dict__.get("_fused_pf_backend", "auto")
        un = unpad_info(mask.to(hidden.device))
        x = gather_tokens(hidden, un).unsqueeze(0)                  # [1, T, hidden]

        # transformers 4.x encoders take output_hidden_states / return_dict and return what they
        # collect; 5.x ones record hidden states through hooks on the layers (an output collector)
        legacy = "output_hidden_states" in _signature(self._fused_pf_original_class.forward).parameters
        collector = None if legacy else _collector()
        record = bool(a.get("output_hidden_states")) if legacy else bool(collector and "hidden_states" in collector)
        states: List[Optional[torch.Tensor]] = []
        wanted = None if legacy or not record else collector.get("_hidden_states_layers")
        if record and wanted is None:
            states.append(scatter_tokens(x[0], un))

        packed = packed_layers.Packed(layout, un, backend)
        muted = packed_layers.mute_capture(collector)
        try:
            for layer in self.layer:
                x = packed_layers.call(self, layer, x, packed)
                if record:
                    keep = wanted is None or len(states) in wanted
                    states.append(scatter_tokens(x[0], un) if keep else None)
        finally:
            packed_layers.unmute_capture(muted)

        out = states[-1] if record and states[-1] is not None else scatter_tokens(x[0], un)
        if record and not legacy:
            collector["hidden_states"].extend(states)
        all_states = tuple(states) if record and legacy else None
        cls = getattr(modeling_outputs, layout.output_class)
        if legacy and a.get("return_dict") is False:
            return tuple(v for v in (out, all_states) if v is not None)
        if legacy:
            return cls(last_hidden_state=out, hidden_states=all_states)
        return cls(last_hidden_state=out)


def _signature(fn: Callable) -> inspect.Signature:
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = inspect.signature(fn)
    return sig


def _padding_of(mask, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """The [B, S] padding mask (True = real) behind the mask an encoder receives, where that is
    exact and cheap: fused_attn's FusedMask of a key-padding pattern, HF's [B, 1, 1, S] extended
    mask (0 = real, <= -1e4 = padding; 4.x eager) or its bool form, or DistilBERT 4.x's [B, S].
    None otherwise (no padding, or a pattern that is not key padding: the padded path)."""
    from .hf_attention import FusedMask

    B, S = hidden.shape[:2]
    if isinstance(mask, FusedMask):
        plain = not (mask.causal or mask.packed is not None or mask._dense is not None or mask._dense_kw)
        if plain and mask.padding is not None and (mask.batch, mask.q_len, mask.k_len) == (B, S, S):
            return mask.padding
        return None
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 4 and tuple(mask.shape) == (B, 1, 1, S):
        mask = mask[:, 0, 0, :]
        if mask.is_floating_point():                 # additive: 0 = real
            real = mask == 0
            return real if bool((real | (mask <= -1e4)).all()) else None
    if mask.dim() != 2 or tuple(mask.shape) != (B, S):
        return None
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():                     # the tokenizer's mask as floats: 1 = real
        return mask != 0 if bool(((mask == 0) | (mask == 1)).all()) else None
    return mask != 0


def _bind_function(fn: Callable, self, args, kwargs) -> Dict[str, Any]:
    sig = _signature(fn)
    try:
        bound = sig.bind(self, *args, **kwargs).arguments
    except TypeError:
        return {}
    out = dict(bound)
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    out.pop("self", None)
    return out


def _padding_free_class(cls: type) -> type:
    return subclass(_PaddingFreeEncoder, cls, "PaddingFree",
                    f"{cls.__name__} whose layers run on packed tokens (fused_attn padding_free).",
                    _fused_pf_original_class=cls)


# --------------------------------------------------------------------------------------------
# enable / disable


def base_models(model: nn.Module) -> List[Tuple[nn.Module, Any]]:
    """(base model, layout) of every BERT-family base model inside ``model`` (a task model, a
    SentenceTransformer, ... or the base model itself)."""
    found = []
    for m in model.modules():
        layout = _layout_of(m)
        if layout is not None:
            found.append((m, layout))
    return found


def enable(model: nn.Module, backend: str = "auto") -> int:
    """Make every BERT-family encoder inside ``model`` padding-free; returns how many."""
    n = 0
    for base, layout in base_models(model):
        enc = base._modules[layout.encoder_attr]
        cls = type(enc)
        enc.__class__ = _padding_free_class(cls)
        instance_forward.follow(enc.__dict__, enc, enc, cls, enc.__class__)   # a hooked encoder's _old_forward
        enc.__dict__["_fused_pf_layout"] = layout
        enc.__dict__["_fused_pf_backend"] = backend
        for layer in enc.layer:
            packed_layers.install(layer)
        base.__dict__[_GENERATION] = object()
        base.register_forward_pre_hook(_EnterCall(layout.encoder_attr), with_kwargs=True)
        base.register_forward_hook(_ExitCall(), always_call=True)
        n += 1
    for m in model.modules():                 # already padding-free (patch called twice): new backend
        if isinstance(m, _PaddingFreeEncoder):
            m.__dict__["_fused_pf_backend"] = backend
    return n


def disable(model: nn.Module) -> None:
    """Undo :func:`enable`: original encoder classes and layer forwards, hooks removed."""
    for m in model.modules():
        m.__dict__.pop(_GENERATION, None)
        packed_layers.remove(m)
        if isinstance(m, _PaddingFreeEncoder):
            cls = type(m)
            m.__class__ = m._fused_pf_original_class
            instance_forward.follow(m.__dict__, m, m, cls, m.__class__)
            for attr in ("_fused_pf_layout", "_fused_pf_backend", "_fused_pf_warned"):
                m.__dict__.pop(attr, None)
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, (_EnterCall, _ExitCall))]:
                del hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)


def is_padding_free(model: nn.Module) -> bool:
    return any(isinstance(m, _PaddingFreeEncoder) for m in model.modules())
