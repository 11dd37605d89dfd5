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
    elif layout == "fused-kv":                        # k, v slices of one [B, Sk, 2, H, D] tensor
        q = rnd(B, Sq, H, D).transpose(1, 2)
        kv = rnd(B, Sk, 2, H, D)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        raise ValueError(layout)
    if requires_grad:
        # leaves that keep their strides
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def random_case(seed, small=True):
    """A seeded random case: shape, layout, mask kind, causal, dtype."""
    r = random.Random(seed)
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
