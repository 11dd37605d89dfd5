"""Modules whose ``forward`` was replaced on the instance: accelerate's hooks.

accelerate's ``add_hook_to_module`` (behind ``cpu_offload``, ``disk_offload``, ``dispatch_model``,
``from_pretrained(device_map=...)``) puts ``functools.partial(new_forward, module)`` in
``module.__dict__["forward"]`` and the forward it wraps, a method bound to the module, in
``module._old_forward``; ``new_forward`` runs the hook's ``pre_forward`` (move the inputs, load
offloaded weights), ``module._old_forward``, then ``post_forward``.  Both point at one object and,
through the bound method, at one class.  fused_attn changes modules underneath such wrappers:

* patch / unpatch rebuild a self-attention module as another class (bert._rebuild): the new object
  takes over the instance dict, so the partial and the bound method must name the new object, and
  a bound class ``forward`` must become the new class's ``forward`` (else the hooked module keeps
  running the old object's old code: patch would do nothing, unpatch would not undo);
* padding_free changes an encoder's class in place, and its bound ``_old_forward`` must follow;
* the packed layer loop puts its body where the layer's call ends (:func:`call_slot`), under the
  hook, so that pre_forward / post_forward still run around it; the submodules it does not call
  (the attention blocks, whose children it calls) must not carry a hook that matters
  (:func:`hook_matters`).
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Any, Dict

from torch import nn

HOOK_ATTR = "_hf_hook"          # accelerate's ModelHook on a module
OLD_FORWARD = "_old_forward"    # the forward accelerate's instance forward wraps


def _rebound(value: Any, src: nn.Module, new: nn.Module, old_cls: type, new_cls: type) -> Any:
    if isinstance(value, types.MethodType) and value.__self__ is src:
        func = value.__func__
        name = getattr(func, "__name__", None)
        if name and getattr(old_cls, name, None) is func:     # the class's own method: follow the class
            func = getattr(new_cls, name)
        if func is value.__func__ and new is src:
            return value
        return types.MethodType(func, new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is src:
        attrs = {k: _rebound(v, src, new, old_cls, new_cls) for k, v in value.__dict__.items()}
        if new is src and all(attrs[k] is v for k, v in value.__dict__.items()):
            return value
        p = functools.partial(value.func, new, *value.args[1:], **value.keywords)
        p.__dict__.update(attrs)                              # functools.update_wrapper's __wrapped__, __name__...
        return p
    return value


def follow(state: Dict[str, Any], src: nn.Module, new: nn.Module, old_cls: type, new_cls: type) -> None:
    """In the instance dict ``state`` (``new``'s): methods bound to ``src`` and partials of ``src``
    (accelerate's ``forward`` / ``_old_forward``) now name ``new``, and a bound method of ``old_cls``
    becomes ``new_cls``'s method of that name.  Other entries are left alone."""
    for key, value in list(state.items()):
        state[key] = _rebound(value, src, new, old_cls, new_cls)


def is_hooked(module: nn.Module) -> bool:
    """Does ``module`` carry an accelerate hook (its call runs the hook around ``_old_forward``)?"""
    d = module.__dict__
    return d.get(HOOK_ATTR) is not None and OLD_FORWARD in d and "forward" in d


def call_slot(module: nn.Module) -> str:
    """The instance attribute a call of ``module`` ends in: ``_old_forward`` under an accelerate
    hook, else ``forward``."""
    return OLD_FORWARD if is_hooked(module) else "forward"


def _input_moves_only(hook: Any) -> bool:
    hooks = sys.modules.get("accelerate.hooks")
    if hooks is None:
        return False
    if isinstance(hook, hooks.SequentialHook):
        return all(_input_moves_only(h) for h in hook.hooks)
    return type(hook) is hooks.AlignDevicesHook and not hook.offload


def hook_matters(module: nn.Module) -> bool:
    """Would calling ``module``'s children instead of ``module`` skip something its accelerate hook
    does?  Not for an AlignDevicesHook that does not offload: it placed the weights once, when it
    was attached, and moves the inputs to the execution device, which the children's own hooks
    do too (``dispatch_model`` hooks every submodule that holds weights).  Yes for an offloading
    one (``preload_module_classes``: it loads its children's weights) and for any other hook."""
    return is_hooked(module) and not _input_moves_only(module.__dict__[HOOK_ATTR])
