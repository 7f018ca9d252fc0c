"""How the method and artifact packages depend on each other: at module level only.

The methods write and read adapter directories (``peftcli.artifacts``) and the adapter
directory names its method (``peftcli.methods``); an import hidden inside a function to dodge
an import cycle between the two hides the dependency, so there is none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import peftcli

ROOT = Path(peftcli.__file__).parent
PACKAGES = ("methods", "artifacts")


def _function_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of each ``from peftcli... import`` / ``import peftcli...`` inside a function."""
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module:
                    found.append((node.lineno, node.module))
                elif isinstance(node, ast.Import):
                    found.extend((node.lineno, a.name) for a in node.names)
    return found


def test_methods_and_artifacts_import_each_other_at_module_level_only():
    hidden = []
    for package in PACKAGES:
        other = "peftcli." + next(p for p in PACKAGES if p != package)
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for line, module in _function_level_imports(tree):
                if module == other or module.startswith(other + "."):
                    hidden.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert hidden == []


def test_the_scan_sees_a_function_level_import():
    source = "import os\n\ndef f():\n    from peftcli.methods import METHODS\n    import peftcli.artifacts.sparse_diff\n"
    assert _function_level_imports(ast.parse(source)) == [(4, "peftcli.methods"), (5, "peftcli.artifacts.sparse_diff")]
