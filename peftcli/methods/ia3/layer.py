"""The module that carries IA³ at run time: a linear (or GPT-2 Conv1D) layer plus a vector l."""

from __future__ import annotations

import torch
from torch import nn

from peftcli import modules as mod


class IA3Linear(nn.Module):
    """y = base(x) ⊙ l (l: [out, 1]), or for a feedforward layer y = base(x ⊙ l) (l: [1, in]).

    As in PEFT, the output scaling multiplies the whole output, bias included.
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        d_out, d_in = mod.linear_dims(base_layer)
        self.feedforward = feedforward
        shape = (1, d_in) if feedforward else (d_out, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device))

    def load_phi(self, ia3_l: torch.Tensor) -> None:
        with torch.no_grad():
            self.ia3_l.copy_(ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)
