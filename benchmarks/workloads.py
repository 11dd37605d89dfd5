"""Inputs, the timed methods (fused backends and baselines), mode runners, FLOPs and the
correctness check of every method against fused_attn.reference.

Everything a timed call needs (masks in each baseline's own format, FlexAttention's BlockMask,
fused_attn's reduced mask) is built here, outside the timed region.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import backends

from .presets import Case
from .timing import wall_ms

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FUSED_ENGINES = ("triton", "cuda", "cpu")
# Absolute floor of docs/design.md's tolerance rule (same values as tests/_utils.py).
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 2e-5}
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


class Skip(Exception):
    """A method that cannot run this case; the message says why (recorded in the CSV)."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def draw_lengths(B: int, S: int, fill: str, g: torch.Generator) -> torch.Tensor:
    """Per-example token counts: "uniform" U[1, S]; "full" all S; a fraction f: uniform on the
    widest interval inside [1, S] with mean f * S."""
    if fill == "full":
        return torch.full((B,), S, dtype=torch.long)
    if fill == "uniform":
        return torch.randint(1, S + 1, (B,), generator=g)
    f = float(fill)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"fill: expected 'uniform', 'full' or a fraction in (0, 1], got {fill!r}")
    mean = max(1.0, f * S)
    half = min(mean - 1.0, S - mean)
    lo, hi = int(round(mean - half)), int(round(mean + half))
    return torch.randint(max(lo, 1), min(hi, S) + 1, (B,), generator=g)


def visible_pairs(lengths: torch.Tensor, S: int, H: int, causal: bool) -> int:
    """Number of (query, key) pairs the mask lets through, over all batches and heads (every
    query row is computed, padded rows included, as HF eager does)."""
    L = lengths.to(torch.long)
    per_b = L * (L + 1) // 2 + (S - L) * L if causal else S * L
    return int(per_b.sum().item()) * H


def flops(case: Case, pairs: int) -> float:
    """Useful work: 4 * D per visible pair for the forward (QK^T and PV), x2.5 for the backward."""
    return 4.0 * case.D * pairs * MODE_FLOP_FACTOR[case.mode]


@dataclass
class Inputs:
    case: Case
    device: torch.device
    dtype: torch.dtype
    q: torch.Tensor               # [B, H, S, D] (a transposed view of [B, S, H, D] for layout "bshd")
    k: torch.Tensor
    v: torch.Tensor
    leaves: Tuple[torch.Tensor, ...]
    do: torch.Tensor              # shared upstream gradient
    lengths: torch.Tensor         # [B] long, CPU
    key_mask: torch.Tensor        # [B, S] bool, True = real token (what fused_attn gets)
    sdpa_mask: torch.Tensor       # bool, [B, 1, 1, S] or [B, 1, S, S] with causal
    eager_mask: torch.Tensor      # additive, same shape, finfo(dtype).min where hidden (HF eager)
    pairs: int
    scale: float
    layout: str

    def packed(self) -> "Packed":
        """The same batch as packed real tokens (built once, outside any timing)."""
        if getattr(self, "_packed", None) is None:
            self._packed = make_packed(self)
        return self._packed

    def heads(self, leaves: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        """[B, H, S, D] views of tensors laid out like ``leaves``."""
        return tuple(t.transpose(1, 2) for t in leaves) if self.layout == "bshd" else tuple(leaves)

    @property
    def hides_keys(self) -> bool:
        return bool((self.lengths < self.case.S).any())


@dataclass
class Packed:
    """The real tokens of an Inputs batch, packed: q / k / v [T, H, D] (leaves), cu_seqlens."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    cu_seqlens: torch.Tensor      # int32 [B + 1] on the device
    max_seqlen: int
    rows: torch.Tensor            # [T] (batch, position) of each packed row, as b * S + s

    def to_padded_rows(self, out: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out, ref) on the real tokens only: ref [B, H, S, D] gathered to [T, H, D]."""
        B, H, S, D = ref.shape
        return out, ref.transpose(1, 2).reshape(B * S, H, D)[self.rows]


def make_packed(inp: "Inputs") -> Packed:
    B, H, S, D = inp.q.shape
    rows = torch.nonzero(inp.key_mask.reshape(-1), as_tuple=True)[0]

    def pack(t):                    # [B, H, S, D] -> [T, H, D]
        return t.detach().transpose(1, 2).reshape(B * S, H, D)[rows].contiguous()

    q, k, v = (pack(t).requires_grad_() for t in (inp.q, inp.k, inp.v))
    lens = inp.lengths.to(torch.int32)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0, dtype=torch.int32)]).to(inp.device)
    return Packed(q, k, v, pack(inp.do), cu, int(lens.max()), rows)


def case_seed(case: Case, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(repr(case.data_key()).encode())) % (2 ** 31)


