"""Hugging Face transformers integration, in one import:

    from fused_attn.integrations.hf import FusedBertSelfAttention, patch, unpatch, patched, register

* ``patch(model)`` / ``unpatch(model)`` / ``with patched(model):`` swap BertSelfAttention-like
  modules (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ...) for FusedBertSelfAttention and back;
* ``register()`` (transformers >= 4.53, meant for 5.x) adds ``attn_implementation="fused_attn"``
  for every model that uses HF's attention interface; BERT-family models use it from 5.0 on.

Implementation: hf_attention.py (attention and mask functions, register), bert.py (the module),
patch.py (module swapping).
"""
from .bert import TRANSFORMERS_5, FusedBertSelfAttention
from .hf_attention import FusedMask, fused_attention_forward, fused_attn_mask, register
from .patch import fused_modules, is_bert_self_attention_like, is_patched, patch, patched, unpatch

__all__ = ["FusedBertSelfAttention", "FusedMask", "TRANSFORMERS_5", "fused_attention_forward",
           "fused_attn_mask", "fused_modules", "is_bert_self_attention_like", "is_patched", "patch",
           "patched", "register", "unpatch"]
