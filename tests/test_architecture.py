"""The shape of the package (docs/architecture.md): no import circles, files of one concept, the model-family seam."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdtool"
# Where a model family may be told apart by name: its own module and the config schema (kohya's `v2` key).
FAMILY_BRANCHES_ALLOWED = ("models/families/", "train/config/")
LONG_FILE = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        mods[name] = path
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every sdtool module `path` imports, at any depth (function-level imports are arrows too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_no_import_circles():
    mods = _modules()
    graph = {m: {t for t in _imports(p, set(mods)) if t != m and not m.startswith(t + ".")} for m, p in mods.items()}
    # Tarjan-free check: a module that reaches itself through its imports sits on a circle.
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles))[:10])


def test_long_files_say_why():
    """A file past ~500 lines holds one concept that reads better whole, and its opening docstring says so."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > LONG_FILE and "reads better whole" not in (
            ast.get_docstring(ast.parse(text)) or ""
        ):
            offenders.append(f"{path.relative_to(PACKAGE)} ({len(text.splitlines())} lines)")
    assert not offenders, "split these, or say in their docstring why they read better whole: " + ", ".join(offenders)


def _mentions_family(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == "v2":
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in ("v2", "kohya_v2"):
            return True
        if isinstance(sub, ast.Constant) and sub.value in ("v1", "v2", "sdxl"):
            return True
    return False


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_family_branching_outside_the_family_modules(path):
    """`if v2`, `… if v2 else …`, `== "v2"` belong in sdtool/models/families/ (and the config schema) only."""
    rel = path.relative_to(PACKAGE).as_posix()
    if rel.startswith(FAMILY_BRANCHES_ALLOWED):
        return
    branches = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        tests = []
        if isinstance(node, ast.If | ast.IfExp | ast.While | ast.Assert):
            tests.append(node.test)
        elif isinstance(node, ast.Compare | ast.BoolOp):
            tests.append(node)
        elif isinstance(node, ast.comprehension):
            tests += node.ifs
        if any(_mentions_family(t) for t in tests):
            branches.append(f"line {node.lineno}")
    assert not branches, f"{rel} branches on the model family at {', '.join(branches)}; ask the family instead"
