"""Every GPU number and check in one device call: steps by value, each in its own time box.

    python -m benchmarks.gpu_check --out DIR [--bundle DIR2] [--budget 540] [--steps a,b,...]
    python -m benchmarks.gpu_check --dry-run          # the plan, its guards and time boxes; runs nothing
    make gpu-check OUT=DIR [BUNDLE=DIR2]              # the same with the machine's own `python`

For a GPU machine with torch, triton and transformers preinstalled (no venv, no network, nothing
installed).  Steps run in order (STEPS below, most valuable first); each gets
``min(its box, what is left of --budget)`` seconds and is killed with its whole process group
when that runs out.  Each step writes its log (DIR/logs/) and its CSVs under DIR as it goes;
after every step DIR/summary.md and DIR/steps.csv are rewritten and, with --bundle, copied there
with a tar.gz of DIR -- a call killed part-way still returns what ran.  The summary (steps, the
issue's targets against what was measured, Triton cache hits) is printed last.

Triton's cache: a prebuilt cache (--triton-cache, default .triton-prebuilt.tar.gz in the
repository, made by ``make triton-cache``: benchmarks/triton_cache.py) is installed into the cache
directory first; every step logs Triton's cache lookups (benchmarks/triton_cache_log.py), so the
summary says how many kernels each step compiled and how many it found on disk.

A step is one line of STEPS: ``step(name, box, command, what, needs=...)``.  ``needs`` are guards,
checked before the step starts; a step whose guard fails is skipped with the reason:
``cuda``; ``exe:NAME`` (a program on PATH or in $CUDA_HOME/bin); ``module:NAME`` (importable);
``api:FUNC:KEYWORD`` (fused_attn.FUNC takes KEYWORD); ``attr:NAME`` (fused_attn.NAME exists).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from benchmarks import gpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET = 540          # seconds: a device call is capped at 600, the machine's start not included
MIN_BOX = 20                  # a step is not started with less than this left
PREBUILT = os.path.join(ROOT, ".triton-prebuilt.tar.gz")
CACHE_LOG_CLASS = "benchmarks.triton_cache_log:LoggingCacheManager"


@dataclass
class Step:
    name: str
    box: Optional[float]                  # seconds; None: whatever the budget has left
    cmd: str                              # bash; {py} {out} {xdist} {repo} {sanitizer} substituted
    what: str
    needs: Tuple[str, ...] = ("cuda",)
    default: bool = True                  # False: only when named in --steps
    result: Dict = field(default_factory=dict)


def step(name, box, cmd, what, needs=("cuda",), default=True) -> Step:
    return Step(name, box, cmd, what, tuple(needs), default)


# the train-target preset's BERT-base S=512 cases in fwd and fwd+bwd, dropout 0 and 0.1 (-> train-target.csv)
KERNEL_SELECT = "S=512,D=64,fill=uniform"
KERNEL_CASES = f"--preset train-target --modes fwd,fwd+bwd --cases {KERNEL_SELECT}"


def kernel_cases():
    """The kernels step's cases (what benchmarks/triton_cache.py compiles ahead)."""
    from dataclasses import replace

    from benchmarks.presets import PRESETS, select
    base = list(dict.fromkeys(replace(c, mode="fwd") for c in PRESETS["train-target"].cases))
    return select([replace(c, mode=m) for m in ("fwd", "fwd+bwd") for c in base], KERNEL_SELECT)


