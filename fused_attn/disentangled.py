"""DeBERTa's disentangled score (``fused_attn.DisentangledBias``): two relative-position tables
gathered into the attention score inside the kernels (docs/design.md, "Disentangled score").

The score of query i and key j is ``(q_i·k_j + c2p[i, c] + p2c[j, c]) * scale`` with the column
``c = index[i - j + Sk - 1]`` (a missing table adds nothing); then the mask, softmax, dropout, @ v.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._checks import _shape


class DisentangledBias(NamedTuple):
    """The relative-position terms of DeBERTa's disentangled attention.

    - ``c2p``: [B, H, Sq, P] (varlen: [Tq, H, P]), content -> position, ``q · krᵀ`` unscaled;
    - ``p2c``: [B, H, Sk, P] (varlen: [Tk, H, P]), position -> content, ``k · qrᵀ`` unscaled;
    - ``index``: integer [Sq + Sk - 1] (varlen: [max_seqlen_q + max_seqlen_k - 1]) on q's device,
      values in [0, P): the column of query i and key j is ``index[i - j + Sk - 1]`` (varlen:
      Sk = max_seqlen_k, i and j positions inside their sequence).

    Either table may be None.  Tables are q's dtype or fp32; both are differentiable.
    """

    c2p: Optional[torch.Tensor]
    p2c: Optional[torch.Tensor]
    index: torch.Tensor


def check_rel_bias(rel_bias, q: torch.Tensor, q_rows: int, k_rows: int, heads: int, batch: Optional[int],
                   q_len: int, k_len: int) -> Optional[DisentangledBias]:
    """Validate rel_bias for a call with q_rows / k_rows rows per (batch, head) (padded: Sq / Sk;
    varlen, batch None: Tq / Tk) and positions q_len / k_len (varlen: max_seqlen_q / _k).
    Returns None when there is nothing to add (rel_bias None, or neither table given)."""
    if rel_bias is None:
        return None
    if not isinstance(rel_bias, DisentangledBias):
        raise TypeError(f"rel_bias: expected a fused_attn.DisentangledBias or None, got {type(rel_bias).__name__}")
    c2p, p2c, index = rel_bias
    if c2p is None and p2c is None:
        return None
    packed = batch is None
    width = None
    for name, t, rows in (("c2p", c2p, q_rows), ("p2c", p2c, k_rows)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rel_bias.{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        want = (rows, heads) if packed else (batch, heads, rows)
        form = "[Tq, H, P]" if packed and name == "c2p" else "[Tk, H, P]" if packed else (
            "[B, H, Sq, P]" if name == "c2p" else "[B, H, Sk, P]")
        if t.dim() != len(want) + 1 or tuple(t.shape[:-1]) != want or t.shape[-1] < 1:
            raise ValueError(f"rel_bias.{name}: expected {form} = [{', '.join(map(str, want))}, P], got "
                             f"{_shape(t)} (q {_shape(q)})")
        if width is not None and t.shape[-1] != width:
            raise ValueError(f"rel_bias: c2p {_shape(c2p)} and p2c {_shape(p2c)} have different widths P")
        width = t.shape[-1]
        if t.dtype not in (q.dtype, torch.float32, torch.float64) or (t.dtype == torch.float64 and
                                                                       q.dtype != torch.float64):
            raise TypeError(f"rel_bias.{name}: dtype {t.dtype}, expected q's dtype {q.dtype} or torch.float32")
        if t.device != q.device:
            raise ValueError(f"rel_bias.{name}: is on {t.device} but q is on {q.device}")
    n = q_len + k_len - 1
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"rel_bias.index: expected an integer torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"rel_bias.index: dtype {index.dtype}, expected an integer dtype")
    if tuple(index.shape) != (n,):
        what = "max_seqlen_q + max_seqlen_k - 1" if packed else "Sq + Sk - 1"
        raise ValueError(f"rel_bias.index: expected shape [{what}] = [{n}], got {_shape(index)}")
    if index.device != q.device:
        raise ValueError(f"rel_bias.index: is on {index.device} but q is on {q.device}")
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and n > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= width:
            raise ValueError(f"rel_bias.index: values must lie in [0, P) = [0, {width}), got [{lo}, {hi}]")
    return rel_bias


def relative_scores(rel_bias: DisentangledBias, q_len: int, k_len: int, dtype: torch.dtype,
                    index_k_len: Optional[int] = None) -> torch.Tensor:
    """c2p[..., i, c] + p2c[..., j, c] with c = index[i - j + index_k_len - 1], as [B, H, Sq, Sk]
    in `dtype` -- HF DeBERTa's two ``torch.gather`` calls (DisentangledSelfAttention.
    disentangled_attention_bias), written out.  index_k_len: the Sk the index was built for
    (varlen: max_seqlen_k); default k_len."""
    c2p, p2c, index = rel_bias
    off = (k_len if index_k_len is None else index_k_len) - 1
    i = torch.arange(q_len, device=index.device)[:, None]
    j = torch.arange(k_len, device=index.device)[None, :]
    col = index.long()[i - j + off]                              # [Sq, Sk]: the column of (i, j)
    out = 0
    if c2p is not None:                                          # c2p[b, h, i, col[i, j]]
        c2p = c2p.to(dtype)
        out = out + torch.gather(c2p, -1, col.expand(*c2p.shape[:-2], q_len, k_len))
    if p2c is not None:                                          # p2c[b, h, j, col[i, j]]
        p2c = p2c.to(dtype)
        out = out + torch.gather(p2c, -1, col.t().expand(*p2c.shape[:-2], k_len, q_len)).transpose(-1, -2)
    return out
