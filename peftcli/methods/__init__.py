"""The one registry of PEFT methods. A new method is one module here and one entry below."""

from __future__ import annotations

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, Budget, BudgetRow, Method
from peftcli.methods.lora import LoRA

METHODS: dict[str, Method] = {m.name: m for m in (LoRA(),)}

# Named in the CLI already so that users get a clear answer rather than "unknown method".
PLANNED = tuple(n for n in ("ia3", "bitfit", "adapter", "prompt", "prefix", "layers") if n not in METHODS)


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is not None:
        return method
    if name in PLANNED:
        raise UsageError(f"method {name!r} is not yet supported", "available now: " + ", ".join(METHODS))
    raise UsageError(f"unknown method {name!r}", "choose one of: " + ", ".join((*METHODS, *PLANNED)))


def method_for_adapter_config(config: dict, where: str) -> Method:
    """The method an ``adapter_config.json`` belongs to (PEFT's peft_type, or our own section)."""
    from peftcli.artifacts.adapter_dir import PEFTCLI_PEFT_TYPE

    peft_type = config.get("peft_type")
    if peft_type == PEFTCLI_PEFT_TYPE:
        section = config.get("peftcli")
        name = section.get("method") if isinstance(section, dict) else None
        if name not in METHODS:
            raise BadInputError(f"{where}: adapter config names unknown peftcli method {name!r}", "known: " + ", ".join(METHODS))
        return METHODS[name]
    for method in METHODS.values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    if peft_type is None:
        raise BadInputError(f"{where}: adapter config has no peft_type", "is this an adapter_config.json from PEFT or peftcli?")
    known = sorted(m.peft_type for m in METHODS.values() if m.peft_type)
    raise BadInputError(f"{where}: unsupported adapter method peft_type={peft_type!r}", "supported: " + ", ".join(known))


__all__ = ["Attached", "Budget", "BudgetRow", "Method", "METHODS", "PLANNED", "get_method", "method_for_adapter_config"]
