"""fused_attn: fused masked attention for BERT-family models (see DESIGN.md)."""
from . import reference
from .functional import attention
from .masks import ReducedMask, reduce_mask

__version__ = "0.1.0"

__all__ = ["attention", "reference", "reduce_mask", "ReducedMask", "__version__"]
