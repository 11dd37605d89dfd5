"""DeBERTa-v2 / v3 on fused_attn: the disentangled attention score in the fused kernel.

HF's ``DisentangledSelfAttention`` builds the [B, H, S, S] scores and gathers two more [B, H, S, S]
position terms; it calls no attention interface, so ``register()`` cannot reach it.  Here, per layer:

* q, k, v as HF computes them (the same Linear modules);
* the two position tables, two small GEMMs against the projected relative embeddings:
  ``c2p = q · krᵀ`` and ``p2c = k · qrᵀ``, [B, H, S, P] (packed: [T, H, P]), where kr / qr are
  the relative embeddings (after the encoder's LayerNorm, norm_rel_ebd, and the layer's pos_dropout)
  projected by ``key_proj`` / ``query_proj`` (share_att_key) or ``pos_key_proj`` / ``pos_query_proj``;
  only the P columns that |i - j| <= S - 1 can reach are projected (P <= 2 · att_span);
* the index table [Sq + Sk - 1] from HF's own relative position (``make_log_bucket_position`` with
  position_buckets / max_relative_positions, clamped to the span): column ``index[i - j + Sk - 1]``
  of row i of c2p and of row j of p2c (HF's bucket function is odd, so both gathers use one column);
* ``fused_attn.attention(q, k, v, key_padding, scale=1/sqrt(D · scale_factor), dropout_p,
  rel_bias=DisentangledBias(c2p, p2c, index))``: no [S, S] tensor is formed.

``patch(model)`` re-classes every such module (weights shared, ``unpatch`` restores) and the encoder
(``DebertaV2Encoder``): while all its layers are fused it hands them the 2D padding mask instead of
HF's [B, 1, S, S] product mask, and no [1, S, S] relative-position tensor.  ``padding_free=True``
also runs the encoder's layers on the real tokens only ([1, T, hidden], ``varlen_attention`` with
packed tables [T, H, P]) and scatters the result back, zeros at padding; the v2 ConvLayer after the
first layer is computed on the padded embeddings and gathered.

Falls back to HF's code (a one-time warning where it matters): output_attentions, a relative_pos
tensor passed in by the caller, and for padding-free also query_states (the enhanced mask decoder),
a mask that is not [B, S], layers that are not DeBERTa-v2's.  DeBERTa v1 (``DebertaModel``) is not
fused: ``patch`` warns once and leaves it as is.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..packing import Unpadded, gather_tokens, scatter_tokens, unpad_info
from . import instance_forward, packed_layers
from .classes import subclass

_WARNED: set = set()


def _warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=stacklevel)


def _v2():
    from transformers.models.deberta_v2 import modeling_deberta_v2
    return modeling_deberta_v2


def _same_code(f, g) -> bool:
    f, g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return f is not None and g is not None and f.co_code == g.co_code and f.co_names == g.co_names


# --------------------------------------------------------------------------------------------
# the index table


_POSITIONS: Dict[Tuple, Tuple[torch.Tensor, int, int]] = {}


def _positions(sa: nn.Module, q_len: int, k_len: int, device: torch.device) -> Tuple[torch.Tensor, int, int]:
    """(index [q_len + k_len - 1] int64 on ``device``, lo, hi): the table column of (i, j) is
    ``index[i - j + k_len - 1]``, counted from column ``lo`` of HF's [2 · att_span] position
    embeddings; columns lo..hi are the only ones reachable at these lengths."""
    span, buckets, max_pos = int(sa.pos_ebd_size), int(sa.position_buckets), int(sa.max_relative_positions)
    key = (q_len, k_len, span, buckets, max_pos, str(device))
    hit = _POSITIONS.get(key)
    if hit is None:
        d = torch.arange(-(k_len - 1), q_len, dtype=torch.long)          # i - j
        rel = _v2().make_log_bucket_position(d, buckets, max_pos) if buckets > 0 and max_pos > 0 else d
        idx = torch.clamp(rel.to(torch.long) + span, 0, 2 * span - 1)
        lo, hi = int(idx.min()), int(idx.max())
        if len(_POSITIONS) > 256:
            _POSITIONS.clear()
        hit = _POSITIONS[key] = ((idx - lo).to(device), lo, hi)
    return hit


def _scale(sa: nn.Module) -> float:
    factor = 1 + sum(t in sa.pos_att_type for t in ("c2p", "p2c"))
    return 1.0 / math.sqrt(sa.attention_head_size * factor)


def _table(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] -> x · posᵀ [B, H, S, P]; packed x [T, H, D] -> [T, H, P]; pos [P, H, D]."""
    w = pos.permute(1, 2, 0)                                               # [H, D, P]
    if x.dim() == 4:
        return torch.matmul(x, w)
    return torch.matmul(x.transpose(0, 1), w).transpose(0, 1)


