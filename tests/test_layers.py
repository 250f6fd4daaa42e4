"""The import rules of ARCHITECTURE.md: no cycle among labkit's modules, the loop and the measures below the
Session, the core free of the UI (panels, plotly, ipywidgets, anywidget; tests/test_extras.py runs the engine
without them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "labkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """labkit modules ``path`` imports (``from labkit.x import y`` counts as labkit.x.y when that is a module, else as
    labkit.x); lazy imports inside functions too unless ``top_level_only``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit") and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
            found |= submodules if len(submodules) == len(node.names) else submodules | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("labkit")}
    return {m for m in found if m in MODULES}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_no_import_cycle_among_labkit_modules():
    # importing a submodule runs its parent packages first: that is Python's order, not a cycle
    graph = {m: {n for n in imports(p, top_level_only=True) if not m.startswith(n + ".") and n != m}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_loop_the_measures_and_the_core_import_nothing_above_them():
    below = ["labkit.decode", "labkit.info", "labkit.attention", "labkit.cache", "labkit.models", "labkit.hooks",
             "labkit.trace", "labkit.render", "labkit.tokens", "labkit.imaging", "labkit.lens",
             "labkit.interventions.base", "labkit.interventions.token", "labkit.interventions.activation",
             "labkit.patterns", "labkit.results", "labkit.figures", "labkit.cache", "labkit.speculative.rule",
             "labkit.speculative.drafts", "labkit.speculative.speculator", "labkit.activations", "labkit.attribution",
             "labkit.logit_attribution", "labkit.kv", "labkit.beam", "labkit.beam_tree"]
    below += [m for m in MODULES if m.startswith("labkit.sampling")]
    above = ("labkit.session", "labkit.cli", "labkit.magics", "labkit.panels", "labkit.experiments",
             "labkit.workshop", "labkit.speculative.measure", "labkit.teaching")
    for m in below:
        bad = {n for n in imports(MODULES[m], top_level_only=False) if n.startswith(above)}
        assert not bad, f"{m} imports {sorted(bad)} (a layer above it)"


def test_only_the_ui_imports_the_panels():
    ui = ("labkit.panels", "labkit.magics", "labkit.cli", "labkit")  # labkit/__init__ names it for lazy access
    for m, p in MODULES.items():
        if not m.startswith(ui) or m in ("labkit.figures", "labkit.imaging"):
            bad = {n for n in imports(p, top_level_only=False) if n.startswith("labkit.panels")}
            assert not bad, f"{m} imports {sorted(bad)}"
