"""The env step of benchmarks/gpu_check.py: where and with what the numbers were measured.

    python -m benchmarks.gpu_env --out env.json

Device (nvidia-smi and torch), driver, date, Python / torch / CUDA / triton / transformers
versions, the repository's commit; the components of Triton's cache key (benchmarks/triton_cache.py)
compared with the prebuilt cache's manifest ($FUSED_ATTN_TRITON_PREBUILT_MANIFEST), and whether
the logging cache manager loads ($TRITON_CACHE_MANAGER).  Works without a GPU (device fields empty).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(args, timeout=20):
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def collect() -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "platform": platform.platform(),
           "commit": _cmd(["git", "rev-parse", "--short", "HEAD"]),
           "nvidia_smi": _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                               "temperature.gpu,power.draw,pstate", "--format=csv,noheader"])}
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    for mod in ("triton", "transformers", "fused_attn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"not importable: {type(e).__name__}: {e}"
    from benchmarks.gpu_check import _find_exe
    env["compute_sanitizer"] = _find_exe("compute-sanitizer")
    env["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR")
    try:
        from benchmarks import triton_cache
        env["triton_keys"] = triton_cache.key_parts()
    except Exception as e:  # noqa: BLE001
        env["triton_keys"] = {"error": f"{type(e).__name__}: {e}"}
    manifest_path = os.environ.get("FUSED_ATTN_TRITON_PREBUILT_MANIFEST")
    if manifest_path and os.path.exists(manifest_path) and "error" not in env["triton_keys"]:
        with open(manifest_path) as f:
            manifest = json.load(f)
        from benchmarks import triton_cache
        env["prebuilt_mismatch"] = triton_cache.compare(manifest, env["triton_keys"])
    if os.environ.get("TRITON_CACHE_MANAGER"):
        try:
            from triton import knobs
            env["cache_log_ok"] = knobs.cache.manager_class.__name__ == "LoggingCacheManager"
        except Exception as e:  # noqa: BLE001
            env["cache_log_ok"] = False
            env["cache_log_error"] = f"{type(e).__name__}: {e}"
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    env = collect()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(env, f, indent=1, sort_keys=True)
    for k in sorted(env):
        v = env[k]
        print(f"{k}: {json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
