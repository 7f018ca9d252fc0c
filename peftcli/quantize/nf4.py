"""NF4 with double quantisation (QLoRA), in bitsandbytes' exact storage format, and the frozen
linear layer that holds its weight that way (module level).

The format (Dettmers et al. 2023, bitsandbytes ``quantize_4bit(quant_type="nf4",
blocksize=64, compress_statistics=True)``): the weight, flattened, is cut into blocks of 64;
each block is divided by its absolute maximum and every value becomes the index of the
nearest of 16 NormalFloat levels (``NF4_CODE``), two indices a byte, the first in the high
nibble. The fp32 absmaxes are themselves quantised ("double quantisation"): their mean is
subtracted and the rest is stored as 8-bit indices into bitsandbytes' signed dynamic map,
in blocks of 256 with an fp32 absmax each. Dequantising reverses it:
``code[q] · (dynamic[qa] · absmax2 + offset)``.

Written here in plain torch so that it runs wherever torch runs (CI's CPU-only torch has no
bitsandbytes wheel requirement); the tests check it against bitsandbytes bit for bit where
that is installed. On CUDA with bitsandbytes installed (``pip install peftcli[qlora]``) the
4-bit dequantisation runs in its fused kernel instead: the same bits in, the same values out.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from peftcli.quantize.linear import QuantizedLinear

BLOCK = 64  # values per absmax (QLoRA's and bitsandbytes' default)
BLOCK2 = 256  # absmaxes per second-level absmax (double quantisation)

# The 16 NF4 levels as bitsandbytes (and the QLoRA paper's appendix) gives them, ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``, 256 sorted values),
    computed by the same operations in the same dtypes so the values are the same floats."""
    data: list[float] = []
    exponent_bits, non_sign = 7, 7
    for i in range(exponent_bits):
        items = int(2 ** (i + non_sign - exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of the sorted ``code`` (a tie goes to the lower level).

    As bitsandbytes' reference (pure torch) kernels do. Its C (CPU) and CUDA kernels find
    the dynamic map's level by a binary search that now and then picks the neighbour of the
    nearest one, so their absmax indices can differ from these by one level where the value
    lies near the middle of two; the 4-bit indices are the same."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def _blockwise(flat: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into ``code`` of ``flat`` (fp32) scaled by each block's absmax, and the absmaxes."""
    n = flat.numel()
    full = n - n % block
    blocks = flat[:full].view(-1, block)
    absmax = blocks.abs().max(dim=1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:  # a short last block: divided, not multiplied by the reciprocal, as bitsandbytes does
        tail_max = flat[full:].abs().max()
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max.clamp(min=1e-38), -1, 1)])
    return _nearest(scaled, code), absmax


@dataclasses.dataclass
class NF4Weight:
    """One weight in NF4 with double-quantised absmaxes (bitsandbytes' ``QuantState`` fields)."""

    packed: torch.Tensor  # uint8 [ceil(n/2)]: two 4-bit indices a byte, the first high
    qabsmax: torch.Tensor  # uint8 [blocks]: indices into the dynamic map
    absmax2: torch.Tensor  # fp32 [ceil(blocks/256)]
    offset: torch.Tensor  # fp32 scalar: the mean absmax, subtracted before quantising
    shape: tuple[int, ...]

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.qabsmax, self.absmax2, self.offset]


def quantize(weight: torch.Tensor) -> NF4Weight:
    """``weight`` (any float dtype) in NF4, double-quantised, as bitsandbytes stores it."""
    flat = weight.detach().reshape(-1).float()
    q, absmax = _blockwise(flat, BLOCK, torch.tensor(NF4_CODE, device=flat.device))
    if q.numel() % 2:  # an odd count: the last byte's low nibble is the level 0.0, as bitsandbytes pads
        q = F.pad(q, (0, 1), value=NF4_CODE.index(0.0))
    packed = (q[0::2] << 4) | q[1::2]
    offset = absmax.mean()
    qabsmax, absmax2 = _blockwise(absmax - offset, BLOCK2, dynamic_map().to(flat.device))
    return NF4Weight(packed, qabsmax, absmax2, offset, tuple(weight.shape))


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of each 64-block, back from its double quantisation."""
    values = dynamic_map().to(w.qabsmax.device)[w.qabsmax.long()]
    n = values.numel()
    scaled = F.pad(values, (0, -n % BLOCK2)).view(-1, BLOCK2) * w.absmax2.unsqueeze(1)
    return scaled.reshape(-1)[:n] + w.offset


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back, in ``dtype`` (computed in fp32, rounded once at the end)."""
    absmax = block_absmax(w)
    if w.packed.is_cuda:
        kernel = _bnb_kernel()
        if kernel is not None:
            return kernel(w.packed.unsqueeze(1), absmax, BLOCK, "nf4", w.shape, dtype)
    n = 1
    for d in w.shape:
        n *= d
    idx = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = torch.tensor(NF4_CODE, device=w.packed.device)[idx]
    out = F.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * absmax.unsqueeze(1)
    return out.reshape(-1)[:n].view(w.shape).to(dtype)


def _bnb_kernel():
    """bitsandbytes' 4-bit dequantisation op, where it is installed (the ``qlora`` extra)."""
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        return None
    return torch.ops.bitsandbytes.dequantize_4bit.default


class NF4Linear(QuantizedLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) whose weight is held in NF4."""

    def _hold(self, weight: torch.Tensor) -> None:
        q = quantize(weight)
        self.shape = q.shape
        for name in ("packed", "qabsmax", "absmax2", "offset"):
            self.register_buffer(name, getattr(q, name))

    def nf4(self) -> NF4Weight:
        return NF4Weight(self.packed, self.qabsmax, self.absmax2, self.offset, self.shape)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.nf4(), dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", nf4"
