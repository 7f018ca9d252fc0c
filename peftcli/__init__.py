"""peftcli: model surgery on checkpoints — inspect, adapt, diff, merge.

The Python API is the CLI's: every command is one function here, taking paths and one options
class (the same declarations the command's flags are made from), and returning the report
the command renders::

    import peftcli

    peftcli.inject("model/", "lora", peftcli.LoraConfig(rank=8), "runs/lora")
    peftcli.train("runs/lora", peftcli.TrainConfig(data="train.jsonl", steps=100))
    peftcli.merge("model/", ["runs/lora"], "merged/", peftcli.MergeOptions())

A bad option raises ``peftcli.UsageError`` when its options class is built, a bad input
``peftcli.BadInputError``; both carry ``error.message`` (what is wrong) and ``error.hint``
(what to do). Importing ``peftcli`` imports no torch: each name below loads its module on
first use, so a script pays only for what it calls.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from peftcli.errors import BadInputError, PeftcliError, ResourceError, UsageError  # noqa: E402  (torch-free)

# name → module: the verbs (one per command), their options classes and the method configs.
_LAZY = {
    # reading
    "open_checkpoint": "peftcli.checkpoint.reader",
    "Checkpoint": "peftcli.checkpoint.reader",
    "TensorInfo": "peftcli.checkpoint.reader",
    "summarize": "peftcli.summary",
    "inspect": "peftcli.summary",
    "InspectOptions": "peftcli.summary",
    # adapting and training
    "inject": "peftcli.injection",
    "load_adapted": "peftcli.attach",
    "train": "peftcli.training.loop",
    "TrainConfig": "peftcli.training.config",
    "evaluate": "peftcli.evaluation",
    "EvalOptions": "peftcli.evaluation",
    # task vectors
    "diff": "peftcli.diffing",
    "DiffOptions": "peftcli.diffing",
    "merge": "peftcli.merging.engine",
    "MergeOptions": "peftcli.merging.options",
    "combine": "peftcli.combining",
    "CombineOptions": "peftcli.combining",
    "convert": "peftcli.conversion",
    "ConvertOptions": "peftcli.conversion",
    "check": "peftcli.preflight",
    "CheckOptions": "peftcli.preflight",
    "export": "peftcli.serving",
    "ExportOptions": "peftcli.serving",
    # the methods' configs (the options of `peftcli inject METHOD`)
    "METHODS": "peftcli.methods",
    "get_method": "peftcli.methods",
    "LoraConfig": "peftcli.methods.lora.method",
    "IA3Config": "peftcli.methods.ia3.method",
    "LohaConfig": "peftcli.methods.lycoris.loha",
    "LokrConfig": "peftcli.methods.lycoris.lokr",
    "BottleneckAdapterConfig": "peftcli.methods.adapter.method",
    "PrefixTuningConfig": "peftcli.methods.prompting.prefix",
    "PromptTuningConfig": "peftcli.methods.prompting.prompt",
    "BitFitConfig": "peftcli.methods.bitfit",
    "LayersConfig": "peftcli.methods.layers",
    "LtSftConfig": "peftcli.methods.sparse.fine_tuning",
    "DiffPruningConfig": "peftcli.methods.sparse.fine_tuning",
    "LotteryConfig": "peftcli.methods.lottery",
}

__all__ = ["BadInputError", "PeftcliError", "ResourceError", "UsageError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peftcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
