"""Other modules do not reach into the wrapper: each component gets its inputs, not the wrapper.

Counts, from the source, reads of ``AccumulatingOptimizer``'s private attributes and methods (the
``self._x`` it sets or defines) from any other module of the package. The few that remain are the
narrow internal protocol of graph capture and splitting; a new one fails here and has to be justified.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "accumopt"
ALLOWED = {
    ("graphs.py", "_record_backward_weight"),  # a captured backward records its weight as backward() does
    ("graphs.py", "_accumulated_in_grad"),  # which parameters' sums a replay adds into
    ("splitting.py", "_open_ended_window"),  # MicroBatcher holds the window open for one batch
}


def wrapper_private_names() -> set[str]:
    tree = ast.parse((PACKAGE / "optimizer.py").read_text())
    names: set[str] = set()
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and cls.name == "AccumulatingOptimizer":
            for n in ast.walk(cls):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" \
                        and n.attr.startswith("_") and not n.attr.startswith("__"):
                    names.add(n.attr)
                if isinstance(n, ast.FunctionDef) and n.name.startswith("_") and not n.name.startswith("__"):
                    names.add(n.name)
    return names


def private_reads() -> set[tuple[str, str]]:
    names = wrapper_private_names()
    found: set[tuple[str, str]] = set()
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name == "optimizer.py":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Attribute) and n.attr in names and \
                    not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")):
                found.add((str(f.relative_to(PACKAGE)), n.attr))
    return found


def test_the_scan_sees_private_names():
    names = wrapper_private_names()
    assert {"_store", "_window", "_stats", "_record_backward_weight"} <= names


def test_no_other_module_reads_the_wrappers_private_state():
    assert private_reads() <= ALLOWED, sorted(private_reads() - ALLOWED)
