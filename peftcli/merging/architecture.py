"""Refusing a merge of full checkpoints of different architectures (config.json's ``model_type``).

Tensors of one name and shape can belong to different architectures (a Mistral fine-tune has
every tensor a Llama base has): their element-wise merge succeeds and is written under the
base's config, a model none of the inputs was. Only full checkpoint directories with a
config.json are compared (an unreadable one is refused: the check cannot be made); adapters
and diffs name their base differently, and a checkpoint without a config says nothing to compare.
"""

from __future__ import annotations

import json
import os

from peftcli.errors import BadInputError


def check_same_architecture(base_config: dict | None, base: str, inputs: list[str]) -> None:
    """Refuse an input checkpoint whose config.json names another ``model_type`` than the base's."""
    mine = (base_config or {}).get("model_type")
    if not mine:
        return
    for path in inputs:
        theirs = _model_type(path)
        if theirs and theirs != mine:
            raise BadInputError(
                f"{path}: a {theirs!r} checkpoint (config.json model_type) and the base {base} a {mine!r} one: "
                "a merge of two architectures is neither",
                "merge fine-tunes of the base's architecture (or correct the model_type in config.json)",
            )


def _model_type(path: str) -> str | None:
    """The model_type of a checkpoint directory's config.json (None for adapters, diffs, files)."""
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config) or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadInputError(f"{config}: cannot read it ({reason}), so its architecture cannot be checked against the base's",
                            "restore the fine-tune's config.json (save_pretrained writes it)") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{config}: not a JSON object", "restore the fine-tune's config.json (save_pretrained writes it)")
    return value.get("model_type")
