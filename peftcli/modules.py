"""Module-level helpers: finding, replacing and freezing submodules of a transformers model.

Adapter keys name modules by their path in the checkpoint (``model.layers.0.self_attn.q_proj``).
A model built with another head class nests the same modules under its base-model prefix
(``bert.encoder...`` in ``BertForSequenceClassification``); ``resolve`` accepts both.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.errors import BadInputError


def resolve(model: nn.Module, path: str) -> str | None:
    """The path of checkpoint module ``path`` inside ``model``, or None."""
    names = _module_names(model)
    if path in names:
        return path
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and f"{prefix}.{path}" in names:
        return f"{prefix}.{path}"
    if prefix and path.startswith(prefix + ".") and path[len(prefix) + 1 :] in names:
        return path[len(prefix) + 1 :]
    return None


_OTHER_MODEL = "the adapter was made for another architecture; pass the base model it was injected into"


def _module_names(model: nn.Module) -> set[str]:
    cache = getattr(model, "_peftcli_module_names", None)
    if cache is None:
        cache = {n for n, _ in model.named_modules()}
    return cache


def get(model: nn.Module, path: str) -> nn.Module:
    real = resolve(model, path)
    if real is None:
        raise BadInputError(f"the model has no module {path!r}", _OTHER_MODEL)
    return model.get_submodule(real)


def replace(model: nn.Module, path: str, new: nn.Module) -> None:
    real = resolve(model, path)
    if real is None:
        raise BadInputError(f"the model has no module {path!r}", _OTHER_MODEL)
    parent_path, _, child = real.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    raise BadInputError(f"{type(module).__name__} is not a linear layer", _OTHER_MODEL)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the storage."""
    return module.weight.T if is_conv1d(module) else module.weight


def find_linear(model: nn.Module, path: str) -> tuple[nn.Module | None, tuple[int, int] | None, str | None]:
    """The linear layer at checkpoint path ``path`` and its (out, in), or why there is none."""
    real = resolve(model, path)
    if real is None:
        return None, None, f"{path}: no such module in the base"
    layer = model.get_submodule(real)
    try:
        return layer, linear_dims(layer), None
    except BadInputError:
        return None, None, f"{path}: is {type(layer).__name__}, not a linear layer"


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