def make_inputs(case: Case, device: torch.device, layout: str = "bshd", seed: int = 0) -> Inputs:
    """Random q, k, v (never zeros), random padding lengths and every method's mask, seeded by
    the case's data so that its modes and reruns see identical data."""
    B, H, S, D = case.B, case.H, case.S, case.D
    dtype = resolve_dtype(case.dtype, device)
    s = case_seed(case, seed)
    lengths = draw_lengths(B, S, case.fill, torch.Generator().manual_seed(s))
    g = torch.Generator(device=device).manual_seed(s)

    def rand(shape):
        return torch.randn(shape, device=device, dtype=torch.float32, generator=g).to(dtype)

    if layout == "bshd":            # HF's projections viewed as heads: [B, S, H, D] -> [B, H, S, D]
        leaves = tuple(rand((B, S, H, D)).requires_grad_() for _ in range(3))
        q, k, v = (t.transpose(1, 2) for t in leaves)
    elif layout == "bhsd":
        leaves = tuple(rand((B, H, S, D)).requires_grad_() for _ in range(3))
        q, k, v = leaves
    else:
        raise ValueError(f"layout: expected 'bshd' or 'bhsd', got {layout!r}")
    do = rand((B, H, S, D))
    key_mask = torch.arange(S, device=device)[None, :] < lengths.to(device)[:, None]
    vis = key_mask[:, None, None, :]
    if case.causal:
        tri = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        vis = vis & tri[None, None]
    eager_mask = torch.zeros(vis.shape, device=device, dtype=dtype).masked_fill(~vis, torch.finfo(dtype).min)
    return Inputs(case, device, dtype, q, k, v, leaves, do, lengths, key_mask, vis, eager_mask,
                  visible_pairs(lengths, S, H, case.causal), D ** -0.5, layout)


# -- methods: each returns a forward callable f(q, k, v) -> out on prepared masks

@dataclass
class Method:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    build_ms: Optional[float] = None   # mask set-up cost, paid once per mask (not timed per call)
    masked: bool = True                # False: ignores the padding (sdpa_nomask), not checked
    packed: Optional[Packed] = None    # set: fn takes the packed tokens, not the padded batch

    def args(self, inp: "Inputs"):
        """(q, k, v, leaves, do) this method runs on."""
        if self.packed is not None:
            p = self.packed
            return p.q, p.k, p.v, (p.q, p.k, p.v), p.do
        return inp.q, inp.k, inp.v, inp.leaves, inp.do


def hf_eager(q, k, v, additive_mask, scale, dropout_p=0.0):
    """Hugging Face's eager attention math (BERT's eager_attention_forward), in q's dtype."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def fused_methods(q: torch.Tensor, prefix: str = "fused") -> List[Tuple[str, Optional[str]]]:
    """("<prefix>_<engine>", reason or None) for every engine; the interpreter is never timed."""
    out = []
    for name in FUSED_ENGINES:
        why = backends.reasons(name, q)
        if not why and name == "triton" and q.device.type != "cuda":
            why = ["Triton's interpreter on CPU is a correctness tool, not timed"]
        out.append((f"{prefix}_{name}", "; ".join(why) if why else None))
    return out


_FLEX: Dict[str, object] = {}


def _flex():
    """(compiled flex_attention, create_block_mask), compiled once per process."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except Exception as e:  # noqa: BLE001 - old torch: no FlexAttention
            raise Skip(f"FlexAttention unavailable ({type(e).__name__}: {e})")
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):      # every new shape recompiles; never fall back to eager
                setattr(cfg, name, max(getattr(cfg, name), 4096))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        _FLEX["block_mask"] = create_block_mask
    return _FLEX["fn"], _FLEX["block_mask"]


