"""Where output goes: results on stdout (plain, rich or one JSON document), the rest on stderr.

Consoles are made per call, not at import, so tests that swap sys.stdout see the output.
Rich drops colour by itself when the stream is not a terminal or NO_COLOR is set.
"""

from __future__ import annotations

import json
import os
import sys

import click


def styled(stream) -> bool:
    """ANSI styling only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def _console(stream):
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # The reader went away (`| head`): quiet success, as with --json output.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            raise SystemExit(0)

    on_tty = styled(stream)
    # Off a terminal, a fixed wide width keeps table rows on one line for grep and awk;
    # color_system=None drops every escape sequence (bold and italic too, which NO_COLOR alone keeps).
    # markup=False: tensor names and paths such as "x[/]y" are data, never rich markup.
    return _Console(
        file=stream,
        width=None if on_tty else 200,
        color_system="auto" if on_tty else None,
        force_terminal=on_tty,
        highlight=False,
        markup=False,
    )


def printable(text: object) -> str:
    """Names from files, safe for a terminal: control characters and lone surrogates escaped."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else repr(c)[1:-1] for c in s)


def stdout_console():
    return _console(sys.stdout)


def stderr_console():
    return _console(sys.stderr)


def emit_json(document: object) -> None:
    """Exactly one JSON document on stdout."""
    try:
        text = json.dumps(document, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:  # NaN/Inf are not JSON: emit null rather than an invalid document
        text = json.dumps(_finite(document), indent=2, sort_keys=False)
    click.echo(text)


def _finite(obj):
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
