"""The shape the code keeps: every function in `steering/` and `app.py` fits on a screen or two,
every class in a sitting (a unit that outgrows them is split, not exempted); gradio is imported
only under `steering/ui/`; and the modules form layers with no import circle, lazy imports
(inside functions) included. The graph is read from the source with `ast`, so a circle hidden
in a function body fails here as surely as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "steering"
MAX_FUNCTION_LINES = 120
MAX_CLASS_LINES = 300

# Which module may import which: a module imports only from its own layer or the layers below it
# (and inside a layer, without a circle). `steering` is the package itself (steering/__init__.py).
LAYERS = (
    (
        "base",
        {"steering", "errors", "events", "files", "lifecycle", "limits", "vocab", "gpu", "catalog", "training_texts"},
    ),
    ("memory", {"estimate", "devices", "planning"}),
    ("models", {"embedded", "weights", "loaded", "cpu", "loader"}),
    ("steering", {"engine", "prefill", "generate", "quality", "vector_io", "history", "training"}),
    ("api", {"api", "chat"}),
    ("entry", {"__main__"}),
    ("ui", {"ui"}),  # steering/ui/*: the only modules that import gradio
)


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _units():
    for path in _sources() + [ROOT / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path.relative_to(ROOT), node, node.end_lineno - node.lineno + 1


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every steering module `path` imports, anywhere in the file (top level or lazily)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "steering"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "steering":
            for alias in node.names:  # `from steering.ui import views` imports steering.ui.views
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules} - {_module_name(path)}


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in _sources()}
    return {_module_name(p): _imports(p, modules) for p in _sources()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def _layer(module: str) -> int:
    short = module.split(".")[1] if "." in module else module
    return next(i for i, (_, names) in enumerate(LAYERS) if short in names)


def test_no_unit_is_oversized():
    too_big = [
        f"{path}:{node.lineno} {node.name} ({lines} lines)"
        for path, node, lines in _units()
        if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)
    ]
    assert not too_big, too_big
    seen = {(str(path), node.name) for path, node, _ in _units()}
    assert ("steering/loader.py", "ModelManager") in seen and ("steering/ui/app.py", "build_demo") in seen


def test_the_cycle_finder_finds_circles():
    """The check below could fail: a circle (lazy or not) is found, a layered graph is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    lazy = "def f():\n    from steering import api\n"
    assert "steering.api" in {m for node in ast.walk(ast.parse(lazy)) if isinstance(node, ast.ImportFrom)
                              for m in [f"{node.module}.{a.name}" for a in node.names]}  # fmt: skip


def test_no_import_circles_lazy_ones_included():
    graph = import_graph()
    assert "steering.ui.steer" in graph and "steering.planning" in graph  # the walk sees the package
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_every_module_imports_only_its_layer_or_below():
    graph = import_graph()
    unplaced = [m for m in graph if not any((m.split(".")[1] if "." in m else m) in n for _, n in LAYERS)]
    assert not unplaced, f"put these modules in a layer of LAYERS: {unplaced}"
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, upward


def test_gradio_is_imported_only_under_steering_ui():
    outside = []
    for path in _sources() + [ROOT / "app.py"]:
        if path.is_relative_to(PACKAGE / "ui"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.split(".")[0] == "gradio" for n in names):
                outside.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not outside, outside
