"""Where output goes: results on stdout (plain, rich or one JSON document), the rest on stderr.

Consoles are made per call, not at import, so tests that swap sys.stdout see the output.
Rich drops colour by itself when the stream is not a terminal or NO_COLOR is set.

Text from files (tensor names, config values, a diff's metadata, paths in error messages)
never reaches a terminal raw: while a command runs, sys.stdout and sys.stderr are
``EscapingStream``s that write every control character but the newline as visible text
(``\x1b``), so no ESC/OSC sequence can clear the screen or retitle the window, whoever
prints (click, logging, warnings). Rich consoles on a terminal write to the stream beneath,
for their own styling, and escape the text they lay out instead.
"""

from __future__ import annotations

import json
import os
import sys

import click

from peftcli.errors import UNSAFE_CHARS as _UNSAFE, stream_safe, terminal_safe  # noqa: F401 (terminal_safe re-exported)


class EscapingStream:
    """A text stream that writes through ``stream_safe`` (ESC, BEL, C1 ... escaped; tab and CR kept
    for other libraries' progress lines); bytes (``.buffer``) pass untouched."""

    def __init__(self, stream) -> None:
        self.raw = stream

    def write(self, text: str) -> int:
        self.raw.write(stream_safe(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):  # buffer, fileno, isatty, flush, encoding, ...
        return getattr(self.raw, name)


def escape_std_streams():
    """Make sys.stdout and sys.stderr escaping streams; returns the function that restores them."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, EscapingStream):
        sys.stdout = EscapingStream(sys.stdout)
    if not isinstance(sys.stderr, EscapingStream):
        sys.stderr = EscapingStream(sys.stderr)

    def restore() -> None:
        sys.stdout, sys.stderr = saved

    return restore


def styled(stream) -> bool:
    """ANSI styling only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def _console(stream):
    from rich.console import Console
    from rich.segment import Segment

    class _Console(Console):
        def render_str(self, text: str, **kwargs):
            # Strings are escaped before layout, so a table's columns line up around "\x1b".
            return super().render_str(terminal_safe(text), **kwargs)

        def render(self, renderable, options=None):
            # Text that reached rich some other way (Text objects): escaped after layout.
            for segment in super().render(renderable, options):
                if segment.control or not _UNSAFE.search(segment.text):
                    yield segment
                else:
                    yield Segment(terminal_safe(segment.text), segment.style, segment.control)

        def on_broken_pipe(self) -> None:
            # The reader went away (`| head`): quiet success, as with --json output.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            raise SystemExit(0)

    on_tty = styled(stream)
    if on_tty:  # rich styles with escape sequences of its own, so it writes beneath the escaping
        stream = getattr(stream, "raw", stream) if isinstance(stream, EscapingStream) else stream
    # Off a terminal, a fixed wide width keeps table rows on one line for grep and awk, and
    # the padding rich adds up to that width is stripped from each line's end;
    # color_system=None drops every escape sequence (bold and italic too, which NO_COLOR alone keeps).
    # markup=False: tensor names and paths such as "x[/]y" are data, never rich markup;
    # emoji=False: nor is ":warning:" in one an emoji code.
    return _Console(
        file=stream if on_tty else _TrailingSpaceStripper(stream),
        width=None if on_tty else 200,
        color_system="auto" if on_tty else None,
        force_terminal=on_tty,
        highlight=False,
        markup=False,
        emoji=False,
    )


class _TrailingSpaceStripper:
    """A text stream that drops the spaces at the end of each line written through it."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._partial = ""  # the start of a line whose end has not been written yet

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self._stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._partial.strip(" ") == "":
            pass  # only padding so far: it may yet end its line, where it goes
        else:
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name):  # encoding, errors, ...
        return getattr(self._stream, name)


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


# --quiet: nothing on stderr but the error line. sys.stderr is swapped for /dev/null while the
# command runs, so progress bars, notes and warnings from any library go nowhere, and the
# group prints a failure to the stream saved here (restored when the command returns).
_real_stderr = None


def silence_stderr() -> None:
    global _real_stderr
    if _real_stderr is None:
        _real_stderr = sys.stderr
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def restore_stderr() -> None:
    global _real_stderr
    if _real_stderr is not None:
        silenced, sys.stderr, _real_stderr = sys.stderr, _real_stderr, None
        silenced.close()


def error_stream():
    """Where the one-line error goes: stderr, also under --quiet."""
    return _real_stderr or sys.stderr


def _quiet_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        silence_stderr()
    return value


QUIET_HELP = "Nothing on stderr but errors (no progress bars, notes or warnings)."
quiet_option = click.option("--quiet", is_flag=True, callback=_quiet_callback, help=QUIET_HELP)


def add_quiet(command: click.Command) -> None:
    """Give ``command`` (and a group's subcommands) ``--quiet`` unless it declares its own."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_quiet(sub)
        return
    if not any(p.name == "quiet" for p in command.params):
        command.params.append(click.Option(["--quiet"], is_flag=True, expose_value=False, callback=_quiet_callback, help=QUIET_HELP))
