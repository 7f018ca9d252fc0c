"""The frozen linear layer whose weight is held quantised (module level): what NF4 and int8
share. A subclass holds the weight (``_hold``) and gives it back (``dequantized``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _DequantizedMatmul(torch.autograd.Function):
    """x·Wᵀ with W dequantised in the forward and again in the backward: autograd keeps the
    quantised weight, never its dequantised copy (what makes QLoRA's memory small)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.dequantized(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) whose weight is held quantised.

    ``weight`` is the dequantised [out, in] weight (what merging and DoRA read);
    ``in_features``/``out_features`` as nn.Linear's. The bias, if any, stays a frozen
    parameter in its dtype. The forward runs in the input's dtype (autocast's on CUDA).
    """

    def __init__(self, layer: nn.Module, transposed: bool, weight: torch.Tensor | None = None):
        """``weight``: the layer's weight when ``layer`` holds a placeholder for it
        (``peftcli.quantize.on_load``), in the layer's own layout."""
        super().__init__()
        weight = (layer.weight if weight is None else weight).detach()
        weight = weight.T if transposed else weight
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self._hold(weight)
        self.bias = layer.bias  # frozen with the rest of the base (None where there is none)

    def _hold(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = _DequantizedMatmul.apply(x.to(dtype), self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
