"""Calling an encoder layer as a module on packed tokens (the padding-free encoder's layer loop).

The padding-free encoder (padding_free.py) runs each layer on the real tokens only, [1, T, hidden].
It calls the layer as a module, ``layer(x, _fused_attn_packed=Packed(...))``, never the layer's
submodules behind its back, so what ``nn.Module.__call__`` runs around a forward runs here too:
forward (pre-)hooks, FSDP2's per-layer all-gather and reshard, torch's ``checkpoint_wrapper``,
HF's gradient checkpointing (``GradientCheckpointingLayer.__call__``), accelerate's hooks
(``cpu_offload``, ``dispatch_model``: see instance_forward.py).

For that, each layer gets an instance ``forward`` (:class:`LayerForward`, put there by
:func:`install` and taken away by :func:`remove`; under an accelerate hook, the ``_old_forward``
that the hook calls): with the packed keyword it runs the layout's packed body, without it what
``forward`` was before.  The batch travels as a keyword argument,
not in a context variable: a checkpointed layer is recomputed in the backward pass, after the
encoder's forward has returned, with the arguments it was first called with.
"""
from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..packing import Unpadded
from . import instance_forward

PACKED_KW = "_fused_attn_packed"
_WRAPPED = "_checkpoint_wrapped_module"     # torch's checkpoint_wrapper / offload_wrapper (ActivationWrapper)


@dataclass(frozen=True)
class Packed:
    """What a layer needs to run on packed tokens: the layout's ``run``, where the tokens are, the engine."""
    layout: Any
    un: Unpadded
    backend: str
    # one entry per packed body run (LayerForward): call() checks that the layer ran its packed body
    ran: list = field(default_factory=list, compare=False, repr=False)


def inner(layer: nn.Module) -> nn.Module:
    """The layer inside torch's activation checkpoint / offload wrappers (the layer itself if none)."""
    while set(layer._modules) == {_WRAPPED}:
        layer = layer._modules[_WRAPPED]
    return layer


class LayerForward:
    """A layer's ``forward`` while padding-free.  Without the packed keyword: what ``forward`` was
    before (an instance forward someone else put there, else the class's)."""

    __slots__ = ("layer", "previous")

    def __init__(self, layer: nn.Module, previous: Optional[Callable]):
        self.layer, self.previous = layer, previous

    def __call__(self, *args, **kwargs):
        packed = kwargs.pop(PACKED_KW, None)
        if packed is None:
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(self.layer).forward(self.layer, *args, **kwargs)
        (x,) = args
        packed.ran.append(None)
        return packed.layout.run(self.layer, x, packed.un, packed.backend)


def install(layer: nn.Module) -> None:
    """Give ``layer`` (inside its wrappers) a :class:`LayerForward`, once: as its ``forward``, or
    under an accelerate hook as the ``_old_forward`` the hook calls (so its pre_forward and
    post_forward run around the packed body too)."""
    layer = inner(layer)
    for slot in ("forward", instance_forward.OLD_FORWARD):
        if isinstance(layer.__dict__.get(slot), LayerForward):
            return
    slot = instance_forward.call_slot(layer)
    layer.__dict__[slot] = LayerForward(layer, layer.__dict__.get(slot))


def remove(module: nn.Module) -> None:
    """Undo :func:`install` on ``module`` (nothing if it has no LayerForward).  An accelerate hook
    added after :func:`install` wraps the LayerForward: its ``_old_forward`` becomes the forward
    the hook would have wrapped without it."""
    for slot in ("forward", instance_forward.OLD_FORWARD):
        fwd = module.__dict__.get(slot)
        if not isinstance(fwd, LayerForward):
            continue
        if fwd.previous is not None:
            module.__dict__[slot] = fwd.previous
        elif slot == "forward":
            del module.__dict__["forward"]
        else:
            module.__dict__[slot] = types.MethodType(type(module).forward, module)


def checkpoints_itself(layer: nn.Module) -> bool:
    """HF's GradientCheckpointingLayer (transformers >= 4.52) checkpoints in its own ``__call__``."""
    gcl = getattr(sys.modules.get("transformers.modeling_layers"), "GradientCheckpointingLayer", None)
    return gcl is not None and isinstance(inner(layer), gcl)


def call(encoder: nn.Module, layer: nn.Module, x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """``layer`` of ``encoder`` on the packed tokens x [1, T, hidden], called as a module."""
    install(layer)                               # a layer put in after patch() gets it here
    kwargs = {PACKED_KW: packed}
    runs = len(packed.ran)
    if (getattr(encoder, "gradient_checkpointing", False) and encoder.training and torch.is_grad_enabled()
            and not checkpoints_itself(layer)):
        # transformers < 4.52: the encoder, not the layer, checkpoints (as its own loop does)
        fn = getattr(encoder, "_gradient_checkpointing_func", None) or \
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        out = fn(functools.partial(layer.__call__, **kwargs), x)
    else:
        out = layer(x, **kwargs)
    if len(packed.ran) == runs:
        # The layer's own forward ran instead of the packed body: unpatch() (in another thread) took
        # the LayerForward away after install() above.  On transformers 5 that forward takes **kwargs,
        # so it ran on the packed tokens with no mask, across sequences: never return that.
        raise RuntimeError(f"fused_attn padding_free: {type(inner(layer)).__name__} did not run packed "
                           "(the model was unpatched while this call was in flight); patch and unpatch "
                           "between calls")
    return out


def mute_capture(collector: Optional[Dict[str, Any]]) -> Any:
    """transformers 5.x: switch the output collector off for the packed loop (its hooks on the
    layers would record packed tokens; the encoder records them itself, padded).  Returns what
    :func:`unmute_capture` needs."""
    if collector is None:
        return None
    var = sys.modules["transformers.utils.output_capturing"]._active_collector
    return var, var.set(None)


def unmute_capture(muted: Any) -> None:
    if muted is not None:
        var, token = muted
        var.reset(token)
