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


# The kernels pass their arguments in groups (tuples, triton_common's conventions); a signature that
# grows back past this is a sign that a feature added loose parameters instead of a group.
MAX_JIT_PARAMS = 59


def jit_signature_sizes():
    """{function name: parameter count} of every @triton.jit function in the Triton backend files."""
    import ast

    sizes = {}
    for path in sorted((HERE.parent / "fused_attn" / "backends").glob("triton_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in node.decorator_list):
                a = node.args
                sizes[f"{path.name}:{node.name}"] = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
    return sizes


def test_jit_signatures_stay_small():
    sizes = jit_signature_sizes()
    assert len(sizes) > 20 and "triton_bwd.py:attn_bwd_dkdv_kernel" in sizes, sizes   # the walk finds the kernels
    too_big = {name: n for name, n in sizes.items() if n > MAX_JIT_PARAMS}
    assert not too_big, f"@triton.jit signatures over {MAX_JIT_PARAMS} parameters: {too_big}"


def test_declared_triton_floor_takes_tuple_arguments():
    """The kernels take tuple arguments and pass tuples to helpers: Triton >= 3.3 (torch 2.7 pins 3.3)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = {Requirement(r).name: Requirement(r).specifier
            for r in tomllib.loads((HERE.parent / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert Version("3.2.0") not in deps["triton"] and Version("3.3.0") in deps["triton"], deps["triton"]
    assert Version("2.6.0") not in deps["torch"] and Version("2.7.0") in deps["torch"], deps["torch"]