def rel_bias(sa: nn.Module, q: torch.Tensor, k: torch.Tensor, rel_embeddings: Optional[torch.Tensor],
             q_len: int, k_len: int):
    """The ``DisentangledBias`` of HF DisentangledSelfAttention ``sa`` for q, k ([B, H, S, D], or packed
    [T, H, D] with q_len / k_len the longest sequences), or None without relative attention."""
    import fused_attn

    if not sa.relative_attention:
        return None
    if rel_embeddings is None:
        raise ValueError("rel_embeddings: DeBERTa's relative attention needs the encoder's rel_embeddings, got None")
    index, lo, hi = _positions(sa, q_len, k_len, q.device)
    rel = sa.pos_dropout(rel_embeddings)[lo:hi + 1]                         # [P, hidden]
    heads, d = sa.num_attention_heads, sa.attention_head_size
    c2p = p2c = None
    if "c2p" in sa.pos_att_type:
        proj = sa.key_proj if sa.share_att_key else sa.pos_key_proj
        c2p = _table(q, proj(rel).view(-1, heads, d))
    if "p2c" in sa.pos_att_type:
        proj = sa.query_proj if sa.share_att_key else sa.pos_query_proj
        p2c = _table(k, proj(rel).view(-1, heads, d))
    if c2p is None and p2c is None:
        return None
    return fused_attn.DisentangledBias(c2p, p2c, index)


# --------------------------------------------------------------------------------------------
# the attention module


def _hf_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF's [B, 1, S, S] mask from the 2D one the fused encoder hands its layers."""
    return _v2().DebertaV2Encoder.get_attention_mask(None, attention_mask)


class FusedDisentangledSelfAttention(nn.Module):
    """Mixin put in front of DeBERTa-v2's DisentangledSelfAttention (see :func:`fused_class_for`):
    same submodules, state_dict keys, forward signature and return value ``(context, None)``."""

    _fused_original_class: type = nn.Module
    fused_attn_backend = "auto"

    def _fused_fallback(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                        rel_embeddings):
        if attention_mask is not None and attention_mask.dim() <= 2:
            attention_mask = _hf_mask(attention_mask)
        return self._fused_original_class.forward(self, hidden_states, attention_mask, output_attentions,
                                                  query_states, relative_pos, rel_embeddings)

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        if output_attentions:
            return self._fused_fallback(hidden_states, attention_mask, output_attentions, query_states,
                                        relative_pos, rel_embeddings)
        if relative_pos is not None and self.relative_attention:
            _warn_once("relative_pos", "fused_attn DeBERTa: a relative_pos tensor passed by the caller runs HF's "
                       "attention (the fused path builds HF's relative positions itself). Said once.")
            return self._fused_fallback(hidden_states, attention_mask, output_attentions, query_states,
                                        relative_pos, rel_embeddings)
        from ..functional import attention

        if query_states is None:
            query_states = hidden_states
        B, Sq = query_states.shape[:2]
        Sk = hidden_states.shape[1]
        heads, d = self.num_attention_heads, self.attention_head_size
        q = self.query_proj(query_states).view(B, Sq, heads, d).transpose(1, 2)
        k = self.key_proj(hidden_states).view(B, Sk, heads, d).transpose(1, 2)
        v = self.value_proj(hidden_states).view(B, Sk, heads, d).transpose(1, 2)
        bias = rel_bias(self, q, k, rel_embeddings, Sq, Sk)
        mask = None if attention_mask is None else attention_mask.bool()
        out = attention(q, k, v, mask, dropout_p=float(self.dropout.p) if self.training else 0.0,
                        scale=_scale(self), backend=self.fused_attn_backend, rel_bias=bias)
        return out.transpose(1, 2).reshape(B, Sq, heads * d), None

    def unfused(self) -> nn.Module:
        from .bert import _rebuild
        new = _rebuild(self, self._fused_original_class)
        new.__dict__.pop("fused_attn_backend", None)
        return new


