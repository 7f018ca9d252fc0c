"""The module that carries HRA at run time: a linear layer whose weight is multiplied by H.

As PEFT's HRA linear layer: y = x·(W·H)ᵀ + b, H rebuilt from φ (``hra_u`` [in, r]) at every
forward (``peftcli.methods.hra.reflections``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftcli import modules as mod


class HraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, rank: int, gram_schmidt: bool):
        super().__init__()
        self.base_layer = base_layer
        _, self.in_features = mod.linear_dims(base_layer)
        self.gram_schmidt = gram_schmidt
        self.hra_u = nn.Parameter(torch.zeros(self.in_features, rank, device=base_layer.weight.device))

    def load_phi(self, u: torch.Tensor) -> None:
        with torch.no_grad():
            self.hra_u.copy_(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from peftcli.methods.hra import reflections

        previous = x.dtype
        h = reflections(self.hra_u, self.gram_schmidt)
        weight = torch.mm(self.base_layer.weight.to(h.dtype), h)
        bias = self.base_layer.bias.to(h.dtype) if self.base_layer.bias is not None else None
        return F.linear(x.to(h.dtype), weight, bias).to(previous)
