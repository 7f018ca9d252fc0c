"""The module that carries HRA at run time: a linear layer whose weight is multiplied by H.

As PEFT's HRA linear layer, y = x·(W·H)ᵀ + b, with H rebuilt from φ (``hra_u`` [in, r]) at every
forward (``peftcli.methods.hra.reflections``), computed as base(x·Hᵀ): the same product in another
order (equal to PEFT's within float32 rounding), which leaves the base layer as it is.
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

        # x·(W·H)ᵀ = (x·Hᵀ)·Wᵀ: the base layer runs as it is (a quantised one too), on x rotated by Hᵀ.
        previous = x.dtype
        h = reflections(self.hra_u, self.gram_schmidt)
        return self.base_layer(F.linear(x.to(h.dtype), h).to(previous)).to(previous)
