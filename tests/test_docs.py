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


# -- the README's guide snippets, run as written ---------------------------------------------------

MARKER = "# tested: tests/test_docs.py"


def _snippets():
    """(id, code) of every ```python block whose first line is MARKER, id from the heading above it."""
    out, heading = [], "top"
    for m in re.finditer(r"^(#{2,4} [^\n]+)$|^```python\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        if m.group(1):
            heading = re.sub(r"[^a-z0-9]+", "-", m.group(1).lstrip("#").strip().lower()).strip("-")
        elif m.group(2).startswith(MARKER + "\n"):
            out.append(pytest.param(m.group(2), id=heading))
    return out


SNIPPETS = _snippets()


def test_readme_has_the_guides():
    ids = {p.id for p in SNIPPETS}
    assert {"sentence-transformers", "hugging-face-trainer", "gradient-checkpointing",
            "autocast-mixed-precision", "torch-compile"} <= ids, ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random-init BertModel + tokenizer saved to a directory (nothing is downloaded)."""
    tf = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-bert")
    words = sorted(set(re.findall(r"[a-z]+|[^\sa-z]", " ".join(re.findall(r'"([^"]*)"', README)).lower())))
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tf.BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    tf.BertModel(cfg).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("code", SNIPPETS)
def test_readme_snippet_runs(code, checkpoint, tmp_path, monkeypatch, request):
    if "sentence_transformers" in code:
        pytest.importorskip("sentence_transformers")
    if "Trainer" in code:
        pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "torch.compile" in code:          # inductor's C++ build of a whole model takes minutes here:
        torch._dynamo.reset()            # the snippet's tracing (fullgraph) is what is tested
        default = torch.compiler.get_default_backend() if hasattr(torch.compiler, "get_default_backend") else None
        if default is None:
            pytest.skip("torch.compiler.set_default_backend is not available in this torch")
        torch.compiler.set_default_backend("aot_eager")
        request.addfinalizer(lambda: torch.compiler.set_default_backend(default))
    from fused_attn import ops
    calls = []
    real = ops.fused_attention
    monkeypatch.setattr(ops, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    namespace = {"checkpoint": checkpoint, "__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert calls, "the snippet never ran fused_attn's kernel"
    for name in ("embeddings", "hidden"):
        if name in namespace:
            assert torch.isfinite(torch.as_tensor(namespace[name]).float()).all()
