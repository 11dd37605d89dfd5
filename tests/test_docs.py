"""The README and docs/ stay true: the support matrix matches pyproject.toml, links resolve, and
every guide snippet runs as written."""
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
# the pages whose snippets run here (design.md and architecture.md hold signatures and diagrams)
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
                                 if p.name not in ("design.md", "architecture.md")}}


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
    for where, text in [*PAGES.items(), ("benchmarks/README.md", bench_readme)] + [
            (f"preset {name}", p.help) for name, p in PRESETS.items()]:
        assert not re.search(r"\bissues?\b", text, re.IGNORECASE), where


def test_performance_page_names_every_benchmark_preset():
    from benchmarks.presets import PRESETS

    section = PAGES["docs/performance.md"].split("## How to reproduce", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in PRESETS if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", section)]
    assert not missing, missing


def test_readme_is_a_front_door():
    """At most 16,000 characters; every relative link of the README and the docs pages resolves."""
    assert len(README) <= 16_000, len(README)
    for where, text in PAGES.items():
        base = (ROOT / where).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                assert (base / target).exists(), f"{where} links to {target}, which does not exist"


# -- the guide snippets, run as written ------------------------------------------------------------

MARKER = "# tested: tests/test_docs.py"
NOT_RUN = "# not run here"


def _snippets():
    """(id, code) of every ```python block whose first line is MARKER, id from the page and the
    heading above it; a block that is neither tested nor says why it is not run fails here."""
    out = []
    for where, text in PAGES.items():
        heading = "top"
        for m in re.finditer(r"^(#{1,4} [^\n]+)$|^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            if m.group(1):
                heading = re.sub(r"[^a-z0-9]+", "-", m.group(1).lstrip("#").strip().lower()).strip("-")
                continue
            first = m.group(2).split("\n", 1)[0]
            assert first.startswith((MARKER, NOT_RUN)), f"{where}, {heading}: a snippet neither tested nor excused"
            if first.startswith(MARKER):
                page = where.replace("docs/", "").replace(".md", "").lower()
                ident = f"{page}:{heading}"
                n = sum(p.id == ident or p.id.startswith(ident + "-") for p in out)
                out.append(pytest.param(m.group(2), id=ident if n == 0 else f"{ident}-{n + 1}"))
    return out


SNIPPETS = _snippets()


def test_docs_have_the_guides():
    ids = {p.id for p in SNIPPETS}
    assert {"huggingface:sentence-transformers", "huggingface:hugging-face-trainer",
            "huggingface:gradient-checkpointing", "huggingface:autocast-mixed-precision",
            "huggingface:torch-compile", "huggingface:the-routes", "padding-free:the-padding-free-encoder",
            "varlen:packed-batches-fused-attn-varlen-attention", "attention:use"} <= ids, ids
    assert sum(i.startswith("readme:") for i in ids) >= 5, ids       # one per route


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random-init BertModel + tokenizer saved to a directory (nothing is downloaded)."""
    tf = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-bert")
    quoted = " ".join(re.findall(r'"([^"]*)"', " ".join(PAGES.values())))
    words = sorted(set(re.findall(r"[a-z]+|[^\sa-z]", quoted.lower())))
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tf.BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    tf.BertModel(cfg).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code, checkpoint, tmp_path, monkeypatch, request):
    if "transformers >= 5" in code.split("\n", 1)[0]:
        tf = pytest.importorskip("transformers")
        if Version(tf.__version__).major < 5:
            pytest.skip("a transformers 5 snippet")
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
    namespace = {"checkpoint": checkpoint, "__name__": "__snippet__"}
    exec(compile(code, "snippet", "exec"), namespace)
    assert calls, "the snippet never ran fused_attn's kernel"
    for name in ("embeddings", "hidden", "out"):
        if name in namespace:
            assert torch.isfinite(torch.as_tensor(namespace[name]).float()).all()


def test_head_dim_beyond_the_kernels_is_as_documented():
    """docs/attention.md and design.md: on CPU "auto" falls back to the reference with a warning
    naming the reason; a named engine raises RuntimeError with it."""
    import warnings

    import fused_attn
    from fused_attn import backends
    q = torch.randn(1, 2, 5, 512)
    backends._warned.clear()
    backends._CHOICES.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused_attn.attention(q, q, q)
    assert any("uses 'reference'" in str(w.message) and "head dim 512 > 256" in str(w.message) for w in caught), \
        [str(w.message) for w in caught]
    torch.testing.assert_close(out, fused_attn.reference.attention(q, q, q))
    with pytest.raises(RuntimeError, match="head dim 512 > 256"):
        fused_attn.attention(q, q, q, backend="cpu")