PYTEST = "{py} -m pytest -q -p no:cacheprovider -o console_output_style=classic {xdist}"
STEPS: List[Step] = [
    step("env", 40, "{py} -m benchmarks.gpu_env --out {out}/env.json",
         "device, driver, date, versions; Triton cache-key components vs the prebuilt cache", needs=()),
    step("kernels", 120, "{py} -m benchmarks " + KERNEL_CASES + " --out {out}/kernels --no-plot --quiet "
         "--methods fused_triton,varlen_triton,sdpa_mask,sdpa_nomask",
         "B=32 H=12 S=512 D=64 fp16 U[1,S]: fwd and fwd+bwd, dropout 0 and 0.1; padded and varlen vs SDPA"),
    # merger: local attention / DeBERTa kernel timings (benchmarks/feature_bench.py) once the API exists
    step("local", 50, "{py} -m benchmarks.feature_bench window --out {out}/local.csv",
         "window_size=(64,64) at S=512 (B=32) and S=2048 (B=8) vs SDPA with the band mask, fwd and fwd+bwd", needs=("cuda", "api:attention:window_size")),
    # issue 22's GPU targets: the forward kernel at S=4096 vs HF's attention math, then the training step
    step("deberta", 150, "{py} -m benchmarks.deberta_kernel --device cuda --dtype fp16 --heads 12 --seq 4096 "
         "--tokens 32768 --modes inference --backend triton --out {out}/deberta_kernel.csv && "
         "{py} -m benchmarks.bench_deberta --device cuda --backend triton --configs base --seqlens 512 --batch 32 "
         "--phases train --warmup 2 --iters 10 --out {out}/deberta_train.csv",
         "DeBERTa, fp16 autocast: rel_bias forward vs HF's attention math (H=12 S=4096 B=8); deberta-v3-base "
         "B=32 S=512 U[1,S] training step, HF eager vs patched vs padding-free", needs=("cuda", "api:attention:rel_bias")),
    step("hf", 120, "{py} benchmarks/bench_hf.py --out {out}/bench_hf.csv --seqlens 512 --iters 20 "
         "--modes sdpa,fused_attn,padding_free",
         "BERT-base B=32 S=512 fp16 autocast: train step and inference, sdpa vs patched vs padding-free"),
    step("host", 30, "{py} -m benchmarks.host_cost --device cuda --rounds 5", "host time per call (µs)"),
    step("flex", 90, "{py} -m benchmarks " + KERNEL_CASES + ",dropout=0 --out {out}/flex --no-plot --quiet "
         "--methods fused_triton,varlen_triton,flex,flex_doc",
         "the kernel cases without dropout against FlexAttention (padding mask; document mask on packed tokens)"),
    step("smoke", 150, PYTEST + " -m gpu_smoke --durations=15 --junitxml={out}/smoke.xml tests",
         "the curated GPU smoke set (tests/conftest.py GPU_SMOKE)", needs=("cuda", "module:pytest")),
    step("sanitizer", 60, "{py} benchmarks/sanitize_case.py && PYTORCH_NO_CUDA_MEMORY_CACHING=1 {sanitizer} "
         "--tool memcheck --error-exitcode 9 --print-limit 20 {py} benchmarks/sanitize_case.py",
         "small padded/varlen/dropout cases checked, then again under compute-sanitizer memcheck",
         needs=("cuda", "exe:compute-sanitizer")),
    step("rest", None, PYTEST + " -m 'cuda and not gpu_smoke' -k 'not cuda-ext' --junitxml={out}/rest.xml tests",
         "the other CUDA tests (not the C++/CUDA extension's), in what time is left", needs=("cuda", "module:pytest")),
    # not in the default plan (--steps NAME): each needs most of a call of its own
    step("cuda-ext", 540, "{py} -c \"from fused_attn import _build; print('extension:', _build.load())\" && "
         + PYTEST + " -m cuda -k cuda-ext tests && {py} -m benchmarks " + KERNEL_CASES
         + " --out {out}/cuda --no-plot --quiet --methods fused_triton,fused_cuda,sdpa_mask",
         "the C++/CUDA fallback: JIT build (minutes), its tests, timed against Triton", default=False),
    step("train-target", 160, "{py} -m benchmarks --preset train-target --out {out} --no-plot --quiet "
         "--methods fused_triton,eager,sdpa_mask,sdpa_nomask,flex", "the train-target preset", default=False),
    step("deberta-sdpa", 50, "{py} -m benchmarks.feature_bench rel_bias --out {out}/deberta_sdpa.csv",
         "rel_bias (c2p + p2c) vs SDPA with the materialised bias, B=32 S=512", needs=("cuda", "api:attention:rel_bias"),
         default=False),
    step("hf-large", 200, "{py} benchmarks/bench_hf.py --models bert-large --out {out}/bench_hf_large.csv --iters 10",
         "BERT-large end to end", default=False),
]


# -- guards

