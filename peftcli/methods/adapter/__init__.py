"""Bottleneck adapters: the method (``method``) and its module-level layers (``layer``)."""

from peftcli.methods.adapter.method import BottleneckAdapter, BottleneckAdapterConfig

__all__ = ["BottleneckAdapter", "BottleneckAdapterConfig"]
