"""Merging an adapter that trained a task head: the output is the head model's checkpoint.

A classification run trains φ on the base plus a new head (``classifier`` for BERT,
``score`` for Llama and GPT-2). Folding φ alone would lose the head, so the merged output is
a checkpoint of the head model (``BertForSequenceClassification`` ...): the base's tensors
under that model's names (``bert.encoder...``), minus those it has no place for (a causal
LM's ``lm_head``), plus the head, and a config.json naming the class and its labels. The
names come from the head model built on the meta device: no weights are allocated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from peftcli.checkpoint.reader import Checkpoint
from peftcli.errors import BadInputError, UsageError


@dataclass
class HeadLayout:
    rename: dict[str, str | None]  # base tensor name -> name in the head model (None: dropped)
    head_names: list[str]  # the head's tensors, named as the head model names them
    config_json: bytes  # config.json of the merged head model


def head_layout(ckpt: Checkpoint, heads: dict, labels: list[str] | None) -> HeadLayout:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if ckpt.directory is None:
        raise UsageError("merging a task head needs a base model directory (with config.json)", "pass the base directory")
    weight = next((t for n, t in heads.items() if n.endswith(".weight")), None)
    if weight is None:
        raise BadInputError("the adapter's saved head has no weight tensor", "the adapter is incomplete; pass one written whole by peftcli train")
    num_labels = int(weight.shape[0])
    labels = labels if labels and len(labels) == num_labels else [f"LABEL_{i}" for i in range(num_labels)]
    config = AutoConfig.from_pretrained(
        ckpt.directory, local_files_only=True, num_labels=num_labels,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    with torch.device("meta"):  # names and shapes only
        model = AutoModelForSequenceClassification.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = model.base_model_prefix
    rename = {}
    for name in ckpt.tensors:
        rename[name] = name if name in expected else (f"{prefix}.{name}" if f"{prefix}.{name}" in expected else None)
    missing = sorted(set(expected) - set(heads) - {v for v in rename.values() if v})
    wrong = [n for n, t in heads.items() if expected.get(n) != tuple(t.shape)]
    if missing or wrong:
        raise BadInputError(
            f"the merged {type(model).__name__} would lack {missing[:3]} or mis-shape {wrong[:3]}",
            "was the adapter trained on this base?",
        )
    if config.pad_token_id is None and ckpt.config and ckpt.config.get("eos_token_id") is not None:
        config.pad_token_id = ckpt.config["eos_token_id"]  # decoder classifiers need it to find the last token
    data = json.loads(config.to_json_string())
    data["architectures"] = [type(model).__name__]
    return HeadLayout(rename, sorted(heads), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
