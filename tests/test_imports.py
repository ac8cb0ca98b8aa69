"""The package's shape: no import cycle among acttail's modules (the top-level kernels/ folder installs as
acttail.kernels), no stage importing a later one, and the runtime never reaching for the network."""

from __future__ import annotations

import ast
from pathlib import Path

import acttail

PACKAGE = Path(acttail.__file__).parent
KERNELS = PACKAGE.parent / "kernels"  # installs as acttail.kernels (setup.cfg's package_dir)


def module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("acttail", "kernels") + path.relative_to(KERNELS).with_suffix("").parts
    else:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.rglob("*.py"))


def imports(path: Path, top_level_only: bool) -> set[str]:
    """acttail modules a file imports (at module level only, or anywhere)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("acttail")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("acttail"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in sources()}
    return {m for m in found if m in modules and m != name}


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {module_name(p): imports(p, top_level_only) for p in sources()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if n.startswith(m + ".") or m.startswith(n + "."):  # a package and its own modules
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if state.get(n) is None:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if state.get(m) is None:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert cycle({"acttail.a": {"acttail.b"}, "acttail.b": {"acttail.a"}}) == ["acttail.a", "acttail.b", "acttail.a"]
    edges = graph(top_level_only=True)
    assert len(edges) > 25 and "acttail.runtime.sparsify" in edges["acttail.calibration"]  # the graph is real
    assert cycle(edges) is None
    assert cycle(graph(top_level_only=False)) is None  # deferred imports included


# The stages in the order data flows (ARCHITECTURE.md). Modules outside them are shared by every stage (errors,
# files (reading), outputs (writing), validation (schemas, fingerprints), layout, histogram, weights, the runtime and
# kernels that run the model) or sit on top (api, cli).
STAGES = [
    ("acttail.checkpoint", "acttail.gguf_file", "acttail.gguf_tokenizer", "acttail.convert"),
    ("acttail.esd", "acttail.reference", "acttail.analysis", "acttail.sensitivity", "acttail.greedy"),
    ("acttail.allocation", "acttail.plan", "acttail.sidecar"),
    ("acttail.calibration", "acttail.compensation"),
    ("acttail.export",),
    ("acttail.evaluation", "acttail.tuning"),
    ("acttail.report", "acttail.report.figures", "acttail.report.html"),
]


def later_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported module of a later stage) for every such import."""
    stage = {m: i for i, names in enumerate(STAGES) for m in names}
    return sorted((m, d) for m, deps in edges.items() if m in stage
                  for d in deps if stage.get(d, -1) > stage[m])


def test_no_stage_imports_a_later_stage():
    assert later_imports({"acttail.greedy": {"acttail.calibration"}}) == [("acttail.greedy", "acttail.calibration")]
    edges = graph(top_level_only=False)
    assert {m for names in STAGES for m in names} <= set(edges)  # every stage module exists (none renamed away)
    assert later_imports(edges) == []


def test_kernels_install_as_acttail_kernels():
    """The kernels live in the top-level kernels/ folder and are imported as acttail.kernels (no copy inside
    acttail/, no path tricks)."""
    import acttail.kernels

    assert Path(acttail.kernels.__file__).parent == KERNELS
    assert not (PACKAGE / "kernels").exists()
    assert "acttail.kernels.sparse_gemv" in graph(top_level_only=True)


def test_the_runtime_never_downloads():
    """Nothing under acttail/runtime imports the fetching code (texts are resolved by the command line)."""
    runtime = {m: deps for m, deps in graph(top_level_only=False).items() if m.startswith("acttail.runtime")}
    assert runtime and not any(d in ("acttail.fetch", "acttail.text") for deps in runtime.values() for d in deps)
