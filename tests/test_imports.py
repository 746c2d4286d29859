"""relay's packages import one way: no package imports one that imports it back, however far
round (imports under TYPE_CHECKING, for annotations only, do not count), and rules never import
each other."""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "relay"


def imports() -> dict[str, set[str]]:
    """Each module's package (or top-level module) and the others its runtime imports name."""
    edges: dict[str, set[str]] = {}
    for path in RELAY.rglob("*.py"):
        part = path.relative_to(RELAY).parts[0].removesuffix(".py")
        tree = ast.parse(path.read_text())
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test)
                       for node in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
                continue
            if node.module and node.module.startswith("relay"):
                names = ([node.module.split(".")[1]] if node.module != "relay"
                         else [a.name for a in node.names])
                edges.setdefault(part, set()).update(n for n in names if n != part)
    return edges


def reaches(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        each = todo.pop()
        if each not in seen:
            seen.add(each)
            todo += edges.get(each, ())
    return seen


def test_no_package_imports_one_that_imports_it_back():
    """For every package, none of the packages it imports (directly or not) imports it."""
    edges = imports()
    cycles = sorted(p for p in edges if p in reaches(edges, p))
    assert cycles == [], f"in an import cycle: {cycles}"


def test_rules_import_no_other_rule():
    """A rule's module imports no other rule's module."""
    for path in (RELAY / "rules").glob("*.py"):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        assert "from relay.rules" not in text and "import relay.rules" not in text, path.name
