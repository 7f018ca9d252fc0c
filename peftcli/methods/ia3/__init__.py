"""IA³: the method (``method``) and its module-level layer (``layer``)."""

from peftcli.methods.ia3.method import IA3, IA3Config

__all__ = ["IA3", "IA3Config"]
