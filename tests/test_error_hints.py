"""Every user-facing error says what to do: ``error: <what is wrong> (<what to do>)``.

Two halves:
- a static scan of every module under ``peftcli/``: each construction of a ``PeftcliError``
  subclass (``raise X(...)``, but also ``return X(...)`` from the helpers that build errors)
  must pass a hint, as the second positional argument or ``hint=``;
- end-to-end runs of the CLI on inputs that used to fail without a hint.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import pathlib
import random
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import peftcli.errors as errors
from peftcli.cli import cli

PACKAGE = pathlib.Path(errors.__file__).resolve().parent
ROOT = PACKAGE.parent

# Constructions allowed without a hint, as "path: unparsed call" -> why no hint can be given.
# Empty on purpose: every error so far has something useful to say. An entry needs a reason.
ALLOWED_WITHOUT_HINT: dict[str, str] = {}


# -- the static scan ---------------------------------------------------------------------------


def _error_class_names(trees: dict[str, ast.Module]) -> set[str]:
    """PeftcliError and its subclasses: those of peftcli.errors plus any defined in the package."""
    names = {n for n, o in vars(errors).items() if inspect.isclass(o) and issubclass(o, errors.PeftcliError)}
    grew = True
    while grew:  # subclasses of subclasses, wherever they are defined
        grew = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names:
                    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases}
                    if bases & names:
                        names.add(node.name)
                        grew = True
    return names


def _bindings(tree: ast.Module, classes: set[str]) -> tuple[dict[str, str], set[str]]:
    """Local names bound to error classes (``from peftcli.errors import X as Y``), and the
    names the errors module itself goes by (``from peftcli import errors``)."""
    local = {n: n for n in classes}  # classes defined in the module itself, or used unqualified
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if node.module and node.module.split(".")[-1] == "errors" and a.name in classes:
                    local[a.asname or a.name] = a.name
                elif a.name == "errors" and node.module in ("peftcli", None):
                    modules.add(a.asname or a.name)
                else:  # e.g. click's UsageError: not ours
                    local.pop(a.asname or a.name, None)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "peftcli.errors":
                    modules.add(a.asname or a.name)
    return local, modules


def _class_called(call: ast.Call, local: dict[str, str], modules: set[str], classes: set[str]) -> str | None:
    f = call.func
    if isinstance(f, ast.Name):
        return local.get(f.id)
    if isinstance(f, ast.Attribute) and f.attr in classes:
        if ast.unparse(f.value) in modules:
            return f.attr
    return None


def _problem(call: ast.Call) -> str | None:
    """Why this construction has no usable hint, or None when it has one."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return "arguments passed with * or ** cannot be checked: pass message and hint explicitly"
    hint = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "hint"), None)
    if hint is None:
        return "no hint"
    if isinstance(hint, ast.Constant) and (hint.value is None or (isinstance(hint.value, str) and not hint.value.strip())):
        return "an empty hint"
    return None


def scan_source(source: str, path: str, classes: set[str]) -> list[str]:
    """``path:line: Class(...): problem`` for each error construction of ``source`` without a hint."""
    tree = ast.parse(source)
    local, modules = _bindings(tree, classes)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            cls = _class_called(node, local, modules, classes)
            if cls is None:
                continue
            problem = _problem(node)
            key = f"{path}: {ast.unparse(node)}"
            if problem and key not in ALLOWED_WITHOUT_HINT:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)[:160]}: {problem}")
    return found


def count_constructions(source: str, classes: set[str]) -> int:
    tree = ast.parse(source)
    local, modules = _bindings(tree, classes)
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and _class_called(n, local, modules, classes))


MODULES = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))
TREES = {m: ast.parse((ROOT / m).read_text(encoding="utf-8")) for m in MODULES}
CLASSES = _error_class_names(TREES)


@pytest.mark.parametrize("module", MODULES)
def test_every_error_has_a_hint(module):
    found = scan_source((ROOT / module).read_text(encoding="utf-8"), module, CLASSES)
    assert not found, "errors without a hint (give each one what to do):\n" + "\n".join(found)


def test_the_scan_sees_the_package_errors():
    # A scan that resolved no names would pass every module; the package raises hundreds.
    assert {"PeftcliError", "BadInputError", "UsageError", "ResourceError", "Interrupted"} <= CLASSES
    total = sum(count_constructions((ROOT / m).read_text(encoding="utf-8"), CLASSES) for m in MODULES)
    assert total > 300, total


def test_the_scan_finds_what_it_must():
    source = '''
from peftcli.errors import BadInputError, UsageError as UE
from peftcli import errors
import peftcli.errors as pe

class MyError(BadInputError):
    pass

def f(msg, exc, args):
    raise BadInputError(msg)                      # 10: no hint
    raise UE(f"--x is {msg}")                     # 11: aliased, no hint
    raise errors.ResourceError("disk")            # 12: through the module
    raise pe.Interrupted("stop", hint=None)       # 13: hint=None
    raise MyError("sub", "")                      # 14: a subclass, empty hint
    raise UE(*args)                               # 15: cannot be checked
    return BadInputError(msg)                     # 16: built, raised elsewhere
    raise BadInputError(msg, "pass --flag")       # fine
    raise UE(msg, hint="use --y")                 # fine
    raise BadInputError(msg, exc.hint)            # fine: a wrapped error's hint
    raise ValueError(msg)                         # not ours
    raise other.BadInputError(msg)                # not the errors module
'''
    classes = _error_class_names({"x": ast.parse(source)}) | CLASSES
    found = scan_source(source, "x.py", classes)
    assert [int(f.split(":")[1]) for f in found] == [10, 11, 12, 13, 14, 15, 16], found
    assert "no hint" in found[0] and "an empty hint" in found[3] and "* or **" in found[5]


