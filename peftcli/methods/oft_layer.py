"""The module that carries OFT at run time: a linear layer whose input is rotated first.

As PEFT's OFT linear layer: x is split into in/b blocks of b features, each multiplied by its
orthogonal block (x_blk·R_blk, built from φ at every forward), then the base layer runs on
the result. ``weight`` is φ, [in/b, b(b−1)/2] (PEFT's ``oft_R.weight``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peftcli import modules as mod


class OftLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, block: int, blocks_of: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.base_layer = base_layer
        _, self.in_features = mod.linear_dims(base_layer)
        self.block, self.blocks_of = block, blocks_of
        device = base_layer.weight.device
        self.weight = nn.Parameter(torch.zeros(self.in_features // block, block * (block - 1) // 2, device=device))

    def load_phi(self, phi: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(phi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = x.dtype
        x = x.to(self.weight.dtype)
        blocks = self.blocks_of(self.weight)
        shape = x.shape
        rotated = torch.einsum("...rk,rkc->...rc", x.reshape(*shape[:-1], -1, self.block), blocks).reshape(shape)
        return self.base_layer(rotated.to(previous)).to(previous)
