"""Module level for prompt learning: the soft-prompt module, and the rewriting of a forward's
keyword arguments that prompt and prefix tuning share (batch size, attention mask, position ids).

The rewrites follow PEFT's ``PeftModelForCausalLM`` / ``PeftModelForFeatureExtraction``
forwards. Where PEFT drops an argument with a warning (position ids and token type ids for
prompt tuning), we adjust it instead, which gives PEFT's result whenever the argument holds
its default value (0…L−1, all zeros) and keeps it meaningful otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcli.errors import UsageError

# A cache means incremental decoding, where the virtual tokens are already in the cache.
_CACHE_ARGS = ("past_key_values", "cache")


class PromptEmbedding(nn.Module):
    """The soft prompt: ``num_virtual_tokens`` vectors in the input-embedding space."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(weight.detach().to(torch.float32).clone())


def register(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` into ``model`` under ``name``, so φ lives in the model's parameters."""
    if hasattr(model, name):
        raise UsageError(f"the model already carries {name!r}", "attach one prompt-learning adapter per model")
    model.add_module(name, module)


def batch_size(kwargs: dict[str, Any], method: str) -> int:
    for cache_arg in _CACHE_ARGS:
        if kwargs.get(cache_arg) is not None:
            raise UsageError(
                f"{method}: forward got {cache_arg}; incremental decoding with a cache is not supported",
                "run full forwards (the virtual tokens are added on each call)",
            )
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        raise UsageError(
            f"{method}: pass exactly one of input_ids and inputs_embeds", "e.g. model(input_ids=ids, attention_mask=mask)"
        )
    return (ids if ids is not None else embeds).shape[0]


def extend_attention_mask(kwargs: dict[str, Any], n: int) -> None:
    """The virtual tokens are always attended to: n ones before the mask, as PEFT."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise UsageError("prompt learning needs a 2-D attention_mask [batch, length]", "pass the padding mask, not a 4-D one")
        ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat((ones, mask), dim=1)


def prepend(kwargs: dict[str, Any], key: str, n: int, fill: int) -> None:
    """n columns of ``fill`` before a per-token argument (labels, token type ids)."""
    value = kwargs.get(key)
    if value is not None:
        pad = torch.full((value.shape[0], n), fill, dtype=value.dtype, device=value.device)
        kwargs[key] = torch.cat((pad, value), dim=1)


def prepend_positions(kwargs: dict[str, Any], n: int) -> None:
    """Virtual tokens at 0…n−1, the input after them (the base's default positions with the prompt)."""
    pos = kwargs.get("position_ids")
    if pos is not None:
        virtual = torch.arange(n, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], n)
        kwargs["position_ids"] = torch.cat((virtual, pos + n), dim=-1)
