"""LyCORIS methods PEFT has: LoHa (Hadamard product) and LoKr (Kronecker product); ``common``
holds their shared adapter-config reader and fold, ``layer`` their run-time module."""

from peftcli.methods.lycoris.loha import LoHa
from peftcli.methods.lycoris.lokr import LoKr

__all__ = ["LoHa", "LoKr"]
