"""The modules that carry LoRA on an embedding and trainable tokens at run time (attach:
evaluate, train), computing what PEFT's ``lora.Embedding`` and ``TrainableTokensLayer`` compute.

LoRA on an embedding: y = E[x] + s·(A.T[x])·B.T with A [r, vocab], B [dim, r] (no dropout:
PEFT's embedding layer applies none). Trainable tokens: the embedding with rows ``indices``
replaced by ``trainable_tokens_delta`` [n, dim] (their new values, PEFT's index_copy); an
output head tied to that embedding reads the same replaced weight (PEFT's tied adapter).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _embed(base: nn.Embedding, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base``'s lookup of ``x`` in ``weight`` (its padding and norm options, as PEFT's ``_embed``)."""
    return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                       scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)


def _scaled(base: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A scaled embedding's factor (Gemma's ``embed_scale``), applied as PEFT applies it."""
    scale = getattr(base, "embed_scale", None)  # a buffer (Gemma) or a Python float (BioGPT, BART)
    return out if scale is None else out * torch.as_tensor(scale, dtype=out.dtype, device=out.device)


class LoraEmbedding(nn.Module):
    """y = base(x) + s·(A.T[x] @ B.T); the base embedding stays frozen."""

    def __init__(self, base_layer: nn.Embedding, rank: int, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.zeros(base_layer.embedding_dim, rank))

    @property
    def weight(self) -> torch.Tensor:  # what an output head tied to this embedding shares
        return self.base_layer.weight

    def load_phi(self, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_embedding_A.copy_(a)
            self.lora_embedding_B.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        after_a = _embed(self.base_layer, x, self.lora_embedding_A.T)
        lora = _scaled(self.base_layer, (after_a @ self.lora_embedding_B.T) * self.scaling)
        return (result + lora).to(result.dtype)


class TrainableTokens(nn.Module):
    """The embedding with rows ``indices`` replaced by ``trainable_tokens_delta`` (the only
    trained values; the others are the frozen base's)."""

    def __init__(self, base_layer: nn.Embedding, indices: tuple[int, ...]):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.long), persistent=False)
        # PEFT's init: the rows' current values, so the model starts as the base
        self.trainable_tokens_delta = nn.Parameter(base_layer.weight.detach()[self.token_indices].clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def load_phi(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.trainable_tokens_delta.copy_(values)

    def merged_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.index_copy(0, self.token_indices.to(w.device), self.trainable_tokens_delta.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled(self.base_layer, _embed(self.base_layer, x, self.merged_weight()))


class TiedTokensHead(nn.Module):
    """An output head tied to a ``TrainableTokens`` embedding: logits on the replaced weight
    (PEFT's tied TrainableTokensWrapper: F.linear without a bias)."""

    def __init__(self, base_layer: nn.Linear, tokens: TrainableTokens):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_tokens", tokens)  # not a submodule: its delta is the embedding's φ, listed once

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._tokens.merged_weight())
