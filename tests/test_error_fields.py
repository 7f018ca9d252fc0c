"""Library errors name fields (`max_length`); the CLI renders them as the running command's flags.

The scan below is the rule's keeper: outside ``peftcli/cli/``, a string in the package may
spell a flag (``--rank``) only inside a whole command to copy (```peftcli train --full` ``),
in a docstring, in an option's declaration (its spellings, its help text) or a method's
``examples`` (all rendered by the CLI alone), or on a line marked ``# argv`` (a command line
peftcli itself builds).
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

from peftcli.errors import UsageError, render_fields
from peftcli.options import from_options

PKG = pathlib.Path(__file__).resolve().parent.parent / "peftcli"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# A command to copy: `peftcli ...` in backticks, or a command name with its flags after "run".
COMMAND_SPAN = re.compile(r"`(?:peftcli|python|pip|llama|vllm|torchrun)\b[^`]*`")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _help_texts(tree: ast.AST) -> set[int]:
    """String constants of option declarations (``option(...)``'s spellings, ``flag=``, ``help=``)
    and ``examples``: text for --help and the parser."""
    ids = set()
    for node in ast.walk(tree):
        value = None
        if isinstance(node, ast.keyword) and node.arg in ("help", "examples", "flag"):
            value = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "option":
            ids |= {id(a) for a in node.args if isinstance(a, ast.Constant)}  # a flag's declared spellings
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id.lower() == "examples" for t in targets):
                value = node.value
        if value is not None:
            ids |= {id(n) for n in ast.walk(value) if isinstance(n, ast.Constant)}
    return ids


def flag_spellings(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, flag) for each flag a string of ``path`` spells outside a command to copy."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    skip = _docstrings(tree) | _help_texts(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if lines[node.lineno - 1].rstrip().endswith("# argv"):
                continue
            text = COMMAND_SPAN.sub("", node.value)
            found += [(node.lineno, m.group()) for m in FLAG.finditer(text)]
    return found


def test_library_strings_name_fields_not_flags():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        offenders += [f"peftcli/{rel}:{line}: {flag}" for line, flag in flag_spellings(path)]
    assert not offenders, "name the field in backticks (`max_length`), not the flag:\n" + "\n".join(offenders)


def test_render_fields_maps_known_fields_only():
    flags = {"max_length": "--max-length", "out": "-o/--output"}
    text = "`max_length` must be positive; `other` and `peftcli merge` are left; `max_length` again"
    assert render_fields(text, flags) == "--max-length must be positive; `other` and `peftcli merge` are left; --max-length again"


def test_python_errors_name_fields():
    from peftcli.training.config import TrainConfig

    with pytest.raises(UsageError) as err:
        from_options(TrainConfig, {"lr": float("nan")})
    assert str(err.value).startswith("`lr` nan is not a finite number")


def test_cli_renders_fields_as_flags_of_the_running_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(tmp_path / "run"), "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
         "--lr", "nan"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: --lr nan is not a finite number (give --lr a number"), out.stderr
    assert "`" not in out.stderr.split("(")[0]
