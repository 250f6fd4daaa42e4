"""ARCHITECTURE.md's layer table is the truth about the tree: every labkit module is in it once, imports only from
its own layer or below, and no import cycle exists — counting lazy imports inside functions and imports under
``TYPE_CHECKING``, not only the top-level ones. The core stays free of the UI (tests/test_extras.py runs the engine
without widgets)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "labkit"
TABLE = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def imports(path: Path) -> set[str]:
    """Every labkit module ``path`` imports anywhere in the file (``from labkit.x import y`` counts as labkit.x.y
    when that is a module, else as labkit.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit") and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
            found |= subs if len(subs) == len(node.names) else subs | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("labkit")}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("labkit"):
                found.add(str(arg.value))
    return {m for m in found if m in MODULES}


def graph() -> dict[str, set[str]]:
    """Module -> the labkit modules it imports; importing a module runs its parent packages first (Python's
    order, not an edge)."""
    return {m: {n for n in imports(p) if n != m and not m.startswith(n + ".")} for m, p in MODULES.items()}


def declared_layers() -> dict[str, int]:
    """Module -> layer from ARCHITECTURE.md's table: `pkg/` covers a package's modules not named on their own."""
    rows = re.findall(r"^\| (\d) [^|]*\| ([^|]+) \|", TABLE.read_text(), flags=re.M)
    explicit: dict[str, int] = {}
    folders: dict[str, int] = {}
    for layer, cell in rows:
        for name in re.findall(r"`([\w/]+)`", cell):
            if name.endswith("/"):
                folders["labkit." + name.strip("/").replace("/", ".")] = int(layer)
            else:
                explicit["labkit." + name.replace("/", ".")] = int(layer)
    out = dict(explicit)
    for m in MODULES:
        if m not in out and m not in PACKAGES:
            owners = [f for f in folders if m.startswith(f + ".")]
            if owners:
                out[m] = folders[max(owners, key=len)]
    return out


def test_every_module_has_one_layer_in_architecture_md():
    layers = declared_layers()
    missing = sorted(m for m in MODULES if m not in PACKAGES and m != "labkit" and m not in layers)
    assert not missing, f"modules missing from ARCHITECTURE.md's table: {missing}"
    unknown = sorted(m for m in layers if m not in MODULES)
    assert not unknown, f"ARCHITECTURE.md names modules that do not exist: {unknown}"


def test_every_module_imports_only_its_layer_or_below_lazy_imports_included():
    layers = declared_layers()
    edges = graph()

    def layer(m: str) -> int:  # a package re-exports: its layer is its highest import's
        return layers[m] if m in layers else max((layer(n) for n in edges[m] if n != m), default=0)

    bad = [f"{m} (layer {layers[m]}) imports {n} (layer {layer(n)})" for m in sorted(layers) for n in sorted(edges[m])
           if layer(n) > layers[m]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_of_any_kind():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_lazy_and_type_checking_imports_count(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from labkit.session import Session\n"
                      "def f():\n    from labkit.core import errors\n    import labkit.records.trace\n")
    assert imports(source) == {"labkit.session", "labkit.core.errors", "labkit.records.trace"}


def test_only_the_ui_imports_the_panels():
    for m, p in MODULES.items():
        if not m.startswith("labkit.ui"):
            bad = {n for n in imports(p) if n.startswith("labkit.ui.panels")}
            assert not bad, f"{m} imports {sorted(bad)}"


def test_nothing_outside_the_session_module_touches_the_sessions_private_members():
    import labkit.session

    private = {n for n in vars(labkit.session.Session) if n.startswith("_") and not n.startswith("__")}
    private |= {"_lock", "_stop", "_scoped"}  # set in __init__
    bad = []
    for m, p in MODULES.items():
        if m == "labkit.session":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and isinstance(node.value, ast.Name) \
                    and node.value.id in ("session", "s", "sess", "owner"):
                bad.append(f"{m}:{node.lineno} {node.value.id}.{node.attr}")
    assert not bad, bad
