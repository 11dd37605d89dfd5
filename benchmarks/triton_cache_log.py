"""A Triton cache manager that logs every lookup: which compiled kernels a run found on disk and
which it had to compile.

    TRITON_CACHE_MANAGER=benchmarks.triton_cache_log:LoggingCacheManager
    FUSED_ATTN_TRITON_CACHE_LOG=/path/to/log        (one line per lookup, appended)

Triton (3.x) imports the class named by $TRITON_CACHE_MANAGER in every process that compiles,
pytest-xdist workers and Inductor's compile workers included, so the repository root must be on
PYTHONPATH.  It behaves exactly as Triton's own FileCacheManager; the log lines are

    hit  <cache dir key> <kernel name>        a compiled kernel found on disk (no compile)
    miss <cache dir key> <kernel name>        not found: Triton compiles it now
    so-hit / so-miss <key> <module>           the same for a compiled C module (Triton's launchers)

benchmarks/gpu_check.py sets both variables for every step and counts the lines
(``count``); a log that cannot be written is ignored (the lookup itself never fails because of it).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict

from triton.runtime.cache import FileCacheManager

LOG_ENV = "FUSED_ATTN_TRITON_CACHE_LOG"


def _log(kind: str, key: str, name: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    try:
        with open(path, "a") as f:     # one short write per line: appends from processes do not interleave
            f.write(f"{kind} {key} {name}\n")
    except OSError:
        pass


class LoggingCacheManager(FileCacheManager):
    """Triton's file cache, with each kernel lookup (get_group) and module lookup logged."""

    def get_group(self, filename: str):
        group = super().get_group(filename)
        hit = bool(group) and filename in group
        if filename.endswith(".json"):
            _log("hit" if hit else "miss", self.key, filename[:-len(".json")])
        return group

    def get_file(self, filename: str):
        path = super().get_file(filename)
        if filename.endswith(".so") and not filename.startswith("__grp__"):
            _log("so-hit" if path else "so-miss", self.key, filename.split(".")[0])
        return path


# Inductor's generated kernels (FlexAttention, torch.compile) are all named triton_<kind>_...;
# fused_attn's (fused_attn/backends/triton_*.py) never are
OTHER_PREFIX = "triton_"


def count(path: str) -> Dict[str, int]:
    """{'hit', 'miss' (fused_attn's kernels), 'other_hit', 'other_miss' (Inductor's), 'so_hit',
    'so_miss'} from a log; empty counts when there is no log."""
    c: Counter = Counter()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) != 3:
                    continue
                kind, _, name = parts
                if kind.startswith("so-"):
                    c["so_" + kind[3:]] += 1
                else:
                    c["other_" + kind if name.startswith(OTHER_PREFIX) else kind] += 1
    return {k: c.get(k, 0) for k in ("hit", "miss", "other_hit", "other_miss", "so_hit", "so_miss")}
