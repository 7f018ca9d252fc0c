"""Static checks in the test suite, so CI runs them: ruff and mypy with the configuration in
pyproject.toml (its baseline and strict modules), that mypy really checks the method Protocol,
and the package's layering: one CLI framework, entry points only where the CLI is."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "peftcli")


def _tool(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' installs it)")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> str:
    """One cache for this module's mypy runs, outside the repository."""
    return str(tmp_path_factory.mktemp("mypy-cache"))


def _mypy(cache: str, *args: str) -> subprocess.CompletedProcess:
    # MYPYPATH: this checkout's peftcli, even where another copy is installed.
    env = {**os.environ, "MYPYPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", cache, "--no-error-summary", *args],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )


def test_ruff_finds_nothing():
    _tool("ruff")
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "peftcli", "tests", "examples"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing(mypy_cache):
    _tool("mypy")
    proc = _mypy(mypy_cache)  # the files and options of [tool.mypy]
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr


def test_mypy_checks_a_method_against_the_protocol(mypy_cache, tmp_path):
    """The registry's ``dict[str, Method]`` is a checked contract: a method that misses a member
    or gets one's type wrong is an error, not a runtime surprise."""
    _tool("mypy")
    bad = tmp_path / "bad_method.py"
    bad.write_text(
        "from peftcli.methods.base import Method, MethodBase\n"
        "class NoAttach(MethodBase):\n"
        "    name = 'no-attach'\n    config_cls = dict\n    summary = 'x'\n    peft_type = None\n"
        "    def budget(self, shapes, model_config, cfg): return []\n"
        "    def init(self, ckpt, cfg, generator): return {}\n"
        "    def adapter_config(self, ckpt, cfg): return {}\n"
        "    def config_from_adapter(self, adapter_config): return None\n"
        "class NumberName(NoAttach):\n"
        "    name = 3  # type: ignore[assignment]\n"
        "    def attach(self, model, cfg, tensors, model_config): return None\n"
        "a: Method = NoAttach()\n"
        "b: Method = NumberName()\n"
    )
    proc = _mypy(mypy_cache, "--config-file", os.path.join(ROOT, "pyproject.toml"), str(bad))
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert any(':14: error: Incompatible types in assignment (expression has type "NoAttach", variable has type "Method")' in e for e in errors), proc.stdout
    assert any(':15: error: Incompatible types in assignment (expression has type "NumberName", variable has type "Method")' in e for e in errors), proc.stdout
    assert '"NoAttach" is missing following "Method" protocol member:' in proc.stdout and "note:     attach" in proc.stdout
    assert 'note:     name: expected "str", got "int"' in proc.stdout


# -- layering -----------------------------------------------------------------------------------

# The one module outside peftcli/cli that imports click or peftcli.cli: ``python -m peftcli``,
# the console script. Options are plain declarations (peftcli/options.py) and recipe steps call
# the Python API (recipes/steps.py); the click flags are made from them under peftcli/cli.
CLICK_OUTSIDE_CLI = {"peftcli/__main__.py"}
# The only ``python -m`` entry points: the console script and the built-in inputs' commands.
ENTRY_POINTS = {"peftcli/__main__.py", "peftcli/cli/prepare.py"}


def _modules():
    for dirpath, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, ROOT).replace(os.sep, "/"), ast.parse(f.read(), path)


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.dump(node.test) and "__main__" in ast.dump(node.test)


def test_one_cli_framework_and_entry_points_only_in_the_cli():
    click_users, entry_points, argparse_users = set(), set(), set()
    for rel, tree in _modules():
        imported = _imports(tree)
        if not rel.startswith("peftcli/cli/") and any(n == "click" or n.startswith(("click.", "peftcli.cli")) for n in imported):
            click_users.add(rel)
        if any(n == "argparse" or n.startswith("argparse.") for n in imported):
            argparse_users.add(rel)
        if any(_is_main_guard(node) for node in tree.body) or rel.endswith("/__main__.py"):
            entry_points.add(rel)
    assert argparse_users == set(), "the CLI is click's: make it a click command under peftcli/cli"
    assert click_users == CLICK_OUTSIDE_CLI, "the library does not import click or peftcli.cli"
    assert entry_points == ENTRY_POINTS, "demo scripts go to examples/, commands under peftcli/cli"
