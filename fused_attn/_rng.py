"""Seeds for in-kernel dropout, drawn from torch's generator for the tensor's device.

CUDA: (initial seed, current Philox offset) of the device's default generator, whose offset is
then advanced past the numbers this call uses -- what PyTorch's own fused dropout kernels do --
so consecutive calls differ and ``torch.manual_seed`` repeats a run.  CPU (Triton interpreter,
C++ kernel): two 63-bit integers drawn from the CPU default generator, for the same guarantees.
"""
from __future__ import annotations

from typing import Tuple

import torch


def philox_seed_offset(device: torch.device, numel: int) -> Tuple[int, int]:
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        seed = gen.initial_seed() & (2**63 - 1)   # kernels take a signed 64-bit seed
        offset = gen.get_offset()
        # PyTorch's Philox users advance in multiples of 4 (one Philox call yields 4 numbers)
        gen.set_offset(offset + ((numel + 3) // 4) * 4)
        return seed, offset
    drawn = torch.randint(0, 2**62, (2,), dtype=torch.int64, device="cpu")
    return int(drawn[0]), int(drawn[1])
