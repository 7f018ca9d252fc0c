"""Frozen base weights held in fewer bits for training: QLoRA's NF4 (``nf4``), int8 rows
(``int8``); the layer they share (``linear``); quantising as the checkpoint is read (``on_load``)."""

from __future__ import annotations

SCHEMES = ("nf4", "int8")  # train --quantize's choices


def layer_class(scheme: str):
    """The layer class that holds a weight in ``scheme``."""
    if scheme == "nf4":
        from peftcli.quantize.nf4 import NF4Linear

        return NF4Linear
    if scheme == "int8":
        from peftcli.quantize.int8 import Int8Linear

        return Int8Linear
    raise ValueError(f"no quantisation scheme {scheme!r}")
