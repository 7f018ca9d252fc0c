"""Module level for prefix tuning: the prefix (or the MLP that produces it) and the key/value
cache built from it on every forward, laid out as PEFT's ``get_prompt`` lays it out.

A prefix row holds, for one virtual token, every prefixed layer's key then value:
``[layer 0 K | layer 0 V | layer 1 K | …]``, each ``kv_heads × head_dim`` wide — every layer
(PEFT's layout), or with ``--layers`` only the chosen ones, in increasing order.

With ``--layers`` the cache is a ``LayerSubsetCache``: every layer holds n cached positions,
so the attention mask, the position ids and the cache length are those of a full prefix, but
the other layers hold zeros that nobody sees: a forward pre-hook on their attention module
drops the mask's first n columns and the cache hands them back only the input's own keys and
values. Their attention is the base's, at the positions the prefix shifted the input to.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from peftcli.errors import BadInputError
from peftcli.methods.prompting.dims import Dims

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


def build_cache(prefix: torch.Tensor, batch: int, dims: Dims, dtype: torch.dtype, layers: list[int] | None = None):
    """A DynamicCache holding the prefix's keys and values: [batch, kv_heads, n, head_dim] per layer.

    ``layers`` (sorted): the layers the prefix's columns belong to; None for every layer. Then
    the cache is a ``LayerSubsetCache`` whose other layers hold n zero positions, hidden.
    """
    from transformers import DynamicCache

    n = prefix.shape[0]
    chosen = list(range(dims.num_layers)) if layers is None else list(layers)
    kv = prefix.to(dtype).view(n, len(chosen) * 2, dims.kv_heads, dims.head_dim).permute(1, 2, 0, 3)
    slot = {layer: i for i, layer in enumerate(chosen)}
    if layers is None:
        cache = DynamicCache()
    else:
        cache = _subset_cache_class()(n, set(range(dims.num_layers)) - set(chosen))
    zeros = None
    for layer in range(dims.num_layers):
        if layer in slot:
            keys, values = (kv[2 * slot[layer] + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
        else:
            if zeros is None:
                zeros = torch.zeros(1, dims.kv_heads, n, dims.head_dim, dtype=dtype, device=prefix.device).expand(batch, -1, -1, -1)
            keys = values = zeros
        DynamicCache.update(cache, keys, values, layer)
    return cache


@functools.cache
def _subset_cache_class():
    """``LayerSubsetCache``, defined on first use so that importing this module does not import transformers."""
    from transformers import DynamicCache

    class LayerSubsetCache(DynamicCache):
        """A prefix cache whose ``hidden`` layers hold n unseen positions (see the module docstring).

        Their attention module's pre-hook (``hide_prefix``) drops the mask's first n columns and
        marks the layer; ``update`` then returns only the keys and values after the n positions,
        and refuses a hidden layer whose hook did not run (its mask would not fit).
        """

        def __init__(self, n: int, hidden: set[int]):
            super().__init__()
            self.prefix_length = n
            self.hidden = frozenset(hidden)
            self.masked: set[int] = set()

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx not in self.hidden:
                return keys, values
            if layer_idx not in self.masked:
                raise BadInputError(
                    f"prefix tuning `layers`: the attention of layer {layer_idx} was called without its "
                    "attention_mask and cache as keyword arguments, so the prefix cannot be hidden from it",
                    "this architecture supports prefix tuning only in every layer: inject without `layers`",
                )
            n = self.prefix_length
            return keys[..., n:, :], values[..., n:, :]

    return LayerSubsetCache


def attention_modules(model: nn.Module) -> tuple[dict[int, nn.Module], list[str]]:
    """Each layer's attention module: the innermost module with that ``layer_idx`` (the index its
    cache update uses) whose forward takes an ``attention_mask``; and the problems finding them."""
    found: dict[int, tuple[str, nn.Module]] = {}
    problems = []
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or isinstance(idx, bool):
            continue
        try:
            takes_mask = "attention_mask" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            takes_mask = False
        if not takes_mask:
            continue
        if idx in found and not name.startswith(found[idx][0] + "."):
            problems.append(f"layer {idx} has two attention modules ({found[idx][0]}, {name})")
            continue
        found[idx] = (name, module)  # named_modules lists parents first: the inner one wins
    return {i: m for i, (_, m) in found.items()}, problems


def hide_prefix(module: nn.Module, args, kwargs):
    """Forward pre-hook of a layer without prefix: its mask loses the n prefix columns."""
    # The attention module's keyword: ``cache`` (transformers 5), ``past_key_values`` or, in
    # 4.45-4.55, ``past_key_value`` (the decoder layers pass the cache on under that name).
    cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None)
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache wraps ours
    if not isinstance(cache, _subset_cache_class()) or module.layer_idx not in cache.hidden:
        return None  # not an adapted forward, or a layer with a prefix
    cache.masked.add(module.layer_idx)
    mask = kwargs.get("attention_mask")
    if mask is None:  # attend to every key: after update, the input's own
        return None
    if not isinstance(mask, torch.Tensor):
        raise BadInputError(
            f"prefix tuning `layers`: the attention mask is a {type(mask).__name__}, which peftcli cannot cut",
            "load the model with attn_implementation='sdpa' or 'eager'",
        )
    return args, {**kwargs, "attention_mask": mask[..., cache.prefix_length :]}