def fused_class_for(cls: type) -> type:
    return subclass(FusedDisentangledSelfAttention, cls, "Fused",
                    f"{cls.__name__} whose attention runs in fused_attn's kernel (rel_bias).",
                    _fused_original_class=cls)


def attention_ok(module: nn.Module) -> bool:
    """Is ``module`` DeBERTa-v2's DisentangledSelfAttention (its class or one running its code)?"""
    try:
        ref = _v2().DisentangledSelfAttention
    except ImportError:
        return False
    if isinstance(module, FusedDisentangledSelfAttention) or not isinstance(module, ref):
        return False
    cls = type(module)
    if not (_same_code(cls.forward, ref.forward) and _same_code(cls.disentangled_attention_bias,
                                                                 ref.disentangled_attention_bias)):
        return False
    return all(type(module._modules.get(n)) is nn.Linear for n in ("query_proj", "key_proj", "value_proj"))


def _is_v1_attention(module: nn.Module) -> bool:
    try:
        from transformers.models.deberta import modeling_deberta
    except ImportError:
        return False
    return isinstance(module, modeling_deberta.DisentangledSelfAttention)


# --------------------------------------------------------------------------------------------
# the encoder


def _layers_fused(encoder: nn.Module) -> bool:
    layers = [packed_layers.inner(layer) for layer in encoder.layer]
    return bool(layers) and all(
        isinstance(getattr(getattr(layer, "attention", None), "self", None), FusedDisentangledSelfAttention)
        for layer in layers)


def _layer_ok(layer: nn.Module) -> bool:
    m = _v2()
    if set(layer._modules) != {"attention", "intermediate", "output"}:
        return False
    if not _same_code(type(layer).forward, m.DebertaV2Layer.forward):
        return False
    att = layer.attention
    if set(att._modules) != {"self", "output"} or not _same_code(type(att).forward, m.DebertaV2Attention.forward):
        return False
    return isinstance(att.self, FusedDisentangledSelfAttention)


class _PackedRun:
    """The packed body of one DeBERTa-v2 layer (``Packed.layout`` for packed_layers.call)."""

    def __init__(self, encoder: nn.Module, max_seqlen: int):
        self.encoder, self.max_seqlen = encoder, max_seqlen

    def run(self, layer: nn.Module, x: torch.Tensor, un: Unpadded, backend: str) -> torch.Tensor:
        from ..functional import varlen_attention
        from .padding_free import _project_qkv

        att = layer.attention
        sa = att.self
        T = x.shape[1]
        heads, d = sa.num_attention_heads, sa.attention_head_size
        q, k, v = (t.view(T, heads, d) for t in _project_qkv(sa.query_proj, sa.key_proj, sa.value_proj, x[0]))
        # the rel embeddings are recomputed inside the layer (one LayerNorm of [2 · span, hidden]) so that
        # a checkpointed layer, reentrant or not, still sends their gradient back
        rel = self.encoder.get_rel_embedding() if sa.relative_attention else None
        m = self.max_seqlen
        bias = rel_bias(sa, q, k, rel, m, m)
        s = un.seqs
        ctx = varlen_attention(q, k, v, s.cu_seqlens_q, s.cu_seqlens_k, m, m,
                               dropout_p=float(sa.dropout.p) if sa.training else 0.0, scale=_scale(sa),
                               backend=backend, rel_bias=bias)
        ctx = ctx.reshape(1, T, heads * d)
        out = att.output(ctx, x)
        return layer.output(layer.intermediate(out), out)


