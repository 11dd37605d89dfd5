"""Packed (variable-length) batches: the sequence description the varlen kernels take, and the
gather / scatter between a padded batch and its packed tokens.

A packed batch stores the real tokens of B sequences one after the other, [T, ...], with
``cu_seqlens`` (int32 [B + 1], cumulative lengths, ``cu_seqlens[0] == 0``, ``cu_seqlens[B] == T``)
marking where each sequence starts: sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEBUG_ENV = "FUSED_ATTN_DEBUG"


@dataclass(frozen=True)
class SeqLens:
    """The sequences of a packed batch, as the kernels take them (validated by _checks)."""

    cu_seqlens_q: torch.Tensor     # int32 [B + 1], contiguous, on q's device
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int              # >= every query length; sets the grid and the dropout layout
    max_seqlen_k: int

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def debug_checks() -> bool:
    """FUSED_ATTN_DEBUG=1: also validate cu_seqlens values on CUDA (one host sync per call)."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")
