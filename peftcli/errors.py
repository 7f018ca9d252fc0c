"""The error hierarchy and its exit codes.

Every failure a user can cause is a ``PeftcliError``; the CLI turns it into one line
``error: <what> (<hint>)`` on stderr and the exit code below. Anything else that escapes
is a bug and is reported as such (with a traceback under ``--debug``).

The library names an option by its field, in backticks (``` `max_length` must be positive ```):
that reads right from Python and as a recipe key, and the CLI, which alone knows the flags,
renders each named field of the running command as its flag (``--max-length``) with
``render_fields``. A flag written out in a library message is only ever part of a whole
command to copy (```run `peftcli train --full` ```).
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_BAD_INPUT = 1  # the input data is wrong: bad file, mismatch, NaN
EXIT_USAGE = 2  # the command line is wrong
EXIT_RESOURCE = 3  # interrupted, disk full, out of memory


class PeftcliError(Exception):
    """Base of every user-facing error. ``hint`` says what to do about it."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(f"{message} ({hint})" if hint else message)
        self.message = message
        self.hint = hint

    def one_line(self, flags: dict[str, str] | None = None) -> str:
        """``error: <what> (<hint>)``; ``flags`` maps field names to the words that replace them
        (the CLI's flags), see ``render_fields``."""
        text = f"error: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        if flags:
            text = render_fields(text, flags)
        # One line, whatever the message carried (file names with newlines, JSON errors), and
        # no control character from a file name or config value reaching a terminal raw.
        return terminal_safe(" ".join(text.split()))


# A field named in a message: a Python identifier in backticks.
FIELD_REF = re.compile(r"`([a-z_][a-z0-9_]*)`")


def render_fields(text: str, flags: dict[str, str]) -> str:
    """``text`` with each backticked field name that ``flags`` knows replaced by its flag; other
    backticked words (fields of another command, code) are left as they are."""
    return FIELD_REF.sub(lambda m: flags.get(m.group(1), m.group(0)), text)


# C0 controls but the newline, DEL and C1, lone surrogates (unwritable as UTF-8) and the bidi
# overrides and isolates (they reorder what a terminal shows).
UNSAFE_CHARS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


# The streams' safety net (cli.output.EscapingStream) lets tab and carriage return through:
# progress bars of the libraries we call (tqdm) redraw their line with \r, and neither can
# start an escape sequence. Text from files goes through terminal_safe itself first.
STREAM_UNSAFE_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def stream_safe(text: str) -> str:
    """``text`` as the escaping streams write it: ``terminal_safe`` but for tab and CR."""
    return STREAM_UNSAFE_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


def terminal_safe(text: str) -> str:
    """``text`` with every control character but the newline written visibly (ESC as \\x1b)."""
    return UNSAFE_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


class BadInputError(PeftcliError):
    """The input files are missing, corrupt or inconsistent with each other."""

    exit_code = EXIT_BAD_INPUT


class UsageError(PeftcliError):
    """Options that cannot work together, or values out of range."""

    exit_code = EXIT_USAGE


class ResourceError(PeftcliError):
    """The machine failed us: disk full, permission denied on output, out of memory."""

    exit_code = EXIT_RESOURCE


class Interrupted(PeftcliError):
    """The user interrupted the run (Ctrl-C)."""

    exit_code = EXIT_RESOURCE
