"""int8 weights with one absmax per output row, in bitsandbytes' ``Int8Params`` storage
format (module level): ``train --quantize int8``.

Each row of the [out, in] weight is divided by its absolute maximum and rounded to the
nearest of the 255 levels −127 … 127 (``CB``, int8); the fp32 row maxima are ``SCB``. The
weight back is ``CB · SCB / 127``. That is bitsandbytes' layout and rounding for an 8-bit layer
(``int8_vectorwise_quant``), applied to the weight in its own dtype (bitsandbytes casts to fp16
first: the bytes are its own for an fp16 base); its LLM.int8 matmul also quantises the activations and keeps
outlier columns in fp16, which this layer does not: it dequantises the weight and multiplies
in the input's dtype, as the NF4 layer does. Half the memory of bf16, twice NF4's.
"""

from __future__ import annotations

import torch

from peftcli.quantize.linear import QuantizedLinear


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB fp32 [out]) of a 2-D ``weight``."""
    w = weight.detach().float()
    scb = w.abs().amax(dim=1)
    # A zero row stays zero: its scale is 1 so that nothing is divided by 0.
    cb = torch.round(w * (127.0 / torch.where(scb > 0, scb, torch.ones_like(scb))).unsqueeze(1)).to(torch.int8)
    return cb, scb


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back, in ``dtype`` (computed in fp32, rounded once at the end)."""
    return (cb.float() * (scb / 127.0).unsqueeze(1)).to(dtype)


def int8_bytes(rows: int, cols: int) -> int:
    """Bytes an int8 weight of ``rows`` × ``cols`` is held in: one byte a value, an fp32 scale a row."""
    return rows * cols + 4 * rows


class Int8Linear(QuantizedLinear):
    """A frozen linear layer whose weight is held as int8 rows with fp32 scales."""

    def _hold(self, weight: torch.Tensor) -> None:
        cb, scb = quantize(weight)
        self.register_buffer("CB", cb)
        self.register_buffer("SCB", scb)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.CB, self.SCB, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8"
