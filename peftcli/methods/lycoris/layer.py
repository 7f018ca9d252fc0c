"""The module that carries LoHa or LoKr at run time: a linear layer plus ΔW built from φ's parts.

As PEFT's LyCORIS layers: y = base(x) + x·(s·ΔW)ᵀ with ΔW rebuilt from the parts at every
forward (s = α/r). While training, module dropout skips the whole update with probability
``module_dropout``, and rank dropout zeroes rows of ΔW with probability ``rank_dropout``
(rescaled by the kept fraction, always for LoHa, for LoKr when ``rank_dropout_scale``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


class LycorisLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, shapes: dict[str, tuple[int, ...]], delta: Callable[[dict], torch.Tensor],
                 scale: float, rank_dropout: float = 0.0, module_dropout: float = 0.0, rescale: bool = True):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.phi = nn.ParameterDict({s: nn.Parameter(torch.zeros(shape, device=device)) for s, shape in shapes.items()})
        self.delta, self.scale = delta, scale
        self.rank_dropout, self.module_dropout, self.rescale = rank_dropout, module_dropout, rescale

    def load_phi(self, parts: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for s, t in parts.items():
                self.phi[s].copy_(t)

    def delta_weight(self) -> torch.Tensor:
        return self.delta(dict(self.phi.items())) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.training and self.module_dropout and float(torch.rand(1)) <= self.module_dropout:
            return result
        w = self.delta_weight()
        if self.training and self.rank_dropout:
            keep = (torch.rand(w.shape[0], device=w.device) > self.rank_dropout).to(w.dtype)
            if self.rescale:
                keep = keep / keep.mean()  # PEFT divides by the kept fraction (NaN if it kept none, as PEFT)
            w = w * keep.unsqueeze(1)
        return result + F.linear(x.to(w.dtype), w).to(result.dtype)
