"""Randomised differential testing: seeded random cases (cases.random_case, extended) run on one
engine and compared with fused_attn.reference under the DESIGN.md tolerance rule, forward and
gradients, plus the exact-zero rule for rows that see no key.

    python tests/fuzz.py --engine cpu --n 10000 --seed 1 --jobs 2     # the long form (make fuzz)
    python tests/fuzz.py --engine cpu --case 4294967338                # one case, verbose

Case i of a run with seed S has its own seed (S << 32) + i, so every failure is reproduced by
one command (printed with it).  tests/test_fuzz.py runs a short slice of the same cases in
`make test`.  Cases run in worker processes; a crash, or a hang stopped by the per-case
watchdog, is reported with the case it happened in.

This file is the runner (workers, watchdog, summary, reproducers, the CLI); the engines, the
case draw and the checks of each case family are in fuzz_checks.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from fuzz_checks import (ENGINES, FAMILIES, KNOWN_ISSUES, KnownIssue, Unavailable, describe,  # noqa: E402
                         draw, setup_engine)

CASE_TIMEOUT_S = 300        # a case running longer than this is a hang: the worker dumps its stack


def case_seed(run_seed: int, index: int) -> int:
    return (run_seed << 32) + index


# -- running ----------------------------------------------------------------------------------
# The parent hands case indices to `jobs` worker processes (this file with --worker) over their
# stdin, one at a time, and reads one result line back.  A worker that dies (crash, or a hang
# stopped by its watchdog) therefore names the exact case it was running; a fresh one takes over.


@dataclass
class Result:
    index: int
    seed: int
    ok: bool
    message: str = ""
    ratios: Dict[str, float] = field(default_factory=dict)
    case: str = ""
    known: str = ""          # a KNOWN_ISSUES name: a failure with a known, reported cause


def run_one(engine_id: str, family: str, seed: int, index: int = -1) -> Result:
    backend, device = setup_engine(engine_id)
    case = draw(engine_id, seed, family)
    try:
        ratios = FAMILIES[family](backend, device, case, seed)
        return Result(index, seed, True, ratios=ratios)
    except KnownIssue as e:
        return Result(index, seed, False, str(e), case=describe(case), known=e.name)
    except Exception as e:  # noqa: BLE001 - a wrong error type is a failure too
        text = str(e).strip()
        msg = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        return Result(index, seed, False, msg, case=describe(case))


def worker(engine_id: str, family: str, run_seed: int) -> int:
    import faulthandler
    import json

    setup_engine(engine_id)
    crash_at = int(os.environ.get("FUSED_ATTN_FUZZ_CRASH_AT", "-1"))   # tests/test_fuzz.py: a crash
    print("@@ready", flush=True)
    for line in sys.stdin:
        i = int(line)
        if i == crash_at:
            os.abort()
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        r = run_one(engine_id, family, case_seed(run_seed, i), i)
        faulthandler.cancel_dump_traceback_later()
        print("@@" + json.dumps(r.__dict__), flush=True)
    return 0


class _Worker:
    def __init__(self, engine_id, family, run_seed, threads):
        import subprocess
        import tempfile

        self.err = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "--engine", engine_id, "--family", family,
             "--seed", str(run_seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        if self._line() != "ready":
            raise RuntimeError(f"fuzz worker did not start: {self.stderr_tail()}")

    def _line(self) -> Optional[str]:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return line[2:].strip()
        return None

    def run(self, i: int) -> Optional[Result]:
        import json

        try:
            self.proc.stdin.write(f"{i}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        line = self._line()
        return Result(**json.loads(line)) if line else None

    def stderr_tail(self, n=6) -> str:
        self.err.seek(0)
        lines = [ln.rstrip() for ln in self.err.read().splitlines() if ln.strip()]
        return " | ".join(lines[-n:])

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()
        self.err.close()


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(parts)


def reproducer(engine_id: str, seed: int, family: str) -> str:
    fam = f" --family {family}" if family != "dense" else ""
    return f"{sys.executable} tests/fuzz.py --engine {engine_id}{fam} --case {seed}"


def fuzz(engine_id: str, n: int, run_seed: int, jobs: int = 1, time_limit: Optional[float] = None,
         family: str = "dense", log=print) -> dict:
    """Run cases 0..n-1 of `run_seed` on `engine_id` in `jobs` worker processes; the summary."""
    import threading

    setup_engine(engine_id)                      # fail fast (and build the extension once, here)
    t0 = time.time()
    results: List[Result] = []
    crashes: List[str] = []
    lock = threading.Lock()
    todo = iter(range(n))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    last = [t0]

    def next_index():
        with lock:
            if time_limit and time.time() - t0 > time_limit:
                return None
            return next(todo, None)

    def drive():
        w = _Worker(engine_id, family, run_seed, threads)
        try:
            while (i := next_index()) is not None:
                r = w.run(i)
                with lock:
                    if r is None:           # the worker died on case i
                        w.proc.wait()
                        crashes.append(f"case {i}: worker exited with {w.proc.returncode} "
                                       f"({w.stderr_tail()})")
                        log(f"CRASH case {i}: exit {w.proc.returncode}\n  reproduce: "
                            + reproducer(engine_id, case_seed(run_seed, i), family))
                        results.append(Result(i, case_seed(run_seed, i), False, "crashed or hung"))
                    else:
                        results.append(r)
                        if not r.ok:
                            log(f"{'KNOWN' if r.known else 'FAIL'} case {r.index} ({r.case}): {r.message}\n"
                                f"  reproduce: " + reproducer(engine_id, r.seed, family))
                    if time.time() - last[0] > 60:
                        last[0] = time.time()
                        log(f"  ... {len(results)} cases, {sum(not x.ok for x in results)} failures, "
                            f"{time.time() - t0:.0f} s")
                if r is None:
                    w.close()
                    w = _Worker(engine_id, family, run_seed, threads)
        finally:
            w.close()

    pool = [threading.Thread(target=drive) for _ in range(jobs)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.time() - t0
    results.sort(key=lambda r: r.index)
    failures = [r for r in results if not r.ok and not r.known]
    known = [r for r in results if r.known]
    worst = {}
    for r in results:
        for k, v in r.ratios.items():
            worst[k] = max(worst.get(k, 0.0), v)
    return dict(engine=engine_id, family=family, seed=run_seed, requested=n, cases=len(results),
                failures=len(failures), crashes=crashes, seconds=elapsed, jobs=jobs, versions=versions(),
                worst_ratio=worst, failed=[(r.index, r.seed, r.message) for r in failures],
                known={name: [(r.index, r.seed) for r in known if r.known == name] for name in KNOWN_ISSUES})


def print_summary(s: dict, log=print):
    log(f"\nfuzz summary: engine {s['engine']}, family {s['family']}, seed {s['seed']}: "
        f"{s['cases']} cases (of {s['requested']}) in {s['seconds']:.0f} s with {s['jobs']} process(es), "
        f"{s['failures']} failures ({len(s['crashes'])} crashes or hangs)"
        + "".join(f", {len(v)} known ({k})" for k, v in s["known"].items() if v))
    log("  worst error / tolerance bound: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["worst_ratio"].items())))
    log(f"  {s['versions']}")
    for i, seed, msg in s["failed"]:
        log(f"  FAILED case {i}: {msg}\n    {reproducer(s['engine'], seed, s['family'])}")
    for c in s["crashes"]:
        log(f"  CRASHED {c}")
    for name, hits in s["known"].items():
        if hits:
            log(f"  known issue {name} ({KNOWN_ISSUES[name]}): cases " + ", ".join(str(i) for i, _ in hits[:20])
                + (" ..." if len(hits) > 20 else "") + f"; e.g. {reproducer(s['engine'], hits[0][1], s['family'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="cpu", help=", ".join(ENGINES) + "; comma-separated for several")
    ap.add_argument("--n", type=int, default=1000, help="cases per engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per engine; stops starting cases after")
    ap.add_argument("--family", default="dense", choices=sorted(FAMILIES))
    ap.add_argument("--case", type=int, default=None, help="run the case with this seed only, verbosely")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.engine, a.family, a.seed)
    if a.case is not None:
        backend, device = setup_engine(a.engine)
        case = draw(a.engine, a.case, a.family)
        print(f"engine {a.engine} ({backend} on {device}), case seed {a.case}:\n  {describe(case)}")
        ratios = FAMILIES[a.family](backend, device, case, a.case)
        print("passed; error / bound: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        return 0
    status = 0
    for engine_id in a.engine.split(","):
        try:
            s = fuzz(engine_id, a.n, a.seed, a.jobs, a.time_limit, a.family, log=lambda m: print(m, flush=True))
        except Unavailable as e:
            print(f"\nfuzz: engine {engine_id} skipped: {e}")
            continue
        print_summary(s)
        status |= bool(s["failures"])
    return status


if __name__ == "__main__":
    sys.exit(main())
