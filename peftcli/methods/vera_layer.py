"""The modules that carry VeRA at run time: the shared projections and an adapted linear layer.

As PEFT's VeRA layer: y = base(x) + λ_b ⊙ (B[:out] · (λ_d ⊙ (A[:, :in] · dropout(x)))). The
projections are buffers of one module registered in every adapted layer (as PEFT's BufferDict),
so they are held once and move with the model; not persistent: the adapter stores them once,
under their own keys, not once per layer in the model's state dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftcli import modules as mod


class VeraProjections(nn.Module):
    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)


class VeraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, projections: VeraProjections, rank: int, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.projections = projections
        self.out_features, self.in_features = mod.linear_dims(base_layer)
        device = base_layer.weight.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_lambda_d = nn.Parameter(torch.zeros(rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def load_phi(self, lambda_b: torch.Tensor, lambda_d: torch.Tensor) -> None:
        with torch.no_grad():
            self.vera_lambda_b.copy_(lambda_b)
            self.vera_lambda_d.copy_(lambda_d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a = self.projections.vera_A[:, : self.in_features]
        b = self.projections.vera_B[: self.out_features, :]
        x = x.to(self.vera_lambda_d.dtype)
        a, b = a.to(device=x.device, dtype=x.dtype), b.to(device=x.device, dtype=x.dtype)  # no-ops unless sharded or cast
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), a), b)
        return (result + update).to(result.dtype)
