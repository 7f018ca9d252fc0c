"""Module level for prefix tuning: the prefix (or the MLP that produces it) and the key/value
cache built from it on every forward, laid out as PEFT's ``get_prompt`` lays it out.

A prefix row holds, for one virtual token, every layer's key then value:
``[layer 0 K | layer 0 V | layer 1 K | …]``, each ``kv_heads × head_dim`` wide.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peftcli.methods.prompt_learning import Dims

MLP_KEYS = (
    "prefix_encoder.embedding.weight",
    "prefix_encoder.transform.0.weight",
    "prefix_encoder.transform.0.bias",
    "prefix_encoder.transform.2.weight",
    "prefix_encoder.transform.2.bias",
)


def mlp_shapes(n: int, kv_dim: int, hidden: int, out: int) -> dict[str, tuple[int, ...]]:
    """PEFT's reparameterisation: Embedding(n, kv) → Linear(kv, hidden) → Tanh → Linear(hidden, out)."""
    return dict(zip(MLP_KEYS, ((n, kv_dim), (hidden, kv_dim), (hidden,), (out, hidden), (out,))))


def project(mlp: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prefix the MLP produces: [n, num_layers·2·kv_dim]."""
    e, w1, b1, w2, b2 = (mlp[k] for k in MLP_KEYS)
    return nn.functional.linear(torch.tanh(nn.functional.linear(e, w1, b1)), w2, b2)


class PrefixEncoder(nn.Module):
    """Holds φ. Without an MLP the prefix is trained directly; with one, the MLP is trained and
    ``prompt_embeddings`` is the artifact's copy of its output, refreshed by ``export``."""

    def __init__(self, prefix: torch.Tensor, mlp: dict[str, torch.Tensor] | None):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(prefix.detach().to(torch.float32).clone())
        self.embedding = None
        self.transform = None
        if mlp is not None:
            e, w1, _, w2, _ = (mlp[k] for k in MLP_KEYS)
            self.embedding = nn.Parameter(e.detach().to(torch.float32).clone())
            self.transform = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0]), nn.Tanh(), nn.Linear(w2.shape[1], w2.shape[0]))
            with torch.no_grad():
                for key, p in zip(MLP_KEYS[1:], self.transform.parameters()):
                    p.copy_(mlp[key])

    def prefix(self) -> torch.Tensor:
        return self.prompt_embeddings if self.transform is None else self.transform(self.embedding)

    def phi(self) -> dict[str, nn.Parameter]:
        """What trains: the prefix itself, or with a projection only the MLP (the prefix is its output)."""
        if self.transform is None:
            return {"prompt_embeddings": self.prompt_embeddings}
        return dict(zip(MLP_KEYS, (self.embedding, *self.transform.parameters())))

    def export(self) -> dict[str, torch.Tensor]:
        """φ in the artifact's layout, with the prefix recomputed from the trained MLP."""
        out = dict(self.phi())
        with torch.no_grad():
            out["prompt_embeddings"] = self.prefix()
        return out


def cache_argument(module: nn.Module) -> str | None:
    """The forward's name for a key/value cache (``cache`` since transformers 5.x, before ``past_key_values``)."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


class CacheInjector:
    """Hands each forward's prefix cache to the model.

    Causal LMs take the cache as an argument of their own forward. Heads that do not
    (``BertForSequenceClassification``) still run a backbone that does: there a forward
    pre-hook on the backbone adds the cache that the current forward prepared.
    """

    def __init__(self, model: nn.Module):
        self.argument = cache_argument(model)
        self.backbone_argument = None
        self._pending: list = []
        if self.argument is None:  # the caller checked that the backbone takes one
            backbone = model.base_model
            self.backbone_argument = cache_argument(backbone)
            backbone.register_forward_pre_hook(self._hook, with_kwargs=True)

    def put(self, kwargs: dict, cache) -> None:
        if self.argument is not None:
            kwargs[self.argument] = cache
        else:
            self._pending[:] = [cache]

    def _hook(self, module, args, kwargs):
        if not self._pending:  # the backbone called outside an adapted forward: nothing to add
            return None
        return args, {**kwargs, self.backbone_argument: self._pending.pop()}


def build_cache(prefix: torch.Tensor, batch: int, dims: Dims, dtype: torch.dtype):
    """A DynamicCache holding the prefix's keys and values: [batch, kv_heads, n, head_dim] per layer."""
    from transformers import DynamicCache

    n = prefix.shape[0]
    kv = prefix.to(dtype).view(n, dims.num_layers * 2, dims.kv_heads, dims.head_dim).permute(1, 2, 0, 3)
    cache = DynamicCache()
    for layer in range(dims.num_layers):
        keys, values = (kv[2 * layer + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
        cache.update(keys, values, layer)
    return cache
