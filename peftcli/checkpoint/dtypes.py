"""Conversions between torch dtypes and safetensors dtype names (imports torch: call lazily)."""

from __future__ import annotations

import torch

from peftcli.checkpoint.safetensors_format import DTYPES
from peftcli.errors import BadInputError

_TO_NAME = {getattr(torch, t): name for name, (_, t) in DTYPES.items() if t is not None and hasattr(torch, t)}


def safetensors_dtype(dtype: torch.dtype) -> str:
    try:
        return _TO_NAME[dtype]
    except KeyError:
        raise BadInputError(f"dtype {dtype} cannot be stored in safetensors", "convert the tensor to a float, integer or bool dtype first") from None


def torch_dtype(name: str) -> torch.dtype:
    torch_name = DTYPES[name][1]
    if torch_name is None or not hasattr(torch, torch_name):
        raise BadInputError(f"dtype {name} is not supported by this torch", "upgrade torch: pip install -U torch")
    return getattr(torch, torch_name)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on a tensor of ``dtype`` accumulates in, before one cast back.

    fp32 holds every F16, BF16 and F32 value exactly; only fp64 holds F64's.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def plus_base(acc: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``acc += base`` (``acc`` in the work dtype), with ``base``'s own bits wherever ``acc`` is 0.

    θ₀ + 0 must be θ₀ bit for bit, but IEEE addition gives −0.0 + +0.0 = +0.0: an entry that no
    input changes would lose the sign of a −0.0. Elsewhere the two agree.
    """
    zero = acc == 0
    acc.add_(base)
    acc[zero] = base[zero].to(acc.dtype)
    return acc
