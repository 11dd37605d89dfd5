"""The README stays true: its support matrix matches pyproject.toml."""
import re
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _row(first_cell: str):
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(first_cell):
            return cells
    raise AssertionError(f"README has no table row starting with {first_cell!r}")


def test_support_matrix_states_pyproject_bounds():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["hf"]}
    claimed = dict(zip(["python", "torch", "triton", "transformers"], _row("claimed")[1:]))
    as_spec = lambda cell: SpecifierSet(cell.replace(" ", ""))   # noqa: E731
    assert as_spec(claimed["python"]) == SpecifierSet(project["requires-python"])
    for name in ("torch", "triton", "transformers"):
        assert as_spec(claimed[name]) == reqs[name].specifier, (name, claimed[name], str(reqs[name]))
    # the versions this suite runs with lie inside the claimed range
    assert Version(".".join(map(str, sys.version_info[:3]))) in SpecifierSet(project["requires-python"])
    assert Version(torch.__version__.split("+")[0]) in reqs["torch"].specifier
    tf = pytest.importorskip("transformers")
    assert Version(tf.__version__) in reqs["transformers"].specifier
    tested = _row("tested, CPU")
    assert re.search(r"\b3\.11\b", tested[1]) and "2.13.0" in tested[2] and "5.18.0" in tested[4] and "4.57.6" in tested[4]


def test_readme_and_benchmark_cli_use_user_words():
    """No internal tracker words ("issue-2 target", "the issue targets") where users read."""
    from benchmarks.presets import PRESETS

    bench_readme = (ROOT / "benchmarks" / "README.md").read_text()
    for where, text in [("README.md", README), ("benchmarks/README.md", bench_readme)] + [
            (f"preset {name}", p.help) for name, p in PRESETS.items()]:
        assert not re.search(r"\bissues?\b", text, re.IGNORECASE), where


def test_readme_names_every_benchmark_preset():
    from benchmarks.presets import PRESETS

    section = README.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in PRESETS if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", section)]
    assert not missing, missing
