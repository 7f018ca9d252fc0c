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

    on_tty = styled(stream)
    # Off a terminal, a fixed wide width keeps table rows on one line for grep and awk;
    # color_system=None drops every escape sequence (bold and italic too, which NO_COLOR alone keeps).
    return Console(
        file=stream,
        width=None if on_tty else 200,
        color_system="auto" if on_tty else None,
        force_terminal=on_tty,
        highlight=False,
    )


def stdout_console():
    return _console(sys.stdout)


def stderr_console():
    return _console(sys.stderr)


def emit_json(document: object) -> None:
    """Exactly one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=False))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")
