"""Timers, peak memory and the environment stamp written into every result file.

GPU: triton.testing.do_bench (L2 flushed between calls; median and 20/80% quantiles).
CPU: torch.utils.benchmark.Timer.blocked_autorange with all intra-op threads.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch

QUANTILES = (0.5, 0.2, 0.8)


def pick_device(name: str, threads: Optional[int] = None) -> torch.device:
    """--device ("auto": the GPU when there is one) and --threads (CPU intra-op threads)."""
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.2,
          warmup_ms: int = 25, rep_ms: int = 100) -> Tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) of one call, in milliseconds."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001 - no Triton: plain CUDA events
            do_bench = None
        if do_bench is not None:
            med, lo, hi = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
            return float(med), float(lo), float(hi)
        return _cuda_events(fn, device, rep_ms)
    from torch.utils import benchmark
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    times = sorted(t * 1e3 for t in m.times)
    return _quantiles(times)


def _quantiles(times_ms) -> Tuple[float, float, float]:
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    qs = statistics.quantiles(times_ms, n=10, method="inclusive")   # deciles
    return statistics.median(times_ms), qs[1], qs[7]


def _cuda_events(fn, device, rep_ms) -> Tuple[float, float, float]:
    fn()
    sync(device)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < deadline or len(times) < 10:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _quantiles(sorted(times))


def wall_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median wall time of a one-off set-up step (mask builds), synchronised, in ms."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates on top of what already exists (its inputs), in MiB.
    None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - base) / 2 ** 20


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, str]:
    """What produced the numbers: device name, versions, date; one column each in the CSV."""
    import fused_attn
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - Triton is optional on CPU
        triton_version = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        threads = ""
    else:
        name = _cpu_name()
        threads = str(torch.get_num_threads())
    return {
        "device_name": name,
        "cpu_threads": threads,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": triton_version,
        "fused_attn": fused_attn.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
