"""Options declared once, as dataclass fields, and reused by the CLI, recipes and --help.

A field made with ``option(...)`` carries its help text, flag spelling, choices and bounds;
the CLI layer turns a config class into its command-line flags, and ``from_options`` builds
the config back from the parsed values (or a recipe step's keys), so a flag and a config key
can never disagree. This module is plain Python: the library declares and validates its own
options, and only the CLI layer knows how a command line is parsed.

Every value is checked by its declaration before a config is built (from the CLI and from a
recipe alike): numbers are written in ASCII digits (Python's int() and float() also read
'١٢'), a float is finite unless its field says ``finite=False``, and an int lies within
``min``/``max``, by default ±10**12 (more than any count in a model or a run).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from peftcli.errors import PeftcliError, UsageError

MAX_COUNT = 10**12  # the default bound of an int option: more entries than any model has
MAX_STEPS = 10**9  # steps, intervals: a billion steps is years of training


def option(
    default: Any, *decls: str, help: str, metavar: str | None = None,
    finite: bool = True, min: int | None = None, max: int | None = None,
    choices: tuple[str, ...] | None = None, flag: str | None = None, show_default: bool = False,
    required: bool = False, path: bool = False,
) -> Any:
    """A config field that is also a CLI flag. ``finite``: a float must be finite; ``min``/``max``:
    an int's bounds (default ±MAX_COUNT); ``choices``: the values a string may take; ``flag``: the
    long flag when it is not ``--field-name``; ``show_default``: --help shows the default;
    ``required``: the command line must give it; ``path``: a filesystem path (a recipe resolves it
    against its workdir)."""
    meta = {
        "decls": decls, "help": help, "metavar": metavar, "finite": finite, "min": min, "max": max,
        "choices": choices, "flag": flag, "show_default": show_default, "required": required, "path": path,
    }
    return dataclasses.field(default=default, metadata=meta)


def borrowed(cls: type, name: str, **changes: Any) -> Any:
    """The option ``name`` of ``cls`` declared again in another options class: the same
    default, flag, help and bounds (``changes`` replaces metadata such as ``help``), so two
    commands that take one option cannot drift apart."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return dataclasses.field(default=f.default, metadata={**f.metadata, **changes})


def flag_name(field: dataclasses.Field) -> str:
    """The long flag of an option field: ``--field-name`` unless its declaration names another."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)", re.ASCII | re.IGNORECASE)


def ascii_int(text: str) -> int | None:
    """``text`` as an int written in ASCII digits, else None (int() also reads '١٢' and '1_000')."""
    text = str(text).strip()
    return int(text) if _INT_TEXT.fullmatch(text) else None


def ascii_float(text: str) -> float | None:
    """``text`` as a float written in ASCII (nan and inf included), else None."""
    text = str(text).strip()
    return float(text) if _FLOAT_TEXT.fullmatch(text) else None


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def from_options(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """Build ``cls`` from parsed command-line values (or a recipe's); options not given keep the class default.

    A value its declaration refuses (nan, out of bounds, a string for a number) is a
    UsageError, unless the config's own checks refuse it first with a message of their own.
    ``fixed``: fields that are not options (a merge method's ``params``), passed as they are."""
    fields = {f.name: f for f in option_fields(cls)}
    given = {k: v for k, v in values.items() if k in fields and v is not None}
    hints = typing.get_type_hints(cls)
    problem = next((p for k, v in given.items() if (p := value_problem(fields[k], hints, v))), None)
    try:
        cfg = cls(**given, **fixed)
    except PeftcliError:
        raise
    except (TypeError, ValueError, ArithmeticError):  # a declared check explains what broke the config
        if problem is None:
            raise
        raise problem from None
    if problem is not None:
        raise problem
    return cfg


def check_declared(cfg: Any) -> None:
    """Raise the first value of ``cfg`` (a config instance) that its declaration refuses."""
    hints = typing.get_type_hints(type(cfg))
    for f in option_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if value is not None and (problem := value_problem(f, hints, value)):
            raise problem


def value_problem(field: dataclasses.Field, hints: dict[str, Any], value: Any) -> UsageError | None:
    """The error to raise when ``value`` breaks ``field``'s declaration, else None."""
    flag = f"`{field.name}`"  # the CLI renders it as the flag, a recipe reads it as its key
    hint = hints[field.name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    meta = field.metadata
    if meta.get("choices") and value not in meta["choices"]:
        return UsageError(f"{flag} {value!r} is not one of {', '.join(meta['choices'])}", f"choose one of: {', '.join(meta['choices'])}")
    if int in kinds and float not in kinds:
        if not isinstance(value, int) or isinstance(value, bool):
            return UsageError(f"{flag} {value!r} is not an integer", f"give {flag} a whole number in digits 0-9")
        lo = meta.get("min") if meta.get("min") is not None else -MAX_COUNT
        hi = meta.get("max") if meta.get("max") is not None else MAX_COUNT
        if value > hi:
            return UsageError(f"{flag} {value:,} is more than {hi:,}", f"give {flag} at most {hi:,}")
        if value < lo:
            return UsageError(f"{flag} {value:,} is less than {lo:,}", f"give {flag} at least {lo:,}")
    if float in kinds:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return UsageError(f"{flag} {value!r} is not a number", f"give {flag} a number such as {field.default or 1}")
        if meta.get("finite", True) and not _finite(value):
            return UsageError(f"{flag} {value} is not a finite number", f"give {flag} a number such as {field.default or 1}")
    return None


def _finite(value: float | int) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False
