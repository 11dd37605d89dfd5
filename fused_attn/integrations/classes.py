"""The one class factory behind the integrations' class swaps (patch: BertSelfAttention-like modules
and DeBERTa's attention and encoder; padding_free: the encoders).

A swapped module gets ``<prefix><ClassName>``, a subclass of (mixin, its own class): it stays an
instance of its class (HF's output-recording hooks, head pruning and isinstance checks still find
it) and keeps its weights; the original class sits in a class attribute so that unpatch restores it.
"""
from __future__ import annotations

import sys
from typing import Dict, Tuple

_MADE: Dict[Tuple[type, type], type] = {}


def subclass(mixin: type, cls: type, prefix: str, doc: str, **attrs) -> type:
    """``<prefix><cls.__name__>`` = (mixin, cls) with ``attrs`` as class attributes, made once per
    (mixin, cls) and published in the mixin's module under its name, so that pickle finds it."""
    made = _MADE.get((mixin, cls))
    if made is None:
        name = prefix + cls.__name__
        made = type(name, (mixin, cls), {"__module__": mixin.__module__, "__qualname__": name, "__doc__": doc,
                                         **attrs})
        _MADE[(mixin, cls)] = made
        vars(sys.modules[mixin.__module__]).setdefault(name, made)
    return made
