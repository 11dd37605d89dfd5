"""FusedBertSelfAttention: drop-in for the installed transformers' BertSelfAttention.

Same submodules and state_dict keys (query / key / value Linear, dropout), same constructor and
forward signature, same return structure as the installed version:

* transformers 5.x: ``forward(hidden_states, attention_mask=None, past_key_values=None, **kwargs)
  -> (attn_output, attn_weights)``; a module replacing 5.x's BertCrossAttention takes
  ``encoder_hidden_states`` as a keyword, as BertAttention passes it.
* transformers 4.x: ``forward(hidden_states, attention_mask, head_mask, encoder_hidden_states,
  past_key_values, output_attentions, cache_position) -> (context, probs or None)`` (4.56+, Cache
  objects), or the older tuple ``(context, [probs], [present key/value])`` with tuple caches.

The attention itself is ``fused_attn.attention`` on HF's transposed q/k/v views (no copies);
output_attentions=True computes that call with eager math instead.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers.models.bert import modeling_bert

from .hf_attention import fused_attention_forward
from .classes import subclass
from .instance_forward import follow

_BASE = modeling_bert.BertSelfAttention
TRANSFORMERS_5 = hasattr(modeling_bert, "BertCrossAttention")
# transformers < 4.56 passes (and returns) past key/values as tuples; recognisable by the
# encoder_attention_mask argument its BertSelfAttention.forward still had
_TUPLE_CACHE = "encoder_attention_mask" in inspect.signature(_BASE.forward).parameters


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H * D] -> [B, H, S, D] as a strided view (what HF's attention layers produce)."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


class FusedBertSelfAttention(_BASE):
    """BertSelfAttention whose attention runs in fused_attn's kernel.

    Build it like BertSelfAttention (``FusedBertSelfAttention(config, ...)``) or from an existing
    module with :meth:`from_module` (the Linear layers are shared, not copied).
    """

    # 5.x cross-attention layout (query from hidden_states, key/value from encoder_hidden_states)
    _fused_cross = False

    def __setstate__(self, state):
        # Unpickling (torch.load of a patched model, deepcopy): on transformers 5 the model's config
        # says attn_implementation="fused_attn", and a process that never called register() would
        # have HF drop the padding mask silently (no mask function under that name): register here.
        super().__setstate__(state)
        if TRANSFORMERS_5:
            from .hf_attention import register
            register()

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "FusedBertSelfAttention":
        """A fused module sharing ``module``'s submodules, parameters, buffers, hooks and flags.

        The class of the result derives from ``module``'s class too (when that is not
        BertSelfAttention itself), so isinstance checks and HF's output-recording hooks still
        match it.  See :func:`fused_class_for`.
        """
        return _rebuild(module, fused_class_for(type(module)))

    def unfused(self) -> torch.nn.Module:
        """The equivalent module of the original class (sharing everything with this one)."""
        return _rebuild(self, getattr(type(self), "_fused_original_class", _BASE))

    # ----------------------------------------------------------------------------------------
    def _scale(self) -> float:
        return float(getattr(self, "scaling", self.attention_head_size ** -0.5))

    def _dropout_p(self) -> float:
        return float(self.dropout.p) if self.training else 0.0

    def _relative_positions(self) -> bool:
        return getattr(self, "position_embedding_type", "absolute") not in (None, "absolute")

    if TRANSFORMERS_5:
        def forward(self, hidden_states: torch.Tensor, attention_mask=None, past_key_values=None, **kwargs):
            from transformers.cache_utils import EncoderDecoderCache

            encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
            input_shape = hidden_states.shape[:-1]
            d = self.attention_head_size
            query = _split_heads(self.query(hidden_states), d)
            if self._fused_cross:
                updated = past_key_values.is_updated.get(self.layer_idx) if past_key_values is not None else False
                if updated:
                    layer = past_key_values.cross_attention_cache.layers[self.layer_idx]
                    key, value = layer.keys, layer.values
                else:
                    key = _split_heads(self.key(encoder_hidden_states), d)
                    value = _split_heads(self.value(encoder_hidden_states), d)
                    if past_key_values is not None:
                        key, value = past_key_values.cross_attention_cache.update(key, value, self.layer_idx)
                        past_key_values.is_updated[self.layer_idx] = True
            else:
                key = _split_heads(self.key(hidden_states), d)
                value = _split_heads(self.value(hidden_states), d)
                if past_key_values is not None:
                    cache = past_key_values
                    if isinstance(past_key_values, EncoderDecoderCache):
                        cache = past_key_values.self_attention_cache
                    key, value = cache.update(key, value, self.layer_idx)
            out, weights = fused_attention_forward(
                self, query, key, value, attention_mask, scaling=self._scale(), dropout=self._dropout_p(),
                is_causal=False if self._fused_cross else getattr(self, "is_causal", False), **kwargs)
            return out.reshape(*input_shape, -1).contiguous(), weights

    else:
        def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    head_mask: Optional[torch.Tensor] = None, encoder_hidden_states: Optional[torch.Tensor] = None,
                    past_key_values=None, output_attentions: Optional[bool] = False,
                    cache_position: Optional[torch.Tensor] = None, **kwargs):
            if self._relative_positions():          # relative position scores: not a fused-kernel case
                return _BASE.forward(self, hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                     past_key_values, output_attentions, cache_position, **kwargs)
            if past_key_values is None:
                past_key_values = kwargs.pop("past_key_value", None)
            if _TUPLE_CACHE or isinstance(past_key_values, tuple):
                return self._forward_tuple_cache(hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                                 kwargs.get("encoder_attention_mask"), past_key_values,
                                                 output_attentions)
            return self._forward_cache(hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                       past_key_values, output_attentions, cache_position)

        def _forward_cache(self, hidden_states, attention_mask, head_mask, encoder_hidden_states,
                           past_key_values, output_attentions, cache_position):
            from transformers.cache_utils import EncoderDecoderCache

            d = self.attention_head_size
            query = _split_heads(self.query(hidden_states), d)
            cross = encoder_hidden_states is not None
            cache, updated = past_key_values, False
            if isinstance(past_key_values, EncoderDecoderCache):
                updated = past_key_values.is_updated.get(self.layer_idx)
                cache = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
            if cross and past_key_values is not None and updated:
                key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
            else:
                states = encoder_hidden_states if cross else hidden_states
                key, value = _split_heads(self.key(states), d), _split_heads(self.value(states), d)
                if past_key_values is not None:
                    key, value = cache.update(key, value, self.layer_idx,
                                              {"cache_position": None if cross else cache_position})
                    if cross and isinstance(past_key_values, EncoderDecoderCache):
                        past_key_values.is_updated[self.layer_idx] = True
            context, probs = self._attend(query, key, value, attention_mask, head_mask, output_attentions, cross)
            return context, probs

        def _forward_tuple_cache(self, hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                 encoder_attention_mask, past_key_value, output_attentions):
            d = self.attention_head_size
            query = _split_heads(self.query(hidden_states), d)
            cross = encoder_hidden_states is not None
            if cross and past_key_value is not None:
                key, value = past_key_value[0], past_key_value[1]
                attention_mask = encoder_attention_mask
            elif cross:
                key = _split_heads(self.key(encoder_hidden_states), d)
                value = _split_heads(self.value(encoder_hidden_states), d)
                attention_mask = encoder_attention_mask
            else:
                key = _split_heads(self.key(hidden_states), d)
                value = _split_heads(self.value(hidden_states), d)
                if past_key_value is not None:
                    key = torch.cat([past_key_value[0], key], dim=2)
                    value = torch.cat([past_key_value[1], value], dim=2)
            context, probs = self._attend(query, key, value, attention_mask, head_mask, output_attentions, cross)
            outputs = (context, probs) if output_attentions else (context,)
            if self.is_decoder:
                outputs = outputs + ((key, value),)
            return outputs

        def _attend(self, query, key, value, attention_mask, head_mask, output_attentions, cross):
            # HF 4.x builds the decoder's causal mask itself; only a missing mask means "causal here"
            causal = bool(self.is_decoder and not cross and attention_mask is None)
            out, probs = fused_attention_forward(
                self, query, key, value, attention_mask, scaling=self._scale(), dropout=self._dropout_p(),
                head_mask=head_mask, is_causal=causal, output_attentions=bool(output_attentions))
            context = out.reshape(*out.shape[:2], self.all_head_size)
            return context, probs


def _rebuild(src: torch.nn.Module, cls: type) -> torch.nn.Module:
    """An instance of ``cls`` holding ``src``'s state: the same submodules, parameters and
    buffers (shared objects), attributes, and copies of its hook dictionaries.  An instance
    ``forward`` wrapping the module (accelerate's hooks) wraps the new one, running ``cls``'s code."""
    new = cls.__new__(cls)
    state = dict(src.__dict__)
    for name, value in list(state.items()):
        if name.startswith("_") and isinstance(value, dict) and name != "__dict__":
            state[name] = type(value)(value)            # own hook/module dicts, same entries
    follow(state, src, new, type(src), cls)
    new.__dict__.update(state)
    return new


def swap(model: nn.Module, fused_type: type, qualifies: Callable[[nn.Module], bool],
         class_for: Callable[[type], type], backend: str) -> int:
    """Replace every submodule of ``model`` that ``qualifies`` by ``_rebuild(child,
    class_for(type(child)))`` in its parent, with ``fused_attn_backend = backend``; modules already
    of ``fused_type`` only get the backend.  Returns how many were replaced (patch, deberta.enable)."""
    n = 0
    for parent, name, child in _children(model):
        if isinstance(child, fused_type):
            child.fused_attn_backend = backend
        elif qualifies(child):
            fused = _rebuild(child, class_for(type(child)))
            fused.fused_attn_backend = backend
            parent._modules[name] = fused
            n += 1
    return n


def unswap(model: nn.Module, fused_type: type) -> None:
    """Undo :func:`swap`: every ``fused_type`` submodule back to ``child.unfused()``, without the
    backend attribute (unpatch, deberta.disable)."""
    for parent, name, child in _children(model):
        if isinstance(child, fused_type):
            orig = child.unfused()
            orig.__dict__.pop("fused_attn_backend", None)
            parent._modules[name] = orig


def _children(model: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every child of every module of ``model`` (a list per parent, so
    that the caller may replace children while it walks)."""
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None:
                yield parent, name, child


def _forward_params(cls: type) -> List[str]:
    try:
        return list(inspect.signature(cls.forward).parameters)[1:]      # drop self
    except (TypeError, ValueError):
        return []


def fused_class_for(cls: type) -> type:
    """The fused class standing in for ``cls``: FusedBertSelfAttention itself for BertSelfAttention,
    else a subclass of both (so isinstance(m, cls) still holds: HF's output-recording hooks and
    head pruning find it).  Cached; registered in this module so pickling finds it."""
    if issubclass(cls, FusedBertSelfAttention):
        return cls
    if cls is FusedBertSelfAttention.__mro__[1]:
        return FusedBertSelfAttention
    params = _forward_params(cls)
    cross = TRANSFORMERS_5 and len(params) > 1 and params[1] == "encoder_hidden_states"
    return subclass(FusedBertSelfAttention, cls, "Fused", f"{cls.__name__} whose attention runs in fused_attn's kernel.",
                    _fused_original_class=cls, _fused_cross=cross)


# -- which modules patch() swaps (here, not in patch.py, so padding_free.py can ask without importing patch)

_FORWARD_ARGS = {"hidden_states", "attention_mask", "head_mask", "encoder_hidden_states",
                 "encoder_attention_mask", "past_key_value", "past_key_values", "output_attentions",
                 "cache_position", "kwargs"}
_SUBMODULES = {"query", "key", "value", "dropout"}


def is_bert_self_attention_like(module: nn.Module) -> bool:
    """Does ``module`` have BertSelfAttention's structure (see fused_attn/integrations/patch.py)?"""
    if isinstance(module, FusedBertSelfAttention):
        return False
    if set(module._modules) != _SUBMODULES:
        return False
    q, k, v = module._modules["query"], module._modules["key"], module._modules["value"]
    if not all(type(m) is nn.Linear for m in (q, k, v)) or not isinstance(module._modules["dropout"], nn.Dropout):
        return False
    heads, head_dim = getattr(module, "num_attention_heads", None), getattr(module, "attention_head_size", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return False
    width = heads * head_dim
    if not (q.out_features == k.out_features == v.out_features == width):
        return False
    if getattr(module, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    params = _forward_params(type(module))
    if not params or params[0] != "hidden_states" or not set(params) <= _FORWARD_ARGS:
        return False
    if TRANSFORMERS_5 and not hasattr(module, "layer_idx"):
        return False
    return True