# -- end to end --------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def split_error(result, code: int) -> tuple[str, str]:
    """(message, hint) of the one ``error: <message> (<hint>)`` line ``result`` printed."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    line = lines[0]
    assert "internal error" not in line, line
    assert line.endswith(")"), f"no hint in parentheses at the end: {line}"
    depth = 0
    for i in range(len(line) - 1, -1, -1):  # the opening parenthesis matching the final one
        depth += {")": 1, "(": -1}.get(line[i], 0)
        if depth == 0:
            break
    assert line[i - 1] == " ", line
    message, hint = line[len("error: ") : i - 1], line[i + 1 : -1]
    assert message and hint.strip(), line
    return message, hint


def _model_dir(path, config_text: str | None) -> str:
    os.makedirs(path, exist_ok=True)
    save_file({"w": torch.zeros(2, 2)}, os.path.join(path, "model.safetensors"))
    if config_text is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(config_text)
    return str(path)


def test_a_missing_path(tmp_path):
    message, hint = split_error(run("inspect", tmp_path / "loop1"), 1)
    assert message == f"{tmp_path / 'loop1'}: no such file or directory"
    assert "check the path" in hint and ".safetensors" in hint


def test_a_config_that_is_not_an_object(tmp_path):
    model = _model_dir(tmp_path / "e3", "[1, 2]")
    message, hint = split_error(run("inspect", model), 1)
    assert message == f"{model}/config.json: config is not a JSON object"
    assert "replace it with an intact copy" in hint


def test_broken_json_keeps_its_detail_in_the_message_and_adds_a_hint(tmp_path):
    model = _model_dir(tmp_path / "e1", '{"model_type": "llama",, }')
    message, hint = split_error(run("inspect", model), 1)
    try:
        json.loads('{"model_type": "llama",, }')
    except json.JSONDecodeError as exc:
        detail = str(exc)
    # The parenthesis is the hint, not the JSON error.
    assert message == f"{model}/config.json: cannot read config: {detail}"
    assert hint == "the file is corrupt or truncated; replace it with an intact copy"


def test_a_weight_map_that_maps_nothing(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["w"]}))
    message, hint = split_error(run("inspect", d), 1)
    assert message.endswith("weight_map must map tensor names to shard file names")
    assert "index is corrupt" in hint


def test_an_invalid_filter_regex(tiny_llama):
    message, hint = split_error(run("inspect", tiny_llama, "--tensors", "--filter", "layers.(0"), 2)
    assert message.startswith("invalid --filter regex 'layers.(0': missing ), unterminated subpattern")
    assert "regular expression" in hint


def test_an_option_of_another_method_names_the_help_to_read(tiny_llama):
    message, hint = split_error(run("inspect", tiny_llama, "--budget", "lora", "--rounds", "3"), 2)
    assert message == "--rounds is not an option of lora"
    assert "peftcli inject lora --help" in hint
    helped = run("inject", "lora", "--help")  # the command the hint names exists and lists the options
    assert helped.exit_code == 0 and "--rank" in helped.stdout and "--rounds" not in helped.stdout


def test_ctrl_c_is_one_line_with_a_hint(tiny_llama, monkeypatch):
    import peftcli.summary

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peftcli.summary, "summarize", interrupted)
    message, hint = split_error(run("inspect", tiny_llama), 3)
    assert message == "interrupted" and "rerun the command" in hint


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


_TORCH_ADVICE = ("\x1b", "\\x1b", "two options", "weights_only` set to `False`", "add_safe_globals", "Check the documentation")


@pytest.mark.parametrize(
    "payload, named",
    [
        (lambda marker: argparse.Namespace(a=1), "it needs argparse.Namespace, which is not an allowed global"),
        (lambda marker: _RunsCode(marker), "system, which is blocked"),
    ],
    ids=["disallowed-global", "code"],
)
def test_a_pickle_that_weights_only_refuses_gets_our_own_line(tmp_path, payload, named):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": payload(str(marker))}, str(path))
    message, hint = split_error(run("inspect", path, "--allow-pickle"), 1)
    assert message.startswith(f"{path}: refused by torch.load(weights_only=True): ") and message.endswith(named), message
    assert "convert it to safetensors in a trusted environment" in hint
    for text in _TORCH_ADVICE:  # none of torch's paragraph, escapes included
        assert text not in message + hint, text
    assert not marker.exists()


def test_a_plain_pickle_or_random_bytes_are_unreadable_not_refused(tmp_path):
    # An opcode the safe unpickler lacks is what damaged files hit too: "refused ... if you
    # trust the file" would blame safety for what is a broken or foreign file.
    import pickle

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))  # not torch.save: FRAME (opcode 149) comes first
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    for path in (plain, noise):
        message, hint = split_error(run("inspect", path, "--allow-pickle"), 1)
        assert "cannot read it" in message and "refused" not in message, message
        assert "not a PyTorch checkpoint" in hint


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_a_damaged_pickle_is_bad_input_not_a_crash(tmp_path, damage):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello, not a pickle")
    message, hint = split_error(run("inspect", path, "--allow-pickle"), 1)
    assert message.startswith(f"{path}: torch.load(weights_only=True) cannot read it: "), message
    assert not re.search(r"[\x00-\x1f]", message)
    assert hint == "the file is truncated or not a PyTorch checkpoint; replace it with an intact copy"
