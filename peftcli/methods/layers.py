"""Layer groups (structured composition): fully train some layers, freeze the rest.

``--layers`` (required) picks the layers; ``--modules`` can keep only some parts of them
(``mlp``, ``self_attn``, ``attention``, ``q_proj``...: a name is a dotted piece of the tensor's
path). Every selected base tensor — weights, biases, norms — is trained in place; φ is the
dense difference θ − θ₀ of each, keyed by the base tensor's name (see ``bitfit_inplace``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from peftcli.errors import UsageError
from peftcli.methods import bitfit_inplace as inplace
from peftcli.methods.base import Attached, BudgetRow
from peftcli.options import option
from peftcli.targets import layer_index, parse_layers

if TYPE_CHECKING:
    import torch


@dataclass
class LayersConfig:
    layers: str | None = option(None, metavar="RANGES", help="the layers to train fully, e.g. 28-29 or 0,2,4-6 (required)")
    modules: str | None = option(
        None,
        metavar="NAMES",
        help="only these parts of those layers, comma-separated (mlp, self_attn, attention, q_proj...); "
        "default: every tensor of the layers",
    )

    def __post_init__(self) -> None:
        if self.layers is None or self.layers.strip() == "":
            raise UsageError("the layers method needs --layers", "e.g. --layers 28-29 to train the last two of 30 layers")
        parse_layers(self.layers)
        if self.modules is not None and not self.module_names:
            raise UsageError(f"invalid --modules {self.modules!r}", "give comma-separated names such as mlp,self_attn")

    @property
    def module_names(self) -> list[str] | None:
        if self.modules is None:
            return None
        return [m.strip() for m in self.modules.split(",") if m.strip()]


# Older GPT-2 checkpoints also store each layer's causal-mask buffers; they are not parameters.
_GPT2_BUFFERS = re.compile(r"\.attn\.(masked_)?bias$")


def _in_part(name: str, part: str) -> bool:
    """Whether ``part`` (e.g. ``mlp`` or ``attention.output``) is a dotted piece of the path ``name``."""
    return f".{part}." in f".{name}."


def _parts(names: list[str]) -> list[str]:
    """The path pieces below the layer index, for the hint of an unmatched --modules."""
    pieces = set()
    for n in names:
        parts = n.split(".")
        index = next(i for i, p in enumerate(parts) if p.isdigit())
        pieces.update(parts[index + 1 : -1])
    return sorted(pieces)


def _selector(cfg: LayersConfig) -> Callable[[str], bool]:
    layer_set = parse_layers(cfg.layers)
    parts = cfg.module_names

    def selected(name: str) -> bool:
        return layer_index(name) in layer_set and (parts is None or any(_in_part(name, p) for p in parts))

    return selected


class Layers:
    name = "layers"
    trains_in_place = True  # trains existing tensors: adds no parameters to the model
    config_cls = LayersConfig
    summary = "Fully train some layers only (structured composition); φ is the change of their tensors."
    peft_type = None
    examples = (
        "peftcli inject layers --layers 28-29 model/ -o runs/top2/",
        "peftcli inject layers --layers 20-29 --modules mlp model/ -o runs/top-mlp/",
        "peftcli inject layers --layers 0 --modules q_proj,v_proj model/ -o runs/first-qv/",
    )

    def _selected(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LayersConfig) -> list[str]:
        names = list(shapes)
        if (model_config or {}).get("model_type") == "gpt2":
            names = [n for n in names if not _GPT2_BUFFERS.search(n)]
        chosen = inplace.in_layers(names, names, cfg.layers)
        parts = cfg.module_names
        if parts is not None:
            missing = [p for p in parts if not any(_in_part(n, p) for n in chosen)]
            if missing:
                raise UsageError(
                    f"--modules {', '.join(missing)} matches no tensor of --layers {cfg.layers}",
                    "parts of those layers: " + ", ".join(_parts(chosen)),
                )
            chosen = [n for n in chosen if any(_in_part(n, p) for p in parts)]
        return chosen

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LayersConfig) -> list[BudgetRow]:
        rows = []
        for n in self._selected(shapes, model_config, cfg):
            shape = tuple(shapes[n])  # as stored: φ has the base tensor's own layout
            rows.append(BudgetRow(n, shape, math.prod(shape)))
        return rows

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: LayersConfig, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        return {n: torch.zeros(shapes[n]) for n in self._selected(shapes, ckpt.config, cfg)}  # Δθ = 0

    def adapter_config(self, ckpt, cfg: LayersConfig) -> dict:
        return inplace.adapter_config(ckpt, self.name, cfg)

    def deltas(self, cfg: LayersConfig, tensors: dict, ckpt) -> dict:
        return inplace.stored_deltas(tensors, ckpt)

    def config_from_adapter(self, d: dict) -> LayersConfig:
        return inplace.config_from_adapter(d, self.name, LayersConfig)

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: LayersConfig, tensors: dict, model_config: dict) -> Attached:
        selection = f"--layers {cfg.layers} --modules {cfg.modules or 'all'}"
        return inplace.attach_in_place(model, tensors, _selector(cfg), selection)
