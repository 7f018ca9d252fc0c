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