def _find_exe(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    return None


def guard(need: str) -> Optional[str]:
    """None when the need is met, else why not."""
    import importlib.util
    if need == "cuda":
        import torch
        return None if torch.cuda.is_available() else "no CUDA device"
    kind, _, arg = need.partition(":")
    if kind == "exe":
        return None if _find_exe(arg) else f"{arg} not found (PATH, $CUDA_HOME/bin)"
    if kind == "module":
        return None if importlib.util.find_spec(arg) else f"module {arg} not installed"
    if kind in ("api", "attr"):
        try:
            import fused_attn
        except Exception as e:  # noqa: BLE001
            return f"fused_attn does not import: {e}"
        if kind == "attr":
            return None if hasattr(fused_attn, arg) else f"fused_attn.{arg} does not exist yet"
        import inspect
        fn_name, _, kw = arg.partition(":")
        fn = getattr(fused_attn, fn_name, None)
        if fn is None:
            return f"fused_attn.{fn_name} does not exist"
        return None if kw in inspect.signature(fn).parameters else f"fused_attn.{fn_name} has no {kw}= yet"
    return f"unknown guard {need!r}"


def substitutions(out: str) -> Dict[str, str]:
    import importlib.util
    xdist = "-n 8" if importlib.util.find_spec("xdist") else ""
    return {"py": sys.executable, "out": out, "repo": ROOT, "xdist": xdist,
            "sanitizer": _find_exe("compute-sanitizer") or "compute-sanitizer"}


# -- running one step

def _run(cmd: str, log_path: str, timeout: float, env: Dict[str, str]) -> Tuple[Optional[int], bool]:
    """(exit code, timed out) of ``bash -c cmd`` in its own process group, killed whole at the timeout."""
    with open(log_path, "ab") as log:
        p = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        _CURRENT["p"] = p
        try:
            return p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill(p)
            return p.returncode, True
        finally:
            _CURRENT["p"] = None


def _kill(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_CURRENT: Dict[str, Optional[subprocess.Popen]] = {"p": None}


def _cache_entries(cache_dir: Optional[str]) -> set:
    try:
        return set(os.listdir(cache_dir)) if cache_dir else set()
    except OSError:
        return set()


def run_step(s: Step, i: int, out: str, subs: Dict[str, str], env: Dict[str, str], left: float,
             cache_dir: Optional[str]) -> Dict:
    res = {"step": s.name, "status": "", "rc": "", "seconds": 0.0, "box": s.box, "what": s.what}
    box = left if s.box is None else min(s.box, left)
    res["box"] = round(box)
    why = next((w for w in map(guard, s.needs) if w), None)
    if why:
        res["status"] = f"skipped: {why}"
        return res
    if box < MIN_BOX:
        res["status"] = f"skipped: {left:.0f} s of the budget left"
        return res
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log = os.path.join(out, "logs", f"{i:02d}_{s.name}.log")
    cache_log = os.path.join(out, "logs", f"{i:02d}_{s.name}.triton-cache.log")
    cmd = s.cmd.format(**subs)
    with open(log, "w") as f:
        f.write(f"$ {cmd}\n# box {box:.0f} s, started {datetime.datetime.utcnow().isoformat(timespec='seconds')}Z\n")
    step_env = dict(env, FUSED_ATTN_TRITON_CACHE_LOG=cache_log)
    before = _cache_entries(cache_dir)
    t0 = time.monotonic()
    rc, timed_out = _run(cmd, log, box, step_env)
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["rc"] = "" if rc is None else rc
    res["status"] = f"timeout ({box:.0f} s)" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
    res["new_cache_dirs"] = len(_cache_entries(cache_dir) - before)
    try:
        from benchmarks.triton_cache_log import count
        res.update({f"triton_{k}": v for k, v in count(cache_log).items()})
    except ImportError:             # no triton here: nothing was looked up
        pass
    with open(log, "a") as f:       # what the step had to compile (misses of the prebuilt cache)
        f.write(f"\n# triton cache: {res['new_cache_dirs']} new entries (kernels, launchers) in {cache_dir}"
                + (f"; {gpu_summary.cache_note(res)}" if "triton_miss" in res else "") + "\n")
    res["log"] = os.path.relpath(log, out)
    return res


# -- the whole plan

def _write(out: str, results: List[Dict], meta: Dict, bundle: Optional[str]) -> str:
    text = gpu_summary.render(out, results, meta)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    cols = ["step", "status", "rc", "seconds", "box", "new_cache_dirs", "triton_hit", "triton_miss",
            "triton_other_hit", "triton_other_miss", "triton_so_hit", "triton_so_miss", "log", "what"]
    with open(os.path.join(out, "steps.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    if bundle:
        os.makedirs(bundle, exist_ok=True)
        shutil.copy(os.path.join(out, "summary.md"), os.path.join(bundle, "summary.md"))
        tmp = os.path.join(bundle, ".gpu_check.tar.gz.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname="gpu_check")
        os.replace(tmp, os.path.join(bundle, "gpu_check.tar.gz"))
    return text


def prepare_cache(prebuilt: Optional[str], out: str, env: Dict[str, str], cache_log: bool) -> Tuple[str, Dict]:
    """The Triton cache dir every step uses (the prebuilt cache installed there when there is one)."""
    cache_dir = env.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    env["TRITON_CACHE_DIR"] = cache_dir
    info: Dict = {"cache_dir": cache_dir, "prebuilt": None}
    if prebuilt and os.path.exists(prebuilt):
        from benchmarks import triton_cache
        try:
            manifest = triton_cache.install(prebuilt, cache_dir)
            info["prebuilt"] = prebuilt
            info["manifest"] = manifest
            env["FUSED_ATTN_TRITON_PREBUILT_MANIFEST"] = os.path.join(out, "triton_prebuilt.json")
            import json
            with open(env["FUSED_ATTN_TRITON_PREBUILT_MANIFEST"], "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
        except Exception as e:  # noqa: BLE001 - a broken artefact must not stop the run
            info["prebuilt_error"] = f"{type(e).__name__}: {e}"
    if cache_log:
        env["TRITON_CACHE_MANAGER"] = CACHE_LOG_CLASS
    return cache_dir, info


def plan(names: Optional[List[str]]) -> List[Step]:
    if not names:
        return [s for s in STEPS if s.default]
    known = {s.name: s for s in STEPS}
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"--steps: unknown step(s) {bad}; known: {', '.join(known)}")
    return [known[n] for n in names]


def dry_run(steps: List[Step], budget: float, out: str) -> int:
    subs = substitutions(out)
    print(f"gpu_check plan: budget {budget:.0f} s, {len(steps)} steps (a step's box is min(box, budget left))")
    total = 0.0
    for s in steps:
        why = [w for w in map(guard, s.needs) if w]
        total += s.box or 0
        box = "rest" if s.box is None else f"{s.box:>4.0f} s"
        print(f"  {s.name:<10} {box:>6}  {'would skip: ' + '; '.join(why) if why else 'runs'}\n"
              f"             {s.what}\n             $ {s.cmd.format(**subs)}")
    print(f"boxes before 'rest' add up to {total:.0f} s for a {budget:.0f} s budget: boxes are caps, and a late "
          f"step gets what is left (at least {MIN_BOX} s, else it is skipped)")
    return 0


def run_all(steps: List[Step], out: str, budget: float, bundle: Optional[str] = None,
            prebuilt: Optional[str] = PREBUILT, cache_log: bool = True) -> List[Dict]:
    t_start = time.monotonic()
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    env.pop("TRITON_INTERPRET", None)
    cache_dir, cache_info = prepare_cache(prebuilt, out, env, cache_log)
    meta = {"started": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z", "budget": budget,
            "python": sys.executable, "cache": cache_info}
    subs = substitutions(out)
    results: List[Dict] = []

    def stop(signum, frame):     # the device call's own limit: keep what ran
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:           # not the main thread (an embedding test runner): no handler
        old = None
    try:
        for i, s in enumerate(steps):
            left = budget - (time.monotonic() - t_start) - 5
            res = run_step(s, i, out, subs, env, left, cache_dir)
            if s.name == "env" and cache_log and not gpu_summary.cache_log_ok(out):
                env.pop("TRITON_CACHE_MANAGER", None)      # the logging cache manager failed to load there
                meta["cache"]["log"] = "disabled: benchmarks.triton_cache_log did not load in the env step"
            results.append(res)
            elapsed = time.monotonic() - t_start
            print(f"[{elapsed:5.0f} s] {s.name}: {res['status']} ({res['seconds']:.0f} s of {res['box']}) "
                  f"{gpu_summary.cache_note(res)}", flush=True)
            if res["status"].startswith(("failed", "timeout")):
                print(gpu_summary.log_tail(os.path.join(out, res["log"])), flush=True)
            meta["elapsed"] = round(elapsed)
            _write(out, results, meta, bundle)
    except KeyboardInterrupt:
        if _CURRENT["p"] is not None:
            _kill(_CURRENT["p"])
        meta["interrupted"] = True
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    meta["elapsed"] = round(time.monotonic() - t_start)
    print(_write(out, results, meta, bundle))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"))
    ap.add_argument("--bundle", help="after each step, copy summary.md and a tar.gz of --out here "
                                     "(the device call's $OUT: few files come back)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps")
    ap.add_argument("--steps", help="comma list (default: every default step in order); see --dry-run")
    ap.add_argument("--triton-cache", default=PREBUILT, help="prebuilt Triton cache (tar.gz) to install first")
    ap.add_argument("--no-cache-log", action="store_true", help="do not log Triton's cache lookups")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, guards and time boxes; run nothing")
    args = ap.parse_args(argv)
    steps = plan(args.steps.split(",") if args.steps else None)
    if args.dry_run:
        return dry_run(steps, args.budget, args.out)
    results = run_all(steps, os.path.abspath(args.out), args.budget, args.bundle, args.triton_cache,
                      not args.no_cache_log)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
