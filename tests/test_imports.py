"""fused_attn's modules import each other without cycles (lazy imports inside functions count)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fused_attn"


def _imports(path: Path):
    """Modules of fused_attn that ``path`` imports anywhere in its body, as dotted names."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            base = (base + "." + node.module if node.module else base) if node.level else (node.module or "")
            # `from . import x` may name a submodule
            out.update({base} | {f"{base}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return mod, {m for m in out if m.startswith("fused_attn")}


def test_integrations_have_no_import_cycle():
    files = {m: deps for m, deps in map(_imports, sorted((PKG / "integrations").glob("*.py")))}
    graph = {m: {d for d in deps if d in files and d != m} for m, deps in files.items()
             if not m.endswith("__init__")}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "fused_attn.integrations.padding_free" in graph["fused_attn.integrations.patch"]   # the scan sees imports
