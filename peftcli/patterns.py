"""Regular expressions from users and files, matched in bounded time with Python's ``re`` semantics.

A pattern such as ``(a+)+$`` makes Python's backtracking ``re`` run for longer than the
universe on a module name of a few dozen characters, and ``re`` cannot be interrupted. Every
pattern that comes from the command line (``--targets``, ``--filter``, ``--dense``, ...) or
from a file (``target_modules`` in ``adapter_config.json``) is therefore:

- parsed by Python's own ``re`` parser, so the syntax accepted and its meaning are exactly
  ``re``'s (PEFT matches ``target_modules`` with ``re.fullmatch``);
- written back out from that parse tree in the plain subset of syntax that the ``regex``
  package reads the same way (a literal ``{e<=1}`` stays a literal, not a fuzzy match), with
  ``\\d \\w \\s \\b`` spelled as the character sets of Python's own Unicode tables;
- matched by ``regex``, whose matching can be stopped: all matching of one command shares one
  budget of CPU time (``PEFTCLI_PATTERN_BUDGET`` seconds, default 5), after which the command
  fails with one line naming the pattern and where it came from.

The one remaining difference from ``re``: case-insensitive matching (``(?i)``) of non-ASCII
letters follows ``regex``'s Unicode case folding.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

if sys.version_info >= (3, 11):  # a version test, not try/except: mypy checks the branch of its python_version
    from re import _constants as _c
    from re import _parser as _sre_parse
else:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _sre_parse

from peftcli.errors import BadInputError, UsageError

BUDGET_ENV = "PEFTCLI_PATTERN_BUDGET"
DEFAULT_BUDGET_S = 5.0
MAX_PATTERN_CHARS = 100_000
# regex unrolls counted repeats when it compiles: (?:a{1000}){1000} takes 300 MB, bigger counts
# more than any machine has. The size counts pattern nodes (a set: its ranges, \w about 740 of
# them) with every counted repeat unrolled; 200,000 compile to some 50 MB.
MAX_PATTERN_SIZE = 200_000
_CATEGORY_SIZE = 800  # ranges of the largest class (\w) in Python's Unicode tables, rounded up
MAX_SHOWN = 60  # characters of a pattern quoted in an error
FILTER_HINT = r"the filter is a Python regular expression over tensor names, e.g. 'layers\.0\..*proj'"


class FileValue(str):
    """A pattern read from a file: errors about it name ``origin`` and are bad input (exit 1)."""

    origin = ""


def from_file(value: Any, origin: str) -> Any:
    """A string ``value`` marked as read from a file, e.g. ``from_file(s, "adapter_config.json
    target_modules")``; anything else (None, a list) unchanged."""
    if not isinstance(value, str):
        return value
    marked = FileValue(value)
    marked.origin = origin
    return marked


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.total = self.left = seconds


_command_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("peftcli_pattern_budget", default=None)


def budget_seconds() -> float:
    """Seconds all pattern matching of one command may take (``PEFTCLI_PATTERN_BUDGET``)."""
    value = os.environ.get(BUDGET_ENV, "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_BUDGET_S
    except ValueError:
        seconds = DEFAULT_BUDGET_S
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_BUDGET_S


@contextlib.contextmanager
def command_budget(seconds: float | None = None) -> Iterator[None]:
    """Every pattern matched inside shares one budget (the CLI opens one per command).

    Outside any, each match has a budget of its own."""
    token = _command_budget.set(_Budget(seconds if seconds is not None else budget_seconds()))
    try:
        yield
    finally:
        _command_budget.reset(token)


def shown(pattern: str) -> str:
    """The pattern as quoted in an error: repr, long ones cut in the middle."""
    text = repr(str(pattern))
    if len(text) > MAX_SHOWN:
        text = text[: MAX_SHOWN // 2] + "…" + text[-MAX_SHOWN // 2 :]
    return text


class Pattern:
    """A user or file pattern, compiled once; ``fullmatch``/``search`` return bools in bounded time."""

    def __init__(self, pattern: str, source: str, hint: str = "see Python's re syntax") -> None:
        self.text = str(pattern)
        origin = getattr(pattern, "origin", "")
        self.source = origin or source
        self.error = BadInputError if origin else UsageError
        self._hint = f"fix {origin} in the file" if origin else hint
        try:
            self._compiled = _compile(self.text)
        except _Refused as exc:
            raise self.error(f"invalid {self.source} regex {shown(self.text)}: {exc}", self._hint) from None

    def fullmatch(self, text: str) -> bool:
        return self._run(self._compiled.fullmatch, text)

    def search(self, text: str) -> bool:
        return self._run(self._compiled.search, text)

    def _run(self, match: Callable[..., Any], text: str) -> bool:
        # Outside a command (library use) each match has a budget of its own: a compiled pattern
        # can live long (cached), and a budget that only ever shrank would fail it one day.
        budget = _command_budget.get() or _Budget(budget_seconds())
        if budget.left <= 0:
            raise self._too_slow(budget)
        start = time.thread_time()  # regex's timeout counts CPU time too: a busy machine only stretches it
        try:
            return match(text, timeout=budget.left) is not None
        except TimeoutError:
            budget.left = 0.0
            raise self._too_slow(budget) from None
        finally:
            budget.left -= time.thread_time() - start

    def _too_slow(self, budget: _Budget) -> Exception:
        return self.error(
            f"{self.source} regex {shown(self.text)} did not finish matching in {budget.total:g} s of CPU time "
            "(nested repeats such as (a+)+ backtrack without end)",
            self._hint + f"; a simpler pattern, or more time with {BUDGET_ENV}=SECONDS",
        )


def compile_pattern(pattern: str, source: str, hint: str = "see Python's re syntax") -> Pattern:
    return Pattern(pattern, source, hint)


@functools.lru_cache(maxsize=64)
def _search_pattern(pattern: str, source: str) -> Pattern:
    return Pattern(pattern, source)


@functools.lru_cache(maxsize=64)
def _fullmatch_pattern(pattern: str, source: str, origin: str) -> Pattern:
    return Pattern(from_file(pattern, origin) if origin else pattern, source)


def fullmatch(pattern: str, text: str, source: str) -> bool:
    """``re.fullmatch(pattern, text) is not None``, bounded, compiled once per pattern (a
    ``from_file``-marked pattern keeps its origin for errors, as ``Pattern`` does)."""
    return _fullmatch_pattern(str(pattern), source, getattr(pattern, "origin", "")).fullmatch(text)


def search(pattern: str, text: str, source: str) -> bool:
    """``re.search(pattern, text) is not None``, bounded; for callers that get the pattern per call."""
    if isinstance(pattern, FileValue):
        return Pattern(pattern, source).search(text)  # not cached: the cache key would drop the origin
    return _search_pattern(pattern, source).search(text)


# -- compiling: Python's parse tree, written out for regex -------------------------------------


class _Refused(Exception):
    """Why a pattern cannot be compiled (the message of the user's error)."""


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> Any:  # a regex.Pattern
    import regex

    if len(pattern) > MAX_PATTERN_CHARS:
        raise _Refused(f"{len(pattern):,} characters, more than the {MAX_PATTERN_CHARS:,} a pattern may have")
    try:
        with warnings.catch_warnings():  # re's FutureWarning on '[[' is about its future, not this match
            warnings.simplefilter("ignore")
            re.compile(pattern)  # what re refuses is refused, with re's message (look-behind width, ...)
            tree = _sre_parse.parse(pattern)
        size = _size(tree.data)
    except (re.error, OverflowError, ValueError) as exc:
        raise _Refused(str(exc)) from None
    except RecursionError:
        raise _Refused("nested too deeply") from None
    if size > MAX_PATTERN_SIZE:
        raise _Refused(f"its counted repeats unroll to {size:,} steps, more than {MAX_PATTERN_SIZE:,}")
    flags = tree.state.flags
    ascii_only = bool(flags & _c.SRE_FLAG_ASCII)
    try:
        text = _Writer(ascii_only).items(tree.data)
        engine_flags = regex.VERSION0 | _engine_flags(flags, regex)
        return regex.compile(text, engine_flags)
    except RecursionError:
        raise _Refused("nested too deeply") from None
    except (regex.error, OverflowError, ValueError) as exc:  # pragma: no cover - re accepted it
        raise _Refused(f"not supported: {exc}") from None


def _engine_flags(flags: int, regex: Any) -> int:
    out = 0
    for sre_flag, name in ((_c.SRE_FLAG_IGNORECASE, "IGNORECASE"), (_c.SRE_FLAG_MULTILINE, "MULTILINE"),
                           (_c.SRE_FLAG_DOTALL, "DOTALL"), (_c.SRE_FLAG_ASCII, "ASCII")):
        if flags & sre_flag:
            out |= getattr(regex, name)
    return out


def _size(items: Iterable[tuple[Any, Any]]) -> int:
    """Pattern nodes with counted repeats unrolled (regex's compiled size grows with it)."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            count = lo if hi == _c.MAXREPEAT else hi
            total += 1 + max(1, count) * _size(sub)
        elif op is _c.SUBPATTERN:
            total += 1 + _size(av[-1])
        elif op is _c.BRANCH:
            total += 1 + sum(_size(alt) for alt in av[1])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            total += 1 + _size(av[1])
        elif op is _c.GROUPREF_EXISTS:
            total += 1 + _size(av[1]) + (_size(av[2]) if av[2] else 0)
        elif op is _ATOMIC:
            total += 1 + _size(av)
        elif op is _c.IN:
            total += 1 + sum(_CATEGORY_SIZE if kind is _c.CATEGORY else 1 for kind, _ in av)
        elif op is _c.AT and av in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
            total += 4 * _CATEGORY_SIZE  # written as look-arounds on \w
        else:
            total += 1
    return total


_ATOMIC = getattr(_c, "ATOMIC_GROUP", object())
_POSSESSIVE = getattr(_c, "POSSESSIVE_REPEAT", object())
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT, _POSSESSIVE)
_INLINE_FLAGS = ((_c.SRE_FLAG_IGNORECASE, "i"), (_c.SRE_FLAG_MULTILINE, "m"), (_c.SRE_FLAG_DOTALL, "s"),
                 (_c.SRE_FLAG_ASCII, "a"), (_c.SRE_FLAG_UNICODE, "u"))


def _char(code: int) -> str:
    """One code point, escaped so that no engine reads it as syntax."""
    return chr(code) if chr(code).isascii() and chr(code).isalnum() else f"\\U{code:08x}"


class _Writer:
    """re's parse tree as pattern text for regex (VERSION0): groups keep their numbers."""

    def __init__(self, ascii_only: bool) -> None:
        self.ascii_only = ascii_only

    def items(self, items: Iterable[tuple[Any, Any]]) -> str:
        return "".join(self.item(op, av) for op, av in items)

    def item(self, op: Any, av: Any) -> str:  # noqa: C901 - one branch per opcode of re's parser
        if op is _c.LITERAL:
            return _char(av)
        if op is _c.NOT_LITERAL:
            return f"[^{_char(av)}]"
        if op is _c.ANY:
            return "."
        if op is _c.IN:
            return self.charset(av)
        if op is _c.AT:
            return self.at(av)
        if op is _c.BRANCH:
            return "(?:" + "|".join(self.items(alt) for alt in av[1]) + ")"
        if op is _c.SUBPATTERN:
            group, add, delete, sub = av
            outer = self.ascii_only
            if add & (_c.SRE_FLAG_ASCII | _c.SRE_FLAG_UNICODE):  # (?a:...) and (?u:...) change \\w's meaning
                self.ascii_only = bool(add & _c.SRE_FLAG_ASCII)
            try:
                inner = self.items(sub)
            finally:
                self.ascii_only = outer
            if add or delete:
                on = "".join(c for f, c in _INLINE_FLAGS if add & f)
                off = "".join(c for f, c in _INLINE_FLAGS if delete & f)
                inner = f"(?{on}{'-' + off if off else ''}:{inner})"
            return f"({inner})" if group is not None else f"(?:{inner})"
        if op in _REPEATS:
            lo, hi, sub = av
            count = f"{{{lo},}}" if hi == _c.MAXREPEAT else f"{{{lo},{hi}}}"
            mode = "?" if op is _c.MIN_REPEAT else "+" if op is _POSSESSIVE else ""
            return f"(?:{self.items(sub)}){count}{mode}"
        if op is _c.GROUPREF:
            return f"(?:\\g<{av}>)"
        if op is _c.GROUPREF_EXISTS:
            group, yes, no = av
            return f"(?({group}){self.items(yes)}|{self.items(no) if no else ''})"
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            direction, sub = av
            kind = ("<" if direction < 0 else "") + ("=" if op is _c.ASSERT else "!")
            return f"(?{kind}{self.items(sub)})"
        if op is _ATOMIC:
            return f"(?>{self.items(av)})"
        raise _Refused(f"not supported: {op}")  # pragma: no cover - an opcode of a newer Python

    def charset(self, av: Any) -> str:
        negate = bool(av) and av[0][0] is _c.NEGATE
        parts = []
        for op, value in av[1:] if negate else av:
            if op is _c.LITERAL:
                parts.append(_char(value))
            elif op is _c.RANGE:
                parts.append(f"{_char(value[0])}-{_char(value[1])}")
            elif op is _c.CATEGORY:
                parts.append(self.category(value))
            else:  # pragma: no cover - re's parser puts nothing else in a set
                raise _Refused(f"not supported in a set: {op}")
        return "[" + ("^" if negate else "") + "".join(parts) + "]"

    def category(self, code: Any) -> str:
        """\\d \\w \\s (and negations) as the set re uses: Python's Unicode tables, or ASCII."""
        name = str(code)
        negated = "_NOT_" in name
        kind = name.rsplit("_", 1)[-1]  # DIGIT, WORD, SPACE
        ranges = _ASCII_CLASSES[kind] if self.ascii_only else _unicode_class(kind)
        if negated:  # inside a set, a negated class is the union of what lies between its ranges
            ranges = _complement(ranges)
        return "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)

    def at(self, code: Any) -> str:
        if code is _c.AT_BOUNDARY or code is _c.AT_NON_BOUNDARY:
            word = "[" + self.category(_c.CATEGORY_WORD) + "]"
            boundary = f"(?:(?<={word})(?!{word})|(?<!{word})(?={word}))"
            if code is _c.AT_BOUNDARY:
                return boundary
            # Before Python 3.14, re's \B never matches in an empty string (gh-124130).
            return f"(?!{boundary})" + ("(?!\\A\\Z)" if sys.version_info < (3, 14) else "")
        return {
            _c.AT_BEGINNING: "^", _c.AT_BEGINNING_STRING: "\\A", _c.AT_END: "$", _c.AT_END_STRING: "\\Z",
        }[code]


_ASCII_CLASSES = {
    "DIGIT": ((0x30, 0x39),),
    "SPACE": ((0x09, 0x0D), (0x20, 0x20)),
    "WORD": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
}
_UNICODE_TESTS = {
    "DIGIT": str.isdecimal,  # re's \d: Py_UNICODE_ISDECIMAL
    "SPACE": str.isspace,  # re's \s: Py_UNICODE_ISSPACE
    "WORD": lambda c: c.isalnum() or c == "_",  # re's \w: Py_UNICODE_ISALNUM or '_'
}


@functools.cache
def _unicode_class(kind: str) -> tuple[tuple[int, int], ...]:
    """The code point ranges re's Unicode ``\\d``/``\\w``/``\\s`` match (Python's tables, built once)."""
    test = _UNICODE_TESTS[kind]
    ranges: list[tuple[int, int]] = []
    start = None
    for code in range(0x110000):
        inside = test(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))
    return tuple(ranges)


def _complement(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out, next_code = [], 0
    for lo, hi in ranges:
        if lo > next_code:
            out.append((next_code, lo - 1))
        next_code = hi + 1
    if next_code <= 0x10FFFF:
        out.append((next_code, 0x10FFFF))
    return tuple(out)
