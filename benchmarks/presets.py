"""Benchmark cases and the named presets of ``python -m benchmarks --preset NAME``.

A ``Case`` is one measured configuration (shape, dtype, padding fill, causal, dropout, mode);
every method (fused backends and baselines) is timed on it.  ``panel`` and ``x`` only say how
the case is plotted: cases sharing a panel and a mode form one figure, with ``x`` on its axis.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Tuple

MODES = ("fwd", "bwd", "fwd+bwd")

# Methods, in the order they are timed and shown.  "fused" expands to one "fused_<backend>" per
# available engine (triton, cuda, cpu), "varlen" to one "varlen_<backend>" (the packed-batch API
# on the batch's real tokens); "reference" is timed on CPU only unless asked for.  "sdpa_loop":
# SDPA without a mask, one call per sequence on its real tokens; "flex_doc": FlexAttention on the
# packed tokens with a document mask.
METHODS = ("fused", "varlen", "eager", "sdpa_mask", "sdpa_nomask", "sdpa_loop", "flex", "flex_doc", "reference")
BASELINES = ("eager", "sdpa_mask", "sdpa_nomask", "sdpa_loop", "flex", "flex_doc", "reference")


@dataclass(frozen=True)
class Case:
    panel: str
    x: str                      # the Case field swept along the plot's x axis
    B: int
    H: int
    S: int
    D: int
    dtype: str = "fp16"         # "fp16" | "bf16" | "fp32" | "auto" (fp16 on GPU, fp32 on CPU)
    fill: str = "uniform"       # "uniform" (lengths U[1, S]) | "full" | a mean fill such as "0.5"
    causal: bool = False
    dropout: float = 0.0
    mode: str = "fwd"

    @property
    def x_value(self):
        return getattr(self, self.x)

    def data_key(self) -> Tuple:
        """Cases with the same data key get identical inputs (modes share data and checks)."""
        return (self.B, self.H, self.S, self.D, self.dtype, self.fill, self.causal)


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    device: str                 # "cuda": GPU sizes (refused on CPU without --force) | "any"
    cases: Tuple[Case, ...]
    methods: Tuple[str, ...] = METHODS
    cpu_min_time: float = 0.2   # seconds per CPU measurement (torch.utils.benchmark)


def _modes(cases: Iterable[Case], modes: Iterable[str]) -> List[Case]:
    return [replace(c, mode=m) for m in modes for c in cases]


def _fwd_target() -> List[Case]:
    return [Case(f"fill={fill}", "S", 32, 12, S, 64, fill=fill)
            for fill in ("uniform", "full") for S in (128, 512)]


def _train_target() -> List[Case]:
    out = []
    for p in (0.0, 0.1):
        out += [Case(f"fill={fill} p={p}", "S", 32, 12, S, 64, fill=fill, dropout=p, mode="fwd+bwd")
                for fill in ("uniform", "full") for S in (128, 512)]
    # the training forward with dropout (SDPA with dropout_p=0.1; flex has no dropout)
    out += [Case("fill=uniform p=0.1", "S", 32, 12, S, 64, dropout=0.1, mode="fwd") for S in (128, 512)]
    for p in (0.0, 0.1):
        out += [Case(f"D=128 fill=uniform p={p}", "S", B, 12, S, 128, dropout=p, mode="fwd+bwd")
                for B, S in ((32, 2048), (8, 4096))]
    return out


def _bert(H: int, D: int) -> List[Case]:
    base = [Case(f"fill={fill}", "S", 32, H, S, D, fill=fill)
            for fill in ("uniform", "0.5", "full") for S in (128, 512)]
    return _modes(base, ("fwd", "fwd+bwd"))


def _long() -> List[Case]:
    # constant token count (B * S = 16384), lengths U[1, S]
    base = [Case(f"D={D} B*S=16384", "S", 16384 // S, 12, S, D)
            for D in (64, 128) for S in (1024, 2048, 4096, 8192)]
    return _modes(base, ("fwd", "fwd+bwd"))


def _sweep(mode: str) -> List[Case]:
    """One axis at a time around BERT-base at S=512 (B=32, H=12, D=64, fp16, lengths U[1, S])."""
    b = Case("", "S", 32, 12, 512, 64)
    base = [replace(b, panel="seq len (B*S=16384)", x="S", B=16384 // S, S=S) for S in (128, 256, 512, 1024, 2048)]
    base += [replace(b, panel="padding fill", x="fill", fill=f) for f in ("0.125", "0.25", "0.5", "0.75", "full")]
    base += [replace(b, panel="causal", x="causal", causal=c) for c in (False, True)]
    base += [replace(b, panel="head dim", x="D", D=d) for d in (32, 64, 80, 96, 128)]
    base += [replace(b, panel="dtype", x="dtype", dtype=t) for t in ("fp16", "bf16", "fp32")]
    base += [replace(b, panel="batch", x="B", B=n) for n in (1, 8, 32, 64)]
    return _modes(base, (mode,))


def _cpu_small() -> List[Case]:
    base = [Case(f"fill={fill}", "S", 4, 12, S, 64, dtype="fp32", fill=fill)
            for fill in ("uniform", "full") for S in (128, 256)]
    return _modes(base, ("fwd", "fwd+bwd"))


def _varlen(B: int, dtype: str) -> List[Case]:
    return _modes([Case("fill=uniform", "S", B, 12, 512, 64, dtype=dtype)], ("fwd", "fwd+bwd"))


VARLEN_METHODS = ("fused", "varlen", "sdpa_mask", "sdpa_loop", "flex", "flex_doc")


def select(cases: Iterable[Case], spec: str) -> List[Case]:
    """The cases whose fields match every KEY=VALUE of a comma list ("S=512,fill=uniform,D=64";
    values compared as the field's type reads them)."""
    want = []
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in Case.__dataclass_fields__:
            raise ValueError(f"--cases: expected KEY=VALUE with KEY one of {', '.join(Case.__dataclass_fields__)}, "
                             f"got {item!r}")
        want.append((key, value))

    def matches(c: Case) -> bool:
        for key, value in want:
            have = getattr(c, key)
            if isinstance(have, bool):
                ok = value.lower() in (("1", "true") if have else ("0", "false"))
            elif isinstance(have, (int, float)):
                ok = float(value) == have
            else:
                ok = value == have
            if not ok:
                return False
        return True
    return [c for c in cases if matches(c)]


def _tiny() -> List[Case]:
    return _modes([Case("fill=uniform", "S", 2, 2, S, 16, dtype="fp32") for S in (16, 40)], ("fwd", "fwd+bwd"))


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("fwd-target", "headline forward comparison: B=32 H=12 D=64 fp16, S 128/512, lengths U[1,S] "
           "and full; fused vs eager, SDPA (bool mask / no mask), FlexAttention", "cuda",
           tuple(_fwd_target()), methods=("fused", "eager", "sdpa_mask", "sdpa_nomask", "flex")),
    Preset("train-target", "headline training comparison: fwd+bwd of the fwd-target shapes with and "
           "without dropout 0.1, plus S=2048 (B=32) and S=4096 (B=8) at D=128", "cuda",
           tuple(_train_target()), methods=("fused", "eager", "sdpa_mask", "sdpa_nomask", "flex")),
    Preset("bert-base", "BERT-base attention (B=32 H=12 D=64 fp16), S 128/512, fills U[1,S] / "
           "0.5 / full, fwd and fwd+bwd", "cuda", tuple(_bert(12, 64))),
    Preset("bert-large", "BERT-large attention (B=32 H=16 D=64 fp16), S 128/512, fills U[1,S] / "
           "0.5 / full, fwd and fwd+bwd", "cuda", tuple(_bert(16, 64))),
    Preset("long", "long encoders: S 1024..8192 at B*S=16384, D 64/128, fp16, lengths U[1,S], "
           "fwd and fwd+bwd", "cuda", tuple(_long())),
    Preset("sweep", "one axis at a time around BERT-base S=512: seq len, padding fill, causal, "
           "head dim, dtype, batch; fwd", "cuda", tuple(_sweep("fwd"))),
    Preset("sweep-train", "the sweep grid in fwd+bwd (--modes bwd for the backward alone)", "cuda",
           tuple(_sweep("fwd+bwd"))),
    Preset("cpu-small", "small CPU run: B=4 H=12 D=64 fp32, S 128/256, U[1,S] and full, fwd and "
           "fwd+bwd", "any", tuple(_cpu_small())),
    Preset("cpu-target", "headline CPU comparison: B=8 H=12 S=512 D=64 fp32, lengths U[1,S]; the C++ "
           "CPU kernel vs eager and SDPA with the same mask, fwd and fwd+bwd", "any",
           tuple(_modes([Case("fill=uniform", "S", 8, 12, 512, 64, dtype="fp32")], ("fwd", "fwd+bwd"))),
           methods=("fused", "eager", "sdpa_mask", "sdpa_nomask")),
    Preset("varlen", "packed batches on the GPU: B=32 H=12 S=512 D=64 fp16, lengths U[1,S]; varlen_attention on "
           "the real tokens vs the padded kernel, SDPA with the mask, SDPA per sequence, FlexAttention "
           "(padding mask; document mask on the packed tokens), fwd and fwd+bwd", "cuda",
           tuple(_varlen(32, "fp16")), methods=VARLEN_METHODS),
    Preset("cpu-varlen", "packed batches on the CPU: B=8 H=12 S=512 D=64 fp32, lengths U[1,S]; varlen_attention vs "
           "the padded C++ kernel, SDPA with the mask and SDPA per sequence, fwd and fwd+bwd", "any",
           tuple(_varlen(8, "fp32")), methods=("fused", "varlen", "sdpa_mask", "sdpa_loop")),
    Preset("demo", "the make-demo shape: B=8 H=12 S=128 D=64, lengths U[1,S], fwd (fp32 on CPU, "
           "fp16 on GPU)", "any", (Case("fill=uniform", "S", 8, 12, 128, 64, dtype="auto"),)),
    Preset("tiny", "seconds-long smoke run (tests): B=2 H=2 D=16 fp32, S 16/40, fwd and fwd+bwd",
           "any", tuple(_tiny()), cpu_min_time=0.02),
)}
