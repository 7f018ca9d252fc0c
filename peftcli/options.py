"""Options declared once, as dataclass fields, and reused by the CLI, recipes and --help.

A field made with ``option(...)`` carries its help text and flag spelling; ``click_options``
turns a config class into click decorators and ``from_options`` builds the config back
from click's keyword arguments, so a flag and a config key can never disagree.

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
from typing import Any, Callable

import click

from peftcli.errors import PeftcliError, UsageError

MAX_COUNT = 10**12  # the default bound of an int option: more entries than any model has
MAX_STEPS = 10**9  # steps, intervals: a billion steps is years of training


def option(
    default: Any, *decls: str, help: str, metavar: str | None = None,
    finite: bool = True, min: int | None = None, max: int | None = None,
) -> Any:
    """A config field that is also a CLI flag. ``finite``: a float must be finite; ``min``/``max``:
    an int's bounds (default ±MAX_COUNT)."""
    meta = {"decls": decls, "help": help, "metavar": metavar, "finite": finite, "min": min, "max": max}
    return dataclasses.field(default=default, metadata=meta)


_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)", re.ASCII | re.IGNORECASE)


class AsciiInt(click.ParamType):
    """click's int (or IntRange), in ASCII digits only (int() reads '١٢' and '1_000' too)."""

    name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min, self.max = min, max

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            if not _INT_TEXT.fullmatch(text):
                self.fail(f"{value!r} is not a valid integer (digits 0-9 only)", param, ctx)
            number = int(text)
        if self.min is not None and number < self.min or self.max is not None and number > self.max:
            self.fail(f"{number} is not in the range {self.min}<=x<={self.max}", param, ctx)
        return number


class AsciiFloat(click.ParamType):
    """click's float, in ASCII only; ``finite`` also refuses nan and inf."""

    name = "float"

    def __init__(self, finite: bool = True) -> None:
        self.finite = finite

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            text = str(value).strip()
            if not _FLOAT_TEXT.fullmatch(text):
                self.fail(f"{value!r} is not a valid float (digits 0-9 only)", param, ctx)
            number = float(text)
        if self.finite and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


INT = AsciiInt()
FLOAT = AsciiFloat()
SEED = AsciiInt(0, 2**63 - 1)


def _flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _click_type(field: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, bool]:
    """(click type, is_flag) from the field's annotation."""
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return None, True
    # Floats parse leniently here (nan too): from_options checks them after the config's own
    # checks, whose messages say more ("--alpha must be a positive number").
    return {int: INT, float: AsciiFloat(finite=False), str: str}.get(base, str), False


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def click_options(*classes: type) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of ``classes`` (shared names merged)."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            if f.name in seen:
                continue  # the same option declared by two methods: one flag serves both
            seen[f.name] = (f, hints)

    def decorate(func: Callable) -> Callable:
        for f, hints in reversed(list(seen.values())):
            ctype, is_flag = _click_type(f, hints)
            decls = (_flag_name(f), *f.metadata["decls"])
            kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": None, "show_default": False}
            if is_flag:
                kwargs["is_flag"] = True
                kwargs["default"] = None
            else:
                kwargs["type"] = ctype
                if f.metadata.get("metavar"):
                    kwargs["metavar"] = f.metadata["metavar"]
            func = click.option(*decls, f.name, **kwargs)(func)
        return func

    return decorate


def from_options(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from click kwargs (or a recipe's values); options not given keep the class default.

    A value its declaration refuses (nan, out of bounds, a string for a number) is a
    UsageError, unless the config's own checks refuse it first with a message of their own."""
    fields = {f.name: f for f in option_fields(cls)}
    given = {k: v for k, v in values.items() if k in fields and v is not None}
    hints = typing.get_type_hints(cls)
    problem = next((p for k, v in given.items() if (p := value_problem(fields[k], hints, v))), None)
    try:
        cfg = cls(**given)
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
    flag = _flag_name(field)
    hint = hints[field.name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    meta = field.metadata
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
