"""The modules that carry bottleneck adapters at run time: f(x) = W_up·σ(W_down·x + b_down) + b_up,
and the three ways of wrapping a base module with it (the base module stays frozen)."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}  # gelu: the exact (erf) form


class Bottleneck(nn.Module):
    """f(x) = up(σ(down(x))): hidden → bottleneck → hidden, both projections with biases."""

    def __init__(self, hidden: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)

    def load_phi(self, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, up_b: torch.Tensor) -> None:
        with torch.no_grad():
            self.down.weight.copy_(down_w)
            self.down.bias.copy_(down_b)
            self.up.weight.copy_(up_w)
            self.up.bias.copy_(up_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class _Wrapper(nn.Module):
    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.scaling = scaling

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        # φ stays fp32 whatever the base's dtype; the result is cast back to the base's dtype.
        return (self.adapter(x.to(self.adapter.down.weight.dtype)) * self.scaling).to(x.dtype)


class SequentialAdapter(_Wrapper):
    """Houlsby / Pfeiffer: y = base(x); y + s·f(y) (the adapter has its own skip connection)."""

    def forward(self, *args, **kwargs):
        y = self.base_layer(*args, **kwargs)
        return y + self._f(y)


class ParallelAdapter(_Wrapper):
    """He et al. (2022): the FFN module's output plus s·f(its input): base(x) + s·f(x)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.base_layer(x, *args, **kwargs) + self._f(x)


class ResidualParallelAdapter(_Wrapper):
    """The parallel adapter for post-LN blocks whose FFN output module is called ``(h, x)`` with
    the FFN's input x as the residual and computes LN(dropout(dense(h)) + x) (BERT's BertOutput).

    Adding s·f(x) to the residual argument gives LN(FFN(x) + s·f(x) + x): exactly the parallel
    adapter, without re-implementing the module's forward.
    """

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs):
        return self.base_layer(hidden_states, input_tensor + self._f(input_tensor), *args, **kwargs)