def _packed_conv(conv: nn.Module, hidden: torch.Tensor, residual: torch.Tensor, un: Unpadded) -> torch.Tensor:
    """HF's ConvLayer on packed tokens: the convolution over the padded embeddings (zeros at padding,
    as HF sees them), gathered; the rest per token."""
    from transformers.activations import ACT2FN

    out = conv.conv(hidden.permute(0, 2, 1).contiguous()).permute(0, 2, 1)
    out = ACT2FN[conv.conv_act](conv.dropout(gather_tokens(out, un)))
    y = residual[0] + out
    return conv.LayerNorm(y).to(y)[None]


class FusedDebertaEncoder:
    """Mixin put in front of the encoder's class by :func:`enable`."""

    _fused_deb_original_class: type = nn.Module

    def get_attention_mask(self, attention_mask):
        if attention_mask.dim() <= 2 and _layers_fused(self):
            return attention_mask          # [B, S]: the fused layers read it as key padding
        return super().get_attention_mask(attention_mask)

    def get_rel_pos(self, hidden_states, query_states=None, relative_pos=None):
        if relative_pos is None and _layers_fused(self):
            return None                    # the fused layers build the index table themselves
        return super().get_rel_pos(hidden_states, query_states, relative_pos)

    def _fused_deb_reason(self, hidden, mask, output_attentions, query_states, relative_pos) -> Optional[str]:
        """Why this call cannot run on packed tokens ('' = silently), or None."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return "hidden states that are not [B, S, hidden]"
        if output_attentions:
            return "output_attentions"
        if query_states is not None:
            return "query_states (the enhanced mask decoder)"
        if relative_pos is not None:
            return "a relative_pos tensor"
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2]):
            return "an attention_mask that is not the 2D padding mask [B, S]"
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            return "a floating-point attention_mask with values other than 0 and 1"
        real = (mask != 0).to(torch.int8)
        if bool(((real[:, 1:] > real[:, :-1]).sum(1) + real[:, 0] > 1).any()):
            # packing would close the holes: HF counts the padding inside a row in i - j
            return "an attention_mask with padding between real tokens (relative positions count it)"
        layers = [packed_layers.inner(layer) for layer in self.layer]
        bad = [i for i, layer in enumerate(layers) if not _layer_ok(layer)]
        if bad:
            return f"layers {bad} that are not DeBERTa-v2 layers with fused attention"
        if self.conv is not None and not _same_code(type(self.conv).forward, _v2().ConvLayer.forward):
            return "a conv layer that is not DeBERTa-v2's ConvLayer"
        hooked = [f"layer.{i}.{n}" for i, layer in enumerate(layers)
                  for n, mod in (("attention", layer.attention), ("attention.self", layer.attention.self))
                  if instance_forward.hook_matters(mod)]
        if hooked:
            return f"accelerate hooks on {', '.join(hooked)} (modules the packed layer does not call)"
        return None

    def forward(self, hidden_states, attention_mask, output_hidden_states=True, output_attentions=False,
                query_states=None, relative_pos=None, return_dict=True):
        original = self._fused_deb_original_class.forward
        if not self.__dict__.get("_fused_deb_padding_free"):
            return original(self, hidden_states, attention_mask, output_hidden_states, output_attentions,
                            query_states, relative_pos, return_dict)
        why = self._fused_deb_reason(hidden_states, attention_mask, output_attentions, query_states, relative_pos)
        if why is not None:
            warned = self.__dict__.setdefault("_fused_deb_warned", set())
            if why and why not in warned:
                warned.add(why)
                warnings.warn(f"fused_attn padding_free: {type(self).__name__} cannot run {why} on packed tokens; "
                              "that call runs the padded path (fused attention where possible). Said once per "
                              "model and reason.", stacklevel=3)
            return original(self, hidden_states, attention_mask, output_hidden_states, output_attentions,
                            query_states, relative_pos, return_dict)
        return self._fused_deb_packed(hidden_states, attention_mask, output_hidden_states, return_dict)

    def _fused_deb_packed(self, hidden, mask, output_hidden_states, return_dict):
        from transformers.modeling_outputs import BaseModelOutput

        un = unpad_info((mask != 0).to(hidden.device))
        x = gather_tokens(hidden, un).unsqueeze(0)                          # [1, T, hidden]
        packed = packed_layers.Packed(_PackedRun(self, un.seqs.max_seqlen_q), un,
                                      self.__dict__.get("_fused_deb_backend", "auto"))
        states: List[torch.Tensor] = [hidden] if output_hidden_states else []
        for i, layer in enumerate(self.layer):
            x = packed_layers.call(self, layer, x, packed)
            if i == 0 and self.conv is not None:
                x = _packed_conv(self.conv, hidden, x, un)
            if output_hidden_states:
                states.append(scatter_tokens(x[0], un))
        out = states[-1] if output_hidden_states else scatter_tokens(x[0], un)
        all_states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (out, all_states) if v is not None)
        return BaseModelOutput(last_hidden_state=out, hidden_states=all_states, attentions=None)


def _encoder_class(cls: type) -> type:
    return subclass(FusedDebertaEncoder, cls, "Fused",
                    f"{cls.__name__} whose layers get the compact masks of fused_attn's DeBERTa layers.",
                    _fused_deb_original_class=cls)


def _encoder_ok(encoder: nn.Module) -> bool:
    try:
        ref = _v2().DebertaV2Encoder
    except ImportError:
        return False
    return (isinstance(encoder, nn.Module) and isinstance(getattr(encoder, "layer", None), nn.ModuleList)
            and all(_same_code(getattr(type(encoder), n), getattr(ref, n))
                    for n in ("forward", "get_attention_mask", "get_rel_pos", "get_rel_embedding")))


# --------------------------------------------------------------------------------------------
# enable / disable (called by patch / unpatch)


def enable(model: nn.Module, backend: str = "auto", padding_free: bool = False) -> int:
    """Fuse every DeBERTa-v2 attention module of ``model``, and make their encoders hand them compact
    masks (padding-free too with ``padding_free``); returns how many modules or encoders changed."""
    from .bert import swap

    n = swap(model, FusedDisentangledSelfAttention, attention_ok, fused_class_for, backend)
    if any(_is_v1_attention(m) for m in model.modules() if m is not model):
        _warn_once("v1", "fused_attn.patch: DeBERTa v1 (DebertaModel) is not fused yet; its attention runs HF's "
                   "code. DeBERTa-v2/v3 (DebertaV2Model) is fused.", stacklevel=4)
    for m in list(model.modules()):
        if isinstance(m, FusedDebertaEncoder):
            enc = m
        elif _encoder_ok(m) and any(isinstance(x, FusedDisentangledSelfAttention) for x in m.modules()):
            cls = type(m)
            m.__class__ = _encoder_class(cls)
            instance_forward.follow(m.__dict__, m, m, cls, m.__class__)
            enc, n = m, n + 1
        else:
            continue
        enc.__dict__["_fused_deb_backend"] = backend
        if padding_free:
            enc.__dict__["_fused_deb_padding_free"] = True
            for layer in enc.layer:
                packed_layers.install(layer)
    return n


def disable(model: nn.Module) -> None:
    """Undo :func:`enable`."""
    for m in list(model.modules()):
        if isinstance(m, FusedDebertaEncoder):
            cls = type(m)
            for layer in m.layer:
                packed_layers.remove(packed_layers.inner(layer))
            m.__class__ = m._fused_deb_original_class
            instance_forward.follow(m.__dict__, m, m, cls, m.__class__)
            for attr in ("_fused_deb_backend", "_fused_deb_padding_free", "_fused_deb_warned"):
                m.__dict__.pop(attr, None)
    from .bert import unswap

    unswap(model, FusedDisentangledSelfAttention)


def is_patched(model: nn.Module) -> bool:
    return any(isinstance(m, (FusedDisentangledSelfAttention, FusedDebertaEncoder)) for m in model.modules())


def fused_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FusedDisentangledSelfAttention)]


__all__ = ["FusedDisentangledSelfAttention", "FusedDebertaEncoder", "enable", "disable", "rel_bias",
           "attention_ok", "is_patched", "fused_modules"]
