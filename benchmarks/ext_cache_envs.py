"""Two Python environments and two checkouts sharing one TORCH_EXTENSIONS_DIR: how long each
process takes to load the C++ extension (issue 23).  Run by hand (it compiles the extension at
least twice, ~20 s each on two cores):

    python -m benchmarks.ext_cache_envs                    # this checkout
    python -m benchmarks.ext_cache_envs --checkout DIR     # another one (e.g. an older commit)

The second environment is a venv whose site-packages holds a symlink to this interpreter's torch
(so torch's headers sit at another absolute path, as in a second venv with the same torch) and
reaches the other packages through a .pth file; fused_attn comes from the checkout (PYTHONPATH).
Each step is a fresh process: `fused_attn._build.load()`, timed, with the "compiling" lines it
printed.  Expected: one build per environment and per checkout, then loads of about a second.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = "import fused_attn._build as b; print(b.load())"


def second_env(where: Path) -> str:
    """A venv whose torch is this one's, at another path; returns its python."""
    import torch

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    (site / "torch").symlink_to(Path(torch.__file__).parent)
    (site / "zz_shared.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return str(py)


def step(python: str, checkout: Path, cache: Path) -> tuple:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(checkout))
    t0 = time.perf_counter()
    p = subprocess.run([python, "-c", CODE], cwd=checkout, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    compiled = any("compiling" in line for line in p.stderr.splitlines())
    return dt, compiled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", default=str(ROOT), help="the fused_attn checkout to load (default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations A, B per case")
    a = ap.parse_args(argv)
    checkout = Path(a.checkout).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        envs = {"venv A": sys.executable, "venv B": second_env(tmp / "venv_b")}
        other = tmp / "checkout_b"                       # the same sources at another path
        shutil.copytree(checkout, other, ignore=shutil.ignore_patterns(".venv*", ".git", ".ext-cache", "out",
                                                                      "__pycache__", "*.so"))
        cases = {
            "two environments, one checkout": [(name, py, checkout) for name, py in envs.items()],
            "two checkouts, one environment": [("checkout A", sys.executable, checkout),
                                               ("checkout B", sys.executable, other)],
        }
        print(f"fused_attn checkout {checkout}; torch {__import__('torch').__version__}; "
              f"load average {os.getloadavg()[0]:.1f} (shared machine)")
        for title, parties in cases.items():
            cache = tmp / ("cache_" + title.split(",")[0].replace(" ", "_"))
            print(f"\n{title} (one TORCH_EXTENSIONS_DIR):")
            for r in range(a.rounds):
                for name, py, src in parties:
                    dt, compiled = step(py, src, cache)
                    print(f"  round {r + 1}  {name:10s} {dt:6.1f} s  {'compiled' if compiled else 'no build'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
