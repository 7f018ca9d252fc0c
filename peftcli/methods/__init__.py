"""The one registry of PEFT methods. A new method is one module here and one entry below."""

from __future__ import annotations

from peftcli.errors import UsageError
from peftcli.methods.base import Budget, BudgetRow, Method
from peftcli.methods.lora import LoRA

METHODS: dict[str, Method] = {m.name: m for m in (LoRA(),)}

# Named in the CLI already so that users get a clear answer rather than "unknown method".
PLANNED = ("ia3", "bitfit", "adapter", "prompt", "prefix")


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is not None:
        return method
    if name in PLANNED:
        raise UsageError(f"method {name!r} is not yet supported", "available now: " + ", ".join(METHODS))
    raise UsageError(f"unknown method {name!r}", "choose one of: " + ", ".join((*METHODS, *PLANNED)))


__all__ = ["Budget", "BudgetRow", "Method", "METHODS", "PLANNED", "get_method"]
