"""The one registry of PEFT methods. A new method is one module here and one entry below."""

from __future__ import annotations

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.adapter import BottleneckAdapter
from peftcli.methods.base import Attached, Budget, BudgetRow, Method
from peftcli.methods.bitfit import BitFit
from peftcli.methods.ia3 import IA3
from peftcli.methods.layers import Layers
from peftcli.methods.lora import LoRA
from peftcli.methods.lottery import Lottery
from peftcli.methods.prefix import PrefixTuning
from peftcli.methods.prompt import PromptTuning
from peftcli.methods.sparse_ft import DiffPruning, LtSft

METHODS: dict[str, Method] = {
    m.name: m for m in (LoRA(), IA3(), BottleneckAdapter(), PrefixTuning(), PromptTuning(), BitFit(), Layers(),
                     LtSft(), DiffPruning(), Lottery())
}


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise UsageError(f"unknown method {name!r}", "choose one of: " + ", ".join(METHODS))
    return method


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


__all__ = ["Attached", "Budget", "BudgetRow", "Method", "METHODS", "get_method", "method_for_adapter_config"]
