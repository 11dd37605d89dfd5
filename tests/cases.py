"""Input generators shared by the forward and backward suites: masks of every accepted form,
strided q/k/v, and seeded random cases."""
from __future__ import annotations

import random

import torch

from _utils import padding_mask

MASK_KINDS = [
    "none", "pad-right", "pad-left", "pad-holes", "pad-all-hidden", "pad-int64",
    "pair", "pair-blockdiag", "4d-heads", "4d-b1-q", "hf-old-additive", "hf-finfo-additive",
    "additive-bias", "additive-4d-q-inf",
]
# More forms for the randomised cases (random_case): the remaining broadcast shapes, additive
# values at the hiding threshold, float [B, Sk] masks, non-contiguous mask views.
EXTRA_MASK_KINDS = [
    "4d-b-keys-holes", "4d-h-keys", "4d-b-q", "pair-int", "additive-2d", "additive-threshold",
    "additive-4d-finfo-pair", "additive-all-hidden", "mask-strided-2d", "mask-transposed-4d",
]
ALL_MASK_KINDS = MASK_KINDS + EXTRA_MASK_KINDS
LAYOUTS = ["contiguous", "hf", "fused-kv", "qkv-packed", "d-strided", "d-major", "expanded-kv"]


def make_mask(kind, B, H, Sq, Sk, dtype=torch.float32, device="cpu", g=None):
    """A mask of the given kind; g: torch.Generator for reproducible draws."""
    def rand(*shape):
        return torch.rand(*shape, generator=g).to(device)

    def lengths():
        return torch.randint(1, Sk + 1, (B,), generator=g)

    if kind == "none":
        return None
    if kind == "pad-right":
        return padding_mask(lengths(), Sk, device=device)
    if kind == "pad-left":
        return padding_mask(lengths(), Sk, left=True, device=device)
    if kind == "pad-holes":
        return rand(B, Sk) > 0.4
    if kind == "pad-all-hidden":
        m = padding_mask(lengths(), Sk, device=device)
        m[0] = False                                  # batch row 0 sees no key at all
        return m
    if kind == "pad-int64":
        return padding_mask(lengths(), Sk, device=device).long()
    if kind == "pair":
        m = rand(B, Sq, Sk) > 0.7
        m[:, : max(1, Sq // 5)] = False               # some query rows see nothing
        return m
    if kind == "pair-blockdiag":                      # packed sentences: block diagonal
        cuts = sorted(set(int(c) for c in torch.randint(1, max(2, min(Sq, Sk)), (3,), generator=g)))
        seg_q = torch.zeros(Sq, dtype=torch.long)
        seg_k = torch.zeros(Sk, dtype=torch.long)
        for c in cuts:
            seg_q[c:] += 1
            seg_k[c:] += 1
        m = seg_q[:, None] == seg_k[None, :]
        return m[None].expand(B, Sq, Sk).contiguous().to(device)
    if kind == "4d-heads":
        return rand(B, H, Sq, Sk) > 0.5
    if kind == "4d-b1-q":
        return rand(1, 1, Sq, Sk) > 0.3
    if kind == "hf-old-additive":                     # HF 4.x extended mask: (1 - m) * -10000
        m = padding_mask(lengths(), Sk, device=device)
        return ((1.0 - m[:, None, None, :].to(dtype)) * -10000.0)
    if kind == "hf-finfo-additive":                   # newer HF: finfo(dtype).min, [B, 1, Sq, Sk]
        m = padding_mask(lengths(), Sk, device=device)
        ext = torch.zeros(B, 1, Sq, Sk, dtype=dtype, device=device)
        return ext.masked_fill(~m[:, None, None, :], torch.finfo(dtype).min)
    if kind == "additive-bias":                       # arbitrary additive values + hidden keys
        bias = (rand(B, 1, 1, Sk) * 2 - 1).to(dtype)
        return bias.masked_fill(rand(B, 1, 1, Sk) > 0.7, -10000.0)
    if kind == "additive-4d-q-inf":
        bias = (rand(1, H, Sq, Sk) - 0.5).to(dtype)
        return bias.masked_fill(rand(1, H, Sq, Sk) > 0.6, float("-inf"))
    if kind == "4d-b-keys-holes":                     # [B, 1, 1, Sk] bool: key padding in 4D form
        return (rand(B, Sk) > 0.3)[:, None, None, :]
    if kind == "4d-h-keys":                           # [1, H, 1, Sk]: varies over heads only
        return rand(1, H, 1, Sk) > 0.4
    if kind == "4d-b-q":                              # [B, 1, Sq, Sk] bool, HF's 4D per-example mask
        return (rand(B, 1, Sq, Sk) > 0.5) & padding_mask(lengths(), Sk, device=device)[:, None, None, :]
    if kind == "pair-int":
        return (rand(B, Sq, Sk) > 0.4).to(torch.int32)
    if kind == "additive-2d":                         # float [B, Sk]: real values, -inf holes
        bias = (rand(B, Sk) * 4 - 2).to(dtype)
        return bias.masked_fill(rand(B, Sk) > 0.7, float("-inf"))
    if kind == "additive-threshold":                  # values on both sides of the -1e4 threshold
        vals = torch.tensor([0.0, -1e4, -9999.0, -10001.0, -3.5, 1.25])
        idx = torch.randint(0, len(vals), (B, 1, 1, Sk), generator=g)
        return vals[idx].to(device=device, dtype=dtype)
    if kind == "additive-4d-finfo-pair":              # [B, 1, Sq, Sk] finfo.min, some rows fully hidden
        m = rand(B, 1, Sq, Sk) > 0.5
        m[:, :, : max(1, Sq // 7)] = False
        ext = torch.zeros(B, 1, Sq, Sk, dtype=dtype, device=device)
        return ext.masked_fill(~m, torch.finfo(dtype).min)
    if kind == "additive-all-hidden":                 # every key hidden: every row outputs 0
        return torch.full((B, 1, 1, Sk), float("-inf"), dtype=dtype, device=device)
    if kind == "mask-strided-2d":                     # a [B, Sk] view with key stride 2
        return (rand(B, 2 * Sk) > 0.3)[:, ::2]
    if kind == "mask-transposed-4d":                  # [B, 1, Sq, Sk] with transposed strides
        return (rand(B, 1, Sk, Sq) > 0.4).transpose(-1, -2)
    raise ValueError(kind)


def make_qkv(B, H, Sq, Sk, D, dtype, device="cpu", layout="contiguous", requires_grad=False, g=None):
    """q [B, H, Sq, D], k/v [B, H, Sk, D] in one of several memory layouts."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "contiguous":
        q, k, v = rnd(B, H, Sq, D), rnd(B, H, Sk, D), rnd(B, H, Sk, D)
    elif layout == "hf":                              # HF: [B, S, H*D] -> view -> transpose(1, 2)
        q = rnd(B, Sq, H * D).view(B, Sq, H, D).transpose(1, 2)
        k = rnd(B, Sk, H * D).view(B, Sk, H, D).transpose(1, 2)
        v = rnd(B, Sk, H * D).view(B, Sk, H, D).transpose(1, 2)
    elif layout == "fused-kv" or (layout == "qkv-packed" and Sq != Sk):
        q = rnd(B, Sq, H, D).transpose(1, 2)          # k, v slices of one [B, Sk, 2, H, D] tensor
        kv = rnd(B, Sk, 2, H, D)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    elif layout == "qkv-packed":                      # q, k, v slices of one [B, S, 3, H, D] tensor
        qkv = rnd(B, Sq, 3, H, D)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    elif layout == "d-strided":                       # head-dim stride 2 (every other column)
        q, k, v = rnd(B, H, Sq, 2 * D)[..., ::2], rnd(B, H, Sk, 2 * D)[..., ::2], rnd(B, H, Sk, 2 * D)[..., ::2]
    elif layout == "d-major":                         # [B, H, D, S] storage, transposed
        q = rnd(B, H, D, Sq).transpose(-1, -2)
        k, v = rnd(B, H, D, Sk).transpose(-1, -2), rnd(B, H, D, Sk).transpose(-1, -2)
    elif layout == "expanded-kv":                     # k, v shared by all heads: head stride 0
        q = rnd(B, H, Sq, D)
        k, v = rnd(B, 1, Sk, D).expand(B, H, Sk, D), rnd(B, 1, Sk, D).expand(B, H, Sk, D)
    else:
        raise ValueError(layout)
    if requires_grad:
        # leaves that keep their strides
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


# Sizes random_case draws from: awkward lengths around tile edges (16, 32, 64, 128), and head
# dims 8..256 including odd ones.  "small" bounds them for engines run by an interpreter or an
# emulator on CPU.
SEQ_SMALL = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 129]
SEQ_LARGE = SEQ_SMALL + [127, 128, 200, 255, 256, 257, 333, 511, 512, 513, 777, 1000, 1025]
HEAD_DIMS = [8, 12, 16, 24, 31, 32, 40, 48, 57, 64, 72, 80, 96, 100, 112, 127, 128, 144, 160, 192, 255, 256]
FAMILIES = ["dense", "varlen"]   # varlen: packed batches (cu_seqlens), fused_attn.varlen_attention


def random_case(seed, small=True, max_head_dim=128, family="dense", extended=False):
    """A seeded random case: shape, layout, mask kind, causal, dtype.

    The default draws the suite's classic cases.  ``extended=True`` (the differential fuzzer,
    tests/fuzz_checks.py) draws from everything: Sq != Sk, head dims 8..max_head_dim (odd ones too),
    every mask form (ALL_MASK_KINDS), every layout (LAYOUTS), and adds ``dropout_p``,
    ``head_mask`` ("H" / "BH" / None), ``scale`` (None or a float) and ``grad`` (False: run the
    inference path only).  ``small`` bounds the work per case (interpreted / emulated engines).
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: not one of {FAMILIES}")
    if family == "varlen":
        return _random_varlen_extended(seed, small, max_head_dim)
    r = random.Random(seed)
    if not extended:
        sizes = [1, 7, 16, 31, 63, 65, 97, 129] if small else [1, 63, 129, 257, 511, 1000, 1025]
        return dict(
            B=r.choice([1, 2, 3]), H=r.choice([1, 2, 3]),
            Sq=r.choice(sizes), Sk=r.choice(sizes),
            D=r.choice([16, 32, 64, 80, 96, 128] if not small else [16, 32, 48, 64, 80]),
            dtype=r.choice([torch.float16, torch.bfloat16, torch.float32]),
            layout=r.choice(["contiguous", "hf", "fused-kv"]),
            mask=r.choice(MASK_KINDS),
            causal=r.random() < 0.3,
        )
    seqs = SEQ_SMALL if small else SEQ_LARGE
    # a bound on B * H * Sq * Sk (the tiles an engine walks), so that a long run stays fast on
    # average: sizes over it are drawn again
    cap = 2**13 if small else 2**18
    for _ in range(100):
        B, H = r.choice([1, 1, 2, 3, 4]), r.choice([1, 1, 2, 3, 4])
        Sq = r.choice(seqs)
        Sk = Sq if r.random() < 0.2 else r.choice(seqs)
        if B * H * Sq * Sk <= cap:
            break
    else:
        B, H, Sq, Sk = 1, 1, 17, 33
    D = r.choice([d for d in HEAD_DIMS if d <= max_head_dim])
    p = r.random()
    return dict(
        family=family, B=B, H=H, Sq=Sq, Sk=Sk, D=D,
        dtype=r.choice([torch.float16, torch.bfloat16, torch.float32]),
        layout=r.choice(LAYOUTS),
        mask=r.choice(ALL_MASK_KINDS),
        causal=r.random() < 0.3,
        dropout_p=0.0 if p < 0.8 else r.choice([0.1, 0.3, 0.6]),
        head_mask=r.choice([None] * 8 + ["H", "BH"]),
        scale=None if r.random() < 0.8 else round(r.uniform(0.02, 1.5), 3),
        grad=r.random() < 0.85,
    )


# Tile sizes (BLOCK_M, BLOCK_N) of the forward, dK/dV and dQ kernels, drawn per case for the
# interpreted Triton engine (tests/fuzz_checks.py).  The interpreter's cost is per operation, not per
# element, so a case costs about its number of programs x tiles: large tiles are cheap, small
# ones walk many block boundaries.  A quarter of the cases run the launcher's interpreter defaults (small tiles,
# every case several blocks); the others draw each kernel's tiles from the GPU's sizes (64, 128)
# and mixed ones, which also puts configurations the GPU runs under the interpreter.
INTERP_DEFAULT_TILES = ((32, 16), (16, 32), (32, 16))     # triton_backend.fwd_config / bwd_config
LARGE_TILES = [(64, 64), (128, 64), (64, 128), (128, 128), (64, 32), (32, 64)]


def random_tiles(seed):
    """((BLOCK_M, BLOCK_N) of the forward, of dK/dV, of dQ) for case seed `seed`."""
    r = random.Random(f"tiles {seed}")          # its own stream: the case's other fields do not move
    if r.random() < 0.25:
        return INTERP_DEFAULT_TILES
    return tuple(r.choice(LARGE_TILES) for _ in range(3))


def packed_lengths(B, max_len, g=None, allow_empty=True):
    """B sequence lengths in [0 or 1, max_len], with max_len itself drawn at least once."""
    lo = 0 if allow_empty else 1
    lens = torch.randint(lo, max_len + 1, (B,), generator=g).tolist()
    lens[int(torch.randint(0, B, (1,), generator=g))] = max_len
    return lens


def cu_seqlens(lengths, device="cpu"):
    """int32 [B + 1] cumulative starts of sequences with these lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


def make_packed(lens_q, lens_k, H, D, dtype, device="cpu", layout="contiguous", requires_grad=False, g=None):
    """A packed batch: q [Tq, H, D], k / v [Tk, H, D] in one of several layouts, and cu_seqlens.
    "qkv": the three slices of one [T, 3, H, D] projection (needs lens_q == lens_k); "kv": k and v
    slices of one [Tk, 2, H, D] tensor."""
    tq, tk = sum(lens_q), sum(lens_k)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "contiguous":
        q, k, v = rnd(tq, H, D), rnd(tk, H, D), rnd(tk, H, D)
    elif layout == "qkv":
        assert list(lens_q) == list(lens_k)
        qkv = rnd(tq, 3, H, D)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    elif layout == "kv":
        q = rnd(tq, H, D)
        kv = rnd(tk, 2, H, D)
        k, v = kv[:, 0], kv[:, 1]
    else:
        raise ValueError(layout)
    if requires_grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def random_varlen_case(seed, small=True):
    """A seeded random packed batch: lengths (some empty, Sq_b != Sk_b), layout, causal, dtype."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B = r.choice([1, 2, 3, 5])
    max_q = r.choice([1, 7, 31, 65] if small else [1, 63, 129, 257, 511])
    same = r.random() < 0.5
    max_k = max_q if same else r.choice([1, 9, 40, 70] if small else [1, 100, 300, 513])
    lens_q = packed_lengths(B, max_q, g)
    lens_k = list(lens_q) if same else packed_lengths(B, max_k, g)
    return dict(
        lens_q=lens_q, lens_k=lens_k, H=r.choice([1, 2, 3]),
        D=r.choice([16, 32, 48, 64, 80] if small else [16, 32, 64, 80, 96, 128]),
        dtype=r.choice([torch.float16, torch.bfloat16, torch.float32]),
        layout=r.choice(["contiguous", "qkv"] if same else ["contiguous", "kv"]),
        causal=r.random() < 0.4,
    )


def _random_varlen_extended(seed, small, max_head_dim):
    """The fuzzer's packed batches: B sequences (some empty), Sq_b != Sk_b or self-attention
    lengths, odd head dims, the packed layouts, causal, dropout, scale, inference or gradients."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed & (2**63 - 1))
    seqs = SEQ_SMALL if small else SEQ_LARGE
    cap = 2**13 if small else 2**18          # bound on H * sum(Sq_b * Sk_b)
    for _ in range(100):
        B, H = r.choice([1, 2, 3, 5, 8]), r.choice([1, 1, 2, 3, 4])
        max_q = r.choice(seqs)
        same = r.random() < 0.5
        max_k = max_q if same else r.choice(seqs)
        lens_q = packed_lengths(B, max_q, g)
        lens_k = list(lens_q) if same else packed_lengths(B, max_k, g)
        if H * sum(a * b for a, b in zip(lens_q, lens_k)) <= cap:
            break
    else:
        B, H, lens_q, lens_k, same = 2, 1, [3, 17], [3, 17], True
    p = r.random()
    return dict(
        family="varlen", B=B, H=H, lens_q=lens_q, lens_k=lens_k,
        D=r.choice([d for d in HEAD_DIMS if d <= max_head_dim]),
        dtype=r.choice([torch.float16, torch.bfloat16, torch.float32]),
        layout=r.choice(["contiguous", "qkv"] if same else ["contiguous", "kv"]),
        causal=r.random() < 0.3,
        dropout_p=0.0 if p < 0.8 else r.choice([0.1, 0.3, 0.6]),
        scale=None if r.random() < 0.8 else round(r.uniform(0.02, 1.5), 3),
        grad=r.random() < 0.85,
    )
