"""The one class factory behind the integrations' class swaps (patch: BertSelfAttention-like modules
and DeBERTa's attention and encoder; padding_free: the encoders).

A swapped module gets ``<prefix><ClassName>``, a subclass of (mixin, its own class): it stays an
instance of its class (HF's output-recording hooks, head pruning and isinstance checks still find
it) and keeps its weights; the original class sits in a class attribute so that unpatch restores it.

Pickling (``torch.save(model)``, ``pickle``, ``copy.deepcopy``): a made class exists only in the
process that made it, so its instances pickle by how to make it -- the factory's arguments, which
are importable classes -- never by its name; ``torch.load`` in a fresh process makes it again.
"""
from __future__ import annotations

import copyreg
import sys
from typing import Dict, Tuple

_MADE: Dict[Tuple[type, type], type] = {}


def _new(mixin: type, cls: type, prefix: str, doc: str, attrs: dict):
    """Unpickling: the made class (made again if this process has not made it yet), uninitialised."""
    made = subclass(mixin, cls, prefix, doc, **attrs)
    return made.__new__(made)


def _reduce_ex(self, protocol: int):
    rv = object.__reduce_ex__(self, protocol)
    if protocol < 2 or rv[0] is not copyreg.__newobj__ or rv[1][0] is not type(self):
        return rv
    return (_new, type(self)._fused_made_from) + tuple(rv[2:])


def subclass(mixin: type, cls: type, prefix: str, doc: str, **attrs) -> type:
    """``<prefix><cls.__name__>`` = (mixin, cls) with ``attrs`` as class attributes, made once per
    (mixin, cls) and published in the mixin's module under its name when that name is free (the
    published name is for reading; pickling goes through :func:`_new`)."""
    made = _MADE.get((mixin, cls))
    if made is None:
        name = prefix + cls.__name__
        made = type(name, (mixin, cls), {"__module__": mixin.__module__, "__qualname__": name, "__doc__": doc,
                                         "_fused_made_from": (mixin, cls, prefix, doc, dict(attrs)),
                                         "__reduce_ex__": _reduce_ex, **attrs})
        _MADE[(mixin, cls)] = made
        vars(sys.modules[mixin.__module__]).setdefault(name, made)
    return made
