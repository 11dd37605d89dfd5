"""The Triton kernels compile for sm_90 (Triton's real compiler and ptxas, no GPU needed): the
interpreter alone would not catch code that only the compiled path rejects."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(HERE / "_triton_sm90.py")], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count("ok ") == 27, res.stdout
