"""The module that carries LoRA at run time: a linear (or GPT-2 Conv1D) layer plus B·A."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftcli import modules as mod


def lora_delta(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW as [out, in] in fp32 for base weight ``w0`` [out, in]; for DoRA the full W' − W₀."""
    lora = scaling * (b.float() @ a.float())
    if magnitude is None:
        return lora
    w0 = w0.float()
    w = w0 + lora
    return magnitude.float().unsqueeze(1) * w / torch.linalg.norm(w, dim=1, keepdim=True) - w0


class LoraLinear(nn.Module):
    """y = base(x) + s·B(A(dropout(x))), or its DoRA form; the base layer stays frozen."""

    def __init__(self, base_layer: nn.Module, rank: int, scaling: float, dropout: float = 0.0, dora: bool = False, bias: bool = False):
        super().__init__()
        self.base_layer = base_layer
        d_out, d_in = mod.linear_dims(base_layer)
        self.transposed = mod.is_conv1d(base_layer)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=bias)  # PEFT's lora_bias: s·lora_B.bias joins the output
        self.lora_magnitude = nn.Parameter(torch.ones(d_out)) if dora else None

    def load_phi(self, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            if bias is not None:
                self.lora_B.bias.copy_(bias)
            if self.lora_magnitude is not None:
                self.lora_magnitude.copy_(magnitude)

    def delta_weight(self) -> torch.Tensor:
        """ΔW as [out, in] (for DoRA: the full W' − W₀)."""
        w0 = mod.linear_weight(self.base_layer)
        return lora_delta(w0, self.lora_A.weight, self.lora_B.weight, self.scaling, self.lora_magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        xa = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(xa.to(self.lora_A.weight.dtype))) * self.scaling
        if self.lora_magnitude is None:
            return result + lora.to(result.dtype)
        # DoRA: rescale each output feature by m / ‖W₀ + sBA‖ (norm detached, per the paper §4.3).
        w0 = mod.linear_weight(self.base_layer).to(xa.dtype)
        lora_w = (self.lora_B.weight @ self.lora_A.weight).to(xa.dtype).detach()
        norm = torch.linalg.norm(w0 + self.scaling * lora_w, dim=1).detach()
        scale = (self.lora_magnitude / norm).view(1, -1)
        base_no_bias = F.linear(xa, w0)
        return result + ((scale - 1) * base_no_bias + scale * lora).to(result.dtype)
