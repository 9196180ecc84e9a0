"""Sizes the code keeps (issue 8): every function in `steering/` and `app.py` fits on a screen or
two, every class in a sitting. A unit that outgrows them is split, not exempted."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 120
MAX_CLASS_LINES = 300


def _units():
    for path in sorted((ROOT / "steering").glob("*.py")) + [ROOT / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path.relative_to(ROOT), node, node.end_lineno - node.lineno + 1


def test_no_unit_is_oversized():
    too_big = [
        f"{path}:{node.lineno} {node.name} ({lines} lines)"
        for path, node, lines in _units()
        if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)
    ]
    assert not too_big, too_big
    assert any(name == "ModelManager" for _, node, _ in _units() for name in [node.name])  # the walk sees it
