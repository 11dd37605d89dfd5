"""The dropout RNG state: a (seed, offset) pair in an int64 tensor [2] on the attention's device.

Every kernel reads its Philox key and counter from that tensor (Triton: ``tl.load``; CUDA: in the
kernel; C++ CPU kernel: on the host from the CPU tensor), so no host code ever looks at the values.
They are drawn with ``torch.randint`` on the device: torch's own random ops are what CUDA graphs
know how to replay -- under capture torch registers the device generator with the graph and
every replay advances its Philox offset, so a captured (or ``torch.compile(mode="reduce-overhead")``)
training step draws a fresh pair on each replay.  ``torch.manual_seed`` repeats a run and
consecutive calls differ, as for torch's own dropout.

Why not the generator's own (seed, offset): PyTorch's fused kernels get them graph-safely only in
C++ (``philox_cuda_state`` on the host, ``at::cuda::philox::unpack`` in the kernel).  Python has the
host values ``initial_seed()`` / ``get_offset()``, which a captured graph would freeze (and whose
read breaks capture), and whole generator states (``graphsafe_get_state()``, for registering extra
generators with a graph), not the device seed / offset.  A C++ helper op would tie the Triton engine
to the compiled extension; one tiny randint kernel per call does not.
"""
from __future__ import annotations

import torch

# both halves of the pair are 62-bit: the kernels split each into two 31-bit Philox words
RNG_BOUND = 2**62


def philox_rng(device: torch.device) -> torch.Tensor:
    """A fresh (seed, offset) pair for one attention call: int64 [2] on ``device``, drawn from
    the device's default generator."""
    return torch.randint(0, RNG_BOUND, (2,), dtype=torch.int64, device=device)


def rng_tensor(seed: int, offset: int, device) -> torch.Tensor:
    """The RNG tensor holding given (seed, offset) values (testing: a keep-mask for known values)."""
    for name, x in (("seed", seed), ("offset", offset)):
        if not 0 <= int(x) < RNG_BOUND:
            raise ValueError(f"dropout rng: {name} must be in [0, 2**62), got {x}")
    return torch.tensor([int(seed), int(offset)], dtype=torch.int64, device=device)


def check_rng(rng: torch.Tensor, device: torch.device) -> None:
    """The launchers' check: an int64 tensor [2] (seed, offset), contiguous, on ``device``."""
    if not isinstance(rng, torch.Tensor):
        raise TypeError(f"dropout rng: expected an int64 tensor [2] (seed, offset), got {type(rng).__name__}")
    if rng.dtype != torch.int64 or rng.shape != (2,) or not rng.is_contiguous() or rng.device != device:
        raise ValueError(f"dropout rng: expected a contiguous int64 tensor [2] (seed, offset) on {device}, got "
                         f"{rng.dtype} {tuple(rng.shape)} on {rng.device}")
