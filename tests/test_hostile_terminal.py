"""Terminal injection: control characters in file-borne text never reach stdout or stderr raw.

A config.json ``model_type``, a tensor name in a safetensors header, a ``.diff``'s method and a
path in an error message carry ESC/OSC sequences (clear the screen, retitle the window); the
human output shows them escaped (``\\x1b``) and nothing else changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from tests.helpers import noisy_copy
from tests.safetensors_craft import make_file, write

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"
# Every C0 control but the newline, DEL, C1: none may be written raw.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_no_raw_controls(result) -> None:
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        found = RAW_CONTROL.search(text)
        assert found is None, f"raw {found.group()!r} on {name}: {text!r}"


def _hostile_config_model(base: str, out) -> str:
    shutil.copytree(base, out)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config.update(model_type="llama" + HOSTILE, architectures=["Evil" + HOSTILE])
    json.dump(config, open(path, "w"))
    return str(out)


def test_config_values_are_escaped_in_inspect(tiny_llama, tmp_path):
    model = _hostile_config_model(tiny_llama, tmp_path / "m")
    result = invoke("inspect", model)
    assert result.exit_code == 0, result.output
    assert_no_raw_controls(result)
    assert "llama\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202e" in result.stdout  # shown, visibly
    assert json.loads(invoke("inspect", model, "--json").stdout)["config"]["model_type"] == "llama" + HOSTILE


def test_a_tensor_name_is_escaped_in_the_listing(tmp_path):
    name = "layers.0." + HOSTILE + "[bold]x[/bold].weight"  # rich markup is data too
    path = write(tmp_path / "m.safetensors", make_file(
        {name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, struct.pack("<4f", 1, 2, 3, 4)
    ))
    result = invoke("inspect", path, "--tensors")
    assert result.exit_code == 0, result.output
    assert_no_raw_controls(result)
    assert "[bold]x[/bold].weight" in result.stdout


def _set_diff_metadata(path: str, **values) -> None:
    """Rewrite a .diff's safetensors header with ``values`` in its __metadata__."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(values)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_a_diffs_method_is_escaped(tiny_llama, tmp_path):
    ft = noisy_copy(tiny_llama, str(tmp_path / "ft"), seed=3)
    diff = tmp_path / "x.diff"
    made = invoke("diff", tiny_llama, ft, "-o", diff, "--density", "0.1")
    assert made.exit_code == 0, made.output
    _set_diff_metadata(str(diff), method="lt-sft" + HOSTILE)
    result = invoke("inspect", diff)
    assert_no_raw_controls(result)
    assert "\\x1b]0;pwned" in result.stdout + result.stderr


@pytest.mark.parametrize("args", [
    ["inspect", "/nonexistent/" + HOSTILE + "model"],
    ["merge", "/nonexistent/" + HOSTILE, "/nonexistent/b", "-o", "/nonexistent/out"],
    ["inspect", "{model}", "--filter", "(" + HOSTILE],
    ["inject", "lora", "{model}", "-o", "{tmp}/o", "--targets", HOSTILE + "x"],
])
def test_error_lines_escape_what_they_quote(tiny_llama, tmp_path, args):
    result = invoke(*[a.replace("{model}", tiny_llama).replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code != 0
    assert_no_raw_controls(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "\\x1b" in lines[0], result.stderr


def test_on_a_terminal_rich_styles_but_data_stays_escaped(tiny_llama, tmp_path, monkeypatch):
    """On a tty rich writes its own styling escapes; the file's sequences are still shown escaped."""
    import io
    import sys

    from peftcli.cli.output import EscapingStream, stdout_console
    from peftcli.cli.render import render_inspect
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.summary import summarize

    class Tty(io.StringIO):
        def isatty(self):
            return True

    model = _hostile_config_model(tiny_llama, tmp_path / "m")
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", EscapingStream(tty))
    with open_checkpoint(model) as ckpt:
        render_inspect(summarize(ckpt), stdout_console())
    text = tty.getvalue()
    assert "\x1b[1m" in text  # rich's own bold reached the terminal
    assert "\x07" not in text and "\x1b]" not in text and "\x1b[2J" not in text and "\x9b" not in text
    assert "\\x1b]0;pwned\\x07" in text


def test_the_stream_safety_net_keeps_progress_redraws_but_not_escapes():
    """Other libraries' progress lines (tqdm) redraw with CR: the streams let CR and tab through,
    never ESC or BEL; text from files is escaped whole before it gets there (terminal_safe)."""
    import io

    from peftcli.cli.output import EscapingStream
    from peftcli.errors import terminal_safe

    raw = io.StringIO()
    EscapingStream(raw).write("\rWriting shards: 50%\t|\x1b]0;x\x07")
    assert raw.getvalue() == "\rWriting shards: 50%\t|\\x1b]0;x\\x07"
    assert terminal_safe("a\rb\tc") == "a\\rb\\tc"
