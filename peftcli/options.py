"""Options declared once, as dataclass fields, and reused by the CLI, recipes and --help.

A field made with ``option(...)`` carries its help text and flag spelling; ``click_options``
turns a config class into click decorators and ``from_options`` builds the config back
from click's keyword arguments, so a flag and a config key can never disagree.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import click


def option(default: Any, *decls: str, help: str, metavar: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"decls": decls, "help": help, "metavar": metavar})


def _flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _click_type(field: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, bool]:
    """(click type, is_flag) from the field's annotation."""
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return None, True
    return {int: int, float: float, str: str}.get(base, str), False


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
    """Build ``cls`` from click kwargs; options the user did not give keep the class default."""
    names = {f.name for f in option_fields(cls)}
    given = {k: v for k, v in values.items() if k in names and v is not None}
    return cls(**given)
