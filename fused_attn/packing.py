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


# --------------------------------------------------------------------------------------------
# padded batch <-> packed tokens (the padding-free encoder, HF's flattened batches)


@dataclass(frozen=True)
class Unpadded:
    """Where the real tokens of a padded [B, S] batch are: ``indices`` (int64 [T], positions in the
    flattened B * S grid, row by row, in order), and the packed sequences they form (``seqs``)."""

    indices: torch.Tensor
    seqs: SeqLens
    batch: int
    seqlen: int

    @property
    def tokens(self) -> int:
        return self.indices.shape[0]


def _check_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor [B, S], got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected the 2D padding mask [B, S] (1 = real token), "
                         f"got shape {list(attention_mask.shape)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask: expected a bool or integer 0/1 mask, got {attention_mask.dtype}")
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def unpad_info(attention_mask: torch.Tensor) -> Unpadded:
    """The packed layout of the real tokens of a padded batch.

    ``attention_mask``: [B, S] bool or int, 1 / True = real token.  Any 0/1 pattern works (right or
    left padding, holes): the real tokens of row b, in order, form packed sequence b (possibly
    empty).  One host synchronisation (the number of tokens and the longest row), like
    FlashAttention's ``unpad_input``.
    """
    real = _check_mask(attention_mask)
    B, S = real.shape
    lengths = real.sum(dim=1, dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(real.reshape(-1), as_tuple=False).reshape(-1)
    max_seqlen = int(lengths.max()) if B > 0 else 0
    return Unpadded(indices, SeqLens(cu, cu, max_seqlen, max_seqlen), B, S)


def gather_tokens(x: torch.Tensor, unpadded: Unpadded) -> torch.Tensor:
    """[B, S, ...] -> the real tokens [T, ...] (differentiable: the gradient flows back to the
    real positions, padding gets zero)."""
    if x.dim() < 2 or tuple(x.shape[:2]) != (unpadded.batch, unpadded.seqlen):
        raise ValueError(f"x: expected shape [{unpadded.batch}, {unpadded.seqlen}, ...] (the padded batch), "
                         f"got {list(x.shape)}")
    return x.reshape(unpadded.batch * unpadded.seqlen, *x.shape[2:]).index_select(0, unpadded.indices)


def scatter_tokens(packed: torch.Tensor, unpadded: Unpadded) -> torch.Tensor:
    """The real tokens [T, ...] -> the padded batch [B, S, ...], zeros at padding (differentiable)."""
    if packed.dim() < 1 or packed.shape[0] != unpadded.tokens:
        raise ValueError(f"packed: expected {unpadded.tokens} tokens in dim 0, got shape {list(packed.shape)}")
    out = packed.new_zeros((unpadded.batch * unpadded.seqlen, *packed.shape[1:]))
    out = out.index_put((unpadded.indices,), packed)
    return out.view(unpadded.batch, unpadded.seqlen, *packed.shape[1:])


def seqlens_from_position_ids(position_ids: torch.Tensor) -> SeqLens:
    """Packed sequences of a flattened batch (HF's DataCollatorWithFlattening): one row of
    ``position_ids`` [1, T] that restarts at its smallest value (0, or 2 for RoBERTa-like models)
    at the first token of every sequence.  One host synchronisation (the longest sequence)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        shape = list(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids: expected one flattened row [1, T], got {shape}")
    pos = position_ids.reshape(-1)
    T = pos.shape[0]
    starts = torch.nonzero(pos == pos.min(), as_tuple=False).reshape(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([T], dtype=torch.int32, device=pos.device)])
    if int(cu[0]) != 0:
        raise ValueError("position_ids: the first token does not start a sequence (its position id is not the "
                         "row's smallest)")
    max_seqlen = int(cu.diff().max())
    return SeqLens(cu, cu, max_seqlen, max_seqlen)


def seqlens_from_sequence_ids(sequence_ids: torch.Tensor) -> SeqLens:
    """Packed sequences of [B, S] sequence ids (HF's ``find_packed_sequence_indices``: equal
    neighbouring ids = same sequence), over the flattened B * S tokens; a sequence never crosses a
    row.  One host synchronisation (the longest sequence)."""
    if not isinstance(sequence_ids, torch.Tensor) or sequence_ids.dim() != 2:
        shape = list(sequence_ids.shape) if isinstance(sequence_ids, torch.Tensor) else type(sequence_ids).__name__
        raise ValueError(f"sequence_ids: expected [B, S], got {shape}")
    B, S = sequence_ids.shape
    new = torch.ones_like(sequence_ids, dtype=torch.bool)
    new[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    starts = torch.nonzero(new.reshape(-1), as_tuple=False).reshape(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([B * S], dtype=torch.int32, device=sequence_ids.device)])
    max_seqlen = int(cu.diff().max()) if B * S > 0 else 0
    return SeqLens(cu, cu, max_seqlen, max_seqlen)
