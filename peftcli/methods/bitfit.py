"""BitFit (Ben Zaken et al., 2022): train the bias terms only.

φ is Δb = b − b₀ for each selected bias, keyed by the base tensor's name (zeros at init, so
merging is b₀ + Δb); see ``in_place`` for the layout. ``--biases`` picks every bias
(default) or groups of them by role; the role → module-name patterns are per family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from peftcli.architectures import BIAS_ROLES, LLAMA_BIASES
from peftcli.errors import BadInputError, UsageError
from peftcli.methods import in_place as inplace
from peftcli.methods.base import Attached, MethodBase, BudgetRow, TrainDefaults
from peftcli.methods.peftcli_section import SectionConfig
from peftcli.options import option
from peftcli.targets import layer_index, parse_layers

if TYPE_CHECKING:
    import torch

GROUPS = ("query", "key", "value", "attn-out", "mlp-in", "mlp-out", "norm")

_LLAMA_TYPES = {t for t, f in BIAS_ROLES.items() if f is LLAMA_BIASES}


@dataclass
class BitFitConfig:
    biases: str = option(
        "all",
        metavar="all|GROUPS",
        help="which biases to train: all (default) or a comma list of " + ", ".join(GROUPS),
    )
    layers: str | None = option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")

    def __post_init__(self) -> None:
        groups = self.groups
        if groups is not None and (not groups or any(g not in GROUPS for g in groups)):
            raise UsageError(f"invalid `biases` {self.biases!r}", "use all or a comma list of " + ", ".join(GROUPS))
        parse_layers(self.layers)

    @property
    def groups(self) -> list[str] | None:
        """The groups asked for, or None for every bias."""
        if self.biases.strip() == "all":
            return None
        return [g.strip() for g in self.biases.split(",") if g.strip()]


def _is_bias(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".bias") and len(shape) == 1


def _module(name: str) -> str:
    return name[: -len(".bias")]


def _group_patterns(cfg: BitFitConfig, model_type: str | None) -> list[re.Pattern] | None:
    if cfg.groups is None:
        return None
    family = BIAS_ROLES.get(model_type or "")
    if family is None:
        raise UsageError(f"peftcli does not know the bias groups of model_type {model_type!r}", "use `biases` all")
    return [re.compile(family[g]) for g in cfg.groups]


def _selector(cfg: BitFitConfig, model_type: str | None) -> Callable[[str], bool]:
    """Whether the config selects the bias tensor ``name`` (group and layer)."""
    patterns = _group_patterns(cfg, model_type)
    layer_set = parse_layers(cfg.layers)

    def selected(name: str) -> bool:
        if not name.endswith(".bias"):
            return False
        if patterns is not None and not any(p.search(_module(name)) for p in patterns):
            return False
        return layer_set is None or layer_index(name) in layer_set

    return selected


def _no_biases_error(model_type: str | None) -> UsageError:
    if model_type in _LLAMA_TYPES:
        return UsageError("this model has no bias terms to train", "Llama-family checkpoints have no biases; use ia3 or lora")
    return UsageError("this model has no bias terms to train", "use ia3 or lora")


class BitFit(SectionConfig, MethodBase):
    name = "bitfit"
    train_defaults = TrainDefaults(lr=6e-3, generative_lr=6e-4)  # benchmarks/README.md: "Training defaults"
    folds = True
    trains_in_place = True  # trains existing tensors: adds no parameters to the model
    config_cls = BitFitConfig
    summary = "Train the biases only (BitFit); φ is the change Δb of each bias."
    peft_type = None
    examples = (
        "peftcli inject bitfit model/ -o runs/bitfit/",
        "peftcli inject bitfit --biases query,value,mlp-in model/ -o runs/bitfit-qv/",
        "peftcli inject bitfit --biases norm --layers 10-11 model/ -o runs/bitfit-ln/",
    )

    def _selected(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: BitFitConfig) -> list[str]:
        model_type = (model_config or {}).get("model_type")
        biases = [n for n, s in shapes.items() if _is_bias(n, s)]
        if not biases:
            raise _no_biases_error(model_type)
        patterns = _group_patterns(cfg, model_type)
        if patterns is not None:
            for group, pattern in zip(cfg.groups, patterns):
                if not any(pattern.search(_module(n)) for n in biases):
                    raise UsageError(f"`biases` {group} matches no bias in this model", "`peftcli inspect MODEL --budget bitfit` lists every bias")
            biases = [n for n in biases if any(p.search(_module(n)) for p in patterns)]
        chosen = inplace.in_layers(biases, shapes, cfg.layers)
        if not chosen:
            raise UsageError(f"`biases` {cfg.biases} has no bias in `layers` {cfg.layers}", "choose other layers or groups")
        return chosen

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: BitFitConfig) -> list[BudgetRow]:
        return [BudgetRow(n, tuple(shapes[n]), shapes[n][0]) for n in self._selected(shapes, model_config, cfg)]

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: BitFitConfig, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        return {n: torch.zeros(shapes[n]) for n in self._selected(shapes, ckpt.config, cfg)}  # Δb = 0

    def deltas(self, cfg: BitFitConfig, tensors: dict, ckpt) -> dict:
        return inplace.stored_deltas(tensors, ckpt)

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: BitFitConfig, tensors: dict, model_config: dict) -> Attached:
        try:
            selected = _selector(cfg, (model_config or {}).get("model_type"))
        except UsageError as exc:
            raise BadInputError(f"adapter config: {exc.message}", exc.hint) from None
        return inplace.attach_in_place(model, tensors, selected, f"`biases` {cfg.biases}, `layers` {cfg.layers or 'all'}")
