"""The module that carries BOFT at run time: a linear layer whose input is rotated by a product of
permuted block-diagonal rotations, and whose output is scaled per row.

As PEFT's BOFT linear layer: y = s ⊙ (base(x·R) − bias) + bias, R = M_{m−1}⋯M_1·M_0 with
M_i = P_i·B_i·P_iᵀ (B_i block-diagonal, its blocks the Cayley transforms of ``boft_R[i]``, P_i
the butterfly permutation). PEFT builds R whole at every forward; here x is permuted, rotated
block by block and permuted back, factor by factor (the same products, without an in × in
matrix). ``boft_R`` [m, blocks, b, b] and ``boft_s`` [out, 1] are φ, named as PEFT's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peftcli import modules as mod


class BoftLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, shape: tuple[int, int, int], perms: list[torch.Tensor],
                 blocks_of: Callable[[torch.Tensor], torch.Tensor], dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = mod.linear_dims(base_layer)
        factors, blocks, size = shape
        self.blocks_of, self.dropout = blocks_of, dropout
        device = base_layer.weight.device
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, size, size, device=device))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, 1, device=device))
        # (P_i's indices p, their inverse): x·P_i·B·P_iᵀ = (x[p⁻¹]·B)[p]
        for i, p in enumerate(perms):
            self.register_buffer(f"perm_{i}", p.to(device), persistent=False)
            self.register_buffer(f"inverse_{i}", torch.argsort(p).to(device), persistent=False)

    def load_phi(self, rotation: torch.Tensor, scale: torch.Tensor) -> None:
        with torch.no_grad():
            self.boft_R.copy_(rotation)
            self.boft_s.copy_(scale)

    def _dropped(self, blocks: torch.Tensor) -> torch.Tensor:
        """PEFT's MultiplicativeDropoutLayer: in one factor drawn at random, int(p·blocks) blocks
        drawn at random are the identity (training only)."""
        factors, count, size, _ = blocks.shape
        replaced = int(self.dropout * count)
        mask = torch.cat([torch.ones(replaced, device=blocks.device), torch.zeros(count - replaced, device=blocks.device)])
        full = torch.zeros(factors, count, 1, 1, device=blocks.device)
        full[int(torch.randint(0, factors, (1,)))] = mask[torch.randperm(count)].view(count, 1, 1)
        eye = torch.eye(size, device=blocks.device).repeat(factors, count, 1, 1)
        return (1 - full) * blocks + full * eye

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = x.dtype
        blocks = self.blocks_of(self.boft_R)
        if self.training and self.dropout > 0:
            blocks = self._dropped(blocks)
        x = x.to(blocks.dtype)
        shape = x.shape
        for i in reversed(range(blocks.shape[0])):  # x·R = x·M_{m−1}⋯M_0: the last factor first
            y = x[..., getattr(self, f"inverse_{i}")].reshape(*shape[:-1], blocks.shape[1], blocks.shape[2])
            y = torch.einsum("...rk,rkc->...rc", y, blocks[i]).reshape(shape)
            x = y[..., getattr(self, f"perm_{i}")]
        result = self.base_layer(x.to(previous))
        bias = getattr(self.base_layer, "bias", None)
        scale = self.boft_s.squeeze(-1).to(result.dtype)
        result = (result - bias) * scale + bias if bias is not None else result * scale
        return result.to(previous)
