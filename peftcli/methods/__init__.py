"""The one registry of PEFT methods. A new method is one module here and one entry below.

Beside the methods: ``base`` (the interface), ``in_place`` (training base tensors in place:
BitFit, layers), ``peftcli_section`` (the adapter config of a method PEFT lacks); what the
methods know of each architecture is ``peftcli.architectures``.

``READ_FOLD`` is the second, small registry: PEFT types peftcli reads and folds (``check``,
``merge``, ``convert``, ``inspect``) but never injects or trains (``read_only``,
``peftcli.methods.read_fold``). ``method_for_adapter_config`` finds an adapter's method in
both; everything that injects or trains (``inject``, ``train``, recipes, ``inspect --budget``)
reads ``METHODS`` alone.
"""

from __future__ import annotations

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.adapter import BottleneckAdapter
from peftcli.methods.base import ONE_PASS, PHASES, ROUNDS, Attached, Budget, BudgetRow, Method, MethodBase
from peftcli.methods.bitfit import BitFit
from peftcli.methods.boft import Boft
from peftcli.methods.hra import Hra
from peftcli.methods.ia3 import IA3
from peftcli.methods.layers import Layers
from peftcli.methods.lora import LoRA
from peftcli.methods.lottery import Lottery
from peftcli.methods.lycoris import LoHa, LoKr
from peftcli.methods.oft import Oft
from peftcli.methods.peftcli_section import PEFTCLI_PEFT_TYPE
from peftcli.methods.read_fold import C3a, FourierFt, LnTuning, Miss, RandLora, Shira
from peftcli.methods.prompting.prefix import PrefixTuning
from peftcli.methods.prompting.prompt import PromptTuning
from peftcli.methods.sparse.fine_tuning import DiffPruning, LtSft
from peftcli.methods.trainable_tokens import TrainableTokens
from peftcli.methods.vera import Vera

METHODS: dict[str, Method] = {
    m.name: m for m in (LoRA(), IA3(), LoHa(), LoKr(), Vera(), Oft(), Boft(), Hra(), BottleneckAdapter(), PrefixTuning(), PromptTuning(), BitFit(), Layers(),
                     LtSft(), DiffPruning(), Lottery(), TrainableTokens())
}

# Read-and-fold only (``read_only``): found by adapter config, never injected nor trained.
READ_FOLD: dict[str, Method] = {m.name: m for m in (LnTuning(), FourierFt(), Shira(), C3a(), RandLora(), Miss())}


def foldable() -> list[str]:
    """The methods and read-and-fold types whose φ folds into the weights (``merge`` and
    ``convert`` take their adapters), in registry order."""
    return [name for name, m in (*METHODS.items(), *READ_FOLD.items()) if m.folds]


def foldable_hint() -> str:
    """The hint that names the foldable methods, for a refusal of one that does not fold."""
    names = foldable()
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return f"only {listed} adapters fold into the weights"  # lora: DoRA and rsLoRA too


# Names people reach for that are options of a method here, not methods of their own: the
# suggestion names the option by field (the CLI renders it as the flag, ``lora --dora``).
ALIASES = {
    "dora": "lora `dora`",
    "rslora": "lora `rslora`",
    "houlsby": "adapter `style` houlsby",
    "pfeiffer": "adapter `style` pfeiffer",
    "parallel": "adapter `style` parallel",
    "prefix-tuning": "prefix",
    "prompt-tuning": "prompt",
    "ltsft": "lt-sft",
    "lth": "lottery",
}


def closest_method(name: str) -> str | None:
    """The method (or a method and its option field, ``lora `dora```) ``name`` most likely meant, or None."""
    import difflib

    word = name.strip().lower().replace("_", "-")
    if word in METHODS:
        return word
    if word in ALIASES:
        return ALIASES[word]
    close = difflib.get_close_matches(word, [*METHODS, *ALIASES], n=1, cutoff=0.6)
    return (ALIASES.get(close[0], close[0])) if close else None


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None and name in READ_FOLD:
        READ_FOLD[name].budget({}, None, None)  # raises: "ln-tuning (LN_TUNING) adapters are read-and-fold only ..."
    if method is None:
        close = closest_method(name)
        raise UsageError(
            f"unknown method {name!r}" + (f" (did you mean {close!r}?)" if close else ""),
            "choose one of: " + ", ".join(METHODS),
        )
    return method


def method_for_adapter_config(config: dict, where: str) -> Method:
    """The method an ``adapter_config.json`` belongs to (PEFT's peft_type, or our own section)."""
    peft_type = config.get("peft_type")
    if peft_type == PEFTCLI_PEFT_TYPE:
        section = config.get("peftcli")
        name = section.get("method") if isinstance(section, dict) else None
        if name not in METHODS:
            raise BadInputError(f"{where}: adapter config names unknown peftcli method {name!r}", "known: " + ", ".join(METHODS))
        return METHODS[name]
    for method in (*METHODS.values(), *READ_FOLD.values()):
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    if peft_type is None:
        raise BadInputError(f"{where}: adapter config has no peft_type", "is this an adapter_config.json from PEFT or peftcli?")
    known = sorted(m.peft_type for m in (*METHODS.values(), *READ_FOLD.values()) if m.peft_type)
    raise BadInputError(f"{where}: unsupported adapter method peft_type={peft_type!r}", "supported: " + ", ".join(known))


__all__ = [
    "ALIASES", "Attached", "Budget", "BudgetRow", "Method", "MethodBase", "METHODS", "ONE_PASS", "PHASES", "READ_FOLD", "ROUNDS",
    "closest_method", "foldable", "foldable_hint", "get_method", "method_for_adapter_config",
]
