"""fused_attn: fused masked attention for BERT-family models (see docs/design.md)."""
from . import reference
from .disentangled import DisentangledBias
from .functional import attention, varlen_attention
from .masks import ReducedMask, reduce_mask

__version__ = "0.1.0"

__all__ = ["attention", "varlen_attention", "DisentangledBias", "reference", "reduce_mask", "ReducedMask", "__version__"]

# Hugging Face integration, imported on first use so `import fused_attn` never imports transformers
_HF_EXPORTS = ("FusedBertSelfAttention", "patch", "unpatch", "patched", "register")


def __getattr__(name):
    if name in _HF_EXPORTS:
        from .integrations import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'fused_attn' has no attribute {name!r}")