def build_method(name: str, inp: Inputs) -> Method:
    c = inp.case
    p = c.dropout
    if name.startswith("fused_"):
        engine = name[len("fused_"):]
        mask = inp.key_mask
        clones = [mask.clone() for _ in range(6)]
        build = wall_ms(lambda: fused_attn.reduce_mask(clones.pop(), c.B, c.H, c.S, c.S, device=inp.device),
                        inp.device, reps=5)
        return Method(name, lambda q, k, v: fused_attn.attention(q, k, v, mask, causal=c.causal, dropout_p=p,
                                                                 backend=engine), build)
    if name.startswith("varlen_"):
        engine, pk = name[len("varlen_"):], inp.packed()
        return Method(name, lambda q, k, v: fused_attn.varlen_attention(
            q, k, v, pk.cu_seqlens, pk.cu_seqlens, pk.max_seqlen, pk.max_seqlen, dropout_p=p, causal=c.causal,
            backend=engine), packed=pk)
    if name == "sdpa_loop":
        pk = inp.packed()
        cu = pk.cu_seqlens.tolist()

        def loop(q, k, v):          # one SDPA call per sequence on its real tokens, no mask
            outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), dropout_p=p,
                                                   is_causal=c.causal).transpose(0, 1)
                    for a, b in zip(cu, cu[1:])]
            return torch.cat(outs)
        return Method(name, loop, packed=pk)
    if name == "eager":
        return Method(name, lambda q, k, v: hf_eager(q, k, v, inp.eager_mask, inp.scale, p))
    if name == "sdpa_mask":
        return Method(name, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=inp.sdpa_mask,
                                                                           dropout_p=p))
    if name == "sdpa_nomask":
        return Method(name, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                                                           is_causal=c.causal),
                      masked=not inp.hides_keys)
    if name == "reference":
        mask = inp.key_mask
        return Method(name, lambda q, k, v: fused_attn.reference.attention(q, k, v, mask, causal=c.causal,
                                                                           dropout_p=p))
    if name == "flex":
        if p > 0.0:
            raise Skip("FlexAttention has no dropout")
        if inp.device.type != "cuda":
            raise Skip("FlexAttention is only benchmarked on CUDA (CPU compile cost)")
        flex, create_block_mask = _flex()
        lens = inp.lengths.to(inp.device)

        if c.causal:
            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx < lens[b]) & (kv_idx <= q_idx)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx < lens[b]

        def build_block_mask():
            return create_block_mask(mask_mod, c.B, None, c.S, c.S, device=inp.device)

        block_mask = build_block_mask()
        build = wall_ms(build_block_mask, inp.device, reps=3)
        return Method(name, lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=inp.scale), build)
    if name == "flex_doc":
        if p > 0.0:
            raise Skip("FlexAttention has no dropout")
        if inp.device.type != "cuda":
            raise Skip("FlexAttention is only benchmarked on CUDA (CPU compile cost)")
        flex, create_block_mask = _flex()
        pk = inp.packed()
        T = pk.q.shape[0]
        doc = torch.repeat_interleave(torch.arange(c.B, device=inp.device),
                                      (pk.cu_seqlens[1:] - pk.cu_seqlens[:-1]).long(), output_size=T)
        start = pk.cu_seqlens[:-1].long()[doc]

        def doc_mask(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return same & (kv_idx - start[kv_idx] <= q_idx - start[q_idx]) if c.causal else same

        def build_doc_mask():
            return create_block_mask(doc_mask, None, None, T, T, device=inp.device)

        block_mask = build_doc_mask()
        build = wall_ms(build_doc_mask, inp.device, reps=3)

        def run(q, k, v):           # [T, H, D] -> [1, H, T, D] views, one "document" per sequence
            out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask, scale=inp.scale)
            return out[0].transpose(0, 1)
        return Method(name, run, build, packed=pk)
    raise ValueError(f"unknown method {name!r}")


# -- modes

def runners(method: Method, inp: Inputs, mode: str) -> Tuple[Callable[[], object], Callable[[], object]]:
    """(timed callable, from-scratch callable for the peak-memory measurement).

    fwd: inference forward under no_grad.  fwd+bwd: forward then gradients of q, k, v.
    bwd: gradients only, from one retained forward graph (built here, outside the timing).
    """
    f = method.fn
    q, k, v, leaves, do = method.args(inp)

    def fwd():
        with torch.no_grad():
            return f(q, k, v)

    def fwd_bwd():
        return torch.autograd.grad(f(q, k, v), leaves, do)

    if mode == "fwd":
        return fwd, fwd
    if mode == "fwd+bwd":
        return fwd_bwd, fwd_bwd
    if mode == "bwd":
        out = f(q, k, v)

        def bwd():
            return torch.autograd.grad(out, leaves, do, retain_graph=True)
        return bwd, fwd_bwd
    raise ValueError(f"mode: expected one of fwd, bwd, fwd+bwd, got {mode!r}")


# -- correctness

def oracle(inp: Inputs) -> torch.Tensor:
    """fused_attn.reference in fp32, a few batch rows at a time (bounded memory at long S)."""
    c = inp.case
    step = max(1, (1 << 28) // (c.H * c.S * c.S))
    outs = []
    with torch.no_grad():
        for b in range(0, c.B, step):
            sl = slice(b, b + step)
            outs.append(fused_attn.reference.attention(inp.q[sl].float(), inp.k[sl].float(), inp.v[sl].float(),
                                                       inp.key_mask[sl], causal=c.causal))
    return torch.cat(outs)


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.float() - ref).abs().max().item()
    return err if torch.isfinite(out).all().item() else float("nan")


def tolerance(inp: Inputs, ref: torch.Tensor) -> float:
    """docs/design.md: a kernel's error may be at most 2x same-dtype eager's error + a floor."""
    with torch.no_grad():
        eager = hf_eager(inp.q, inp.k, inp.v, inp.eager_mask, inp.scale)
    return 2.0 * max_error(eager, ref) + FLOOR[inp.dtype]
