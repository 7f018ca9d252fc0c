"""The training code stays readable: short functions, one-way imports, public names only.

AST checks over the source files (nothing is imported or run): no function in
``peftcli/training/`` over 80 lines; the modules of ``peftcli/training/`` import each other in one
direction only (no cycle, lazy function-level imports included); no ``nonlocal`` state in the
loop; and no module of ``peftcli/training/`` (or ``peftcli/evaluation.py``, which uses the loop's
helpers) reaches for another module's private ``_name``, by ``from x import _y`` or ``x._y``.
"""

from __future__ import annotations

import ast
import os

import peftcli

PACKAGE = os.path.dirname(peftcli.__file__)
TRAIN = os.path.join(PACKAGE, "training")
MAX_LINES = 80


def _sources(directory: str) -> dict[str, ast.Module]:
    return {
        os.path.join(directory, name): ast.parse(open(os.path.join(directory, name), encoding="utf-8").read())
        for name in sorted(os.listdir(directory)) if name.endswith(".py")
    }


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")]
    return rel.replace(os.sep, ".").removesuffix(".__init__")


def _is_module(dotted: str) -> bool:
    """Whether ``peftcli.x.y`` names a module or package of peftcli (not a name inside one)."""
    path = os.path.join(os.path.dirname(PACKAGE), *dotted.split("."))
    return os.path.isfile(path + ".py") or os.path.isdir(path)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imports(tree: ast.Module) -> list[tuple[str, str | None, str]]:
    """(module, name or None, bound name) for every import of a peftcli module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, a.asname or a.name.split(".")[0]) for a in node.names if a.name.startswith("peftcli")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("peftcli"):
            found += [(node.module, a.name, a.asname or a.name) for a in node.names]
    return found


def _private_uses(path: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(module, what) for each ``from x import _y`` and ``m._y`` (``m`` an imported peftcli
    module) in ``path`` that reaches into another module."""
    this = _module_name(path)
    bad, modules = [], {}
    for module, name, bound in _imports(tree):
        if name is None:
            modules[bound] = module
        elif _is_module(f"{module}.{name}"):
            modules[bound] = f"{module}.{name}"
        elif _private(name) and module != this:
            bad.append((module, f"{path}: from {module} import {name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if _private(node.attr) and modules[node.value.id] != this:
                bad.append((modules[node.value.id], f"{path}:{node.lineno}: {node.value.id}.{node.attr}"))
    return bad


def test_no_function_in_train_is_over_80_lines():
    long = [
        f"{os.path.basename(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _sources(TRAIN).items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert long == []


def test_train_modules_import_each_other_one_way():
    graph = {
        _module_name(path): {
            target for module, name, _ in _imports(tree)
            for target in ([module] if name is None or not _is_module(f"{module}.{name}") else [f"{module}.{name}"])
            if target.startswith("peftcli.training.")
        }
        for path, tree in _sources(TRAIN).items()
    }
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []
    assert "peftcli.training.loop" not in set().union(*graph.values())  # the dispatcher is on top


def test_no_nonlocal_state_in_train():
    found = [
        f"{os.path.basename(path)}:{node.lineno}"
        for path, tree in _sources(TRAIN).items() for node in ast.walk(tree) if isinstance(node, ast.Nonlocal)
    ]
    assert found == []


def test_train_uses_no_private_name_of_another_module():
    bad = [what for path, tree in _sources(TRAIN).items() for _, what in _private_uses(path, tree)]
    assert bad == []


def test_evaluate_uses_no_private_name_of_the_training_code():
    path = os.path.join(PACKAGE, "evaluation.py")
    uses = _private_uses(path, ast.parse(open(path, encoding="utf-8").read()))
    assert [what for module, what in uses if module.startswith("peftcli.training")] == []
