"""The click side of ``peftcli.options``: ASCII number types and the decorators made from option fields.

``peftcli.options`` declares and validates options in plain Python; this module turns those
declarations into click parameters (``click_options``), so the library never imports click.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Callable

import click

from peftcli.options import ascii_float, ascii_int, flag_name, option_fields


class AsciiInt(click.ParamType):
    """click's int (or IntRange), in ASCII digits only (int() reads '١٢' and '1_000' too)."""

    name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min, self.max = min, max

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            number = ascii_int(value)
            if number is None:
                self.fail(f"{value!r} is not a valid integer (digits 0-9 only)", param, ctx)
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
            number = ascii_float(value)
            if number is None:
                self.fail(f"{value!r} is not a valid float (digits 0-9 only)", param, ctx)
        if self.finite and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


INT = AsciiInt()
FLOAT = AsciiFloat()
SEED = AsciiInt(0, 2**63 - 1)


def _click_type(field, hints: dict[str, Any]) -> tuple[Any, bool]:
    """(click type, is_flag) from the field's annotation."""
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return None, True
    if field.metadata.get("path"):
        return click.Path(), False
    if field.metadata.get("choices"):
        return click.Choice(field.metadata["choices"]), False
    # Numbers parse leniently here (nan too): from_options checks them after the config's own
    # checks, whose messages say more ("--alpha must be a positive number").
    return {int: INT, float: AsciiFloat(finite=False), str: str}.get(base, str), False


def click_options(*classes: type, only: typing.Iterable[str] | None = None, skip: typing.Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of ``classes`` (shared names merged);
    ``only``/``skip`` pick fields by name (a command placing other flags between them)."""
    only, skip = (set(only) if only is not None else None), set(skip)
    seen: dict[str, tuple] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            if f.name in seen or f.name in skip or only is not None and f.name not in only:
                continue  # the same option declared by two methods: one flag serves both
            seen[f.name] = (f, hints)

    def decorate(func: Callable) -> Callable:
        for f, hints in reversed(list(seen.values())):
            func = click.option(*_decls(f), f.name, **_kwargs(f, hints))(func)
        return func

    return decorate


def _decls(f) -> tuple[str, ...]:
    return (flag_name(f), *f.metadata["decls"])


def _kwargs(f, hints) -> dict[str, Any]:
    ctype, is_flag = _click_type(f, hints)
    meta = f.metadata
    kwargs: dict[str, Any] = {"help": meta["help"], "default": None, "show_default": False}
    if meta.get("show_default"):  # the default is shown, and passed (it is the class's anyway)
        kwargs["default"], kwargs["show_default"] = f.default, True
    if meta.get("required"):
        kwargs["required"] = True
    if is_flag:
        kwargs["is_flag"] = True
    else:
        kwargs["type"] = ctype
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
    return kwargs
