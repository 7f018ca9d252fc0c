"""Layer groups (structured composition): fully train some layers, freeze the rest.

``--layers`` (required) picks the layers; ``--modules`` can keep only some parts of them.
A name is either an alias for this architecture's FFN or attention, resolved per family
(``mlp``/``ffn``: Llama's and GPT-2's ``mlp``, BERT's ``intermediate`` + ``output``;
``attention``/``attn``: ``self_attn``, ``attention``, ``attn``), or a module of the block:
its path from the block (``mlp``, ``attention.output``, ``input_layernorm``) or its own name
(``q_proj``, ``output.dense``); a name that is neither may be any dotted piece of the path
(``self``). Every selected base tensor — weights, biases, norms — is trained in place; φ is
the dense difference θ − θ₀ of each, keyed by the base tensor's name (see ``in_place``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from peftcli.architectures import CONV1D_MODEL_TYPES, GPT2_MASK_BUFFERS, Family, find_family
from peftcli.errors import UsageError
from peftcli.methods import in_place as inplace
from peftcli.methods.base import Attached, MethodBase, BudgetRow, LazyTensor, lazy_zeros, TrainDefaults
from peftcli.methods.peftcli_section import SectionConfig
from peftcli.options import option
from peftcli.targets import block_paths, layer_index, model_type_of, names_hint, parse_layers, split_layer

if TYPE_CHECKING:
    import torch

FFN_ALIASES = ("mlp", "ffn")
ATTENTION_ALIASES = ("attention", "attn")


@dataclass
class LayersConfig:
    layers: str | None = option(None, metavar="RANGES", help="the layers to train fully, e.g. 28-29 or 0,2,4-6 (required)")
    modules: str | None = option(
        None,
        metavar="NAMES",
        help="only these parts of those layers, comma-separated: mlp (or ffn) and attention (or attn), "
        "resolved per architecture (BERT's mlp is intermediate + output), or module names such as "
        "q_proj, self_attn, attention.output; default: every tensor of the layers",
    )

    def __post_init__(self) -> None:
        if self.layers is None or self.layers.strip() == "":
            raise UsageError("the layers method needs `layers`", "e.g. `layers` 28-29 to train the last two of 30 layers")
        parse_layers(self.layers)
        if self.modules is not None and not self.module_names:
            raise UsageError(f"invalid `modules` {self.modules!r}", "give comma-separated names such as mlp,attention")

    @property
    def module_names(self) -> list[str] | None:
        if self.modules is None:
            return None
        return [m.strip() for m in self.modules.split(",") if m.strip()]


_GPT2_BUFFERS = re.compile(GPT2_MASK_BUFFERS + "$")  # stored by older GPT-2 checkpoints, not parameters


def _block_module(name: str) -> str | None:
    """A tensor's module path from its block: 'model.layers.1.mlp.up_proj.weight' -> 'mlp.up_proj'."""
    split = split_layer(name)
    return split[1].rpartition(".")[0] if split is not None else None


def _under(rel: str, module: str) -> bool:
    return rel == module or rel.startswith(module + ".")


def _piece(rel: str, name: str) -> bool:
    return f".{name}." in f".{rel}."


def _alias_modules(name: str, family: Family | None) -> tuple[str, ...] | None:
    if family is None:
        return None
    if name in FFN_ALIASES:
        return family.ffn_modules
    if name in ATTENTION_ALIASES:
        return family.attention_modules
    return None


def _matcher(names: list[str], model_type: str | None, tensors: Iterable[str]) -> Callable[[str], set[str]]:
    """For the tensor names of the chosen layers, a function: tensor name -> the --modules names it falls under.

    The rule of each name is fixed once from ``tensors`` (so inject and attach agree): an
    alias of the family, else a path from the block (BERT's ``output.dense`` is the FFN's, not
    ``attention.output.dense``), else the last pieces of a module's path, else any dotted piece.
    """
    tensors = list(tensors)
    rels = {r for r in map(_block_module, tensors) if r is not None}
    family = find_family(model_type, block_paths(t.rpartition(".")[0] for t in tensors))
    rules: dict[str, Callable[[str], bool]] = {}
    for name in names:
        modules = _alias_modules(name, family)
        if modules is not None:
            rules[name] = lambda rel, modules=modules: any(_under(rel, m) for m in modules)
        elif any(_under(rel, name) for rel in rels):  # a path from the block: that module alone
            rules[name] = lambda rel, name=name: _under(rel, name)
        elif any(rel.endswith("." + name) for rel in rels):  # the last pieces of a module's path
            rules[name] = lambda rel, name=name: rel.endswith("." + name)
        else:
            rules[name] = lambda rel, name=name: _piece(rel, name)

    def matches(tensor: str) -> set[str]:
        rel = _block_module(tensor)
        return set() if rel is None else {n for n, rule in rules.items() if rule(rel)}

    return matches


def _hint(chosen: list[str], model_type: str | None) -> str:
    family = find_family(model_type, block_paths(t.rpartition(".")[0] for t in chosen))
    aliases = ""
    if family is not None:
        aliases = (
            f"mlp/ffn ({', '.join(family.ffn_modules)}), attention/attn ({', '.join(family.attention_modules)}), or "
        )
    return "parts of those layers: " + aliases + names_hint(t.rpartition(".")[0] for t in chosen)


def _selector(cfg: LayersConfig, model_type: str | None, names: list[str]) -> Callable[[str], bool]:
    layer_set = parse_layers(cfg.layers)
    parts = cfg.module_names
    matches = _matcher(parts or [], model_type, [n for n in names if layer_index(n) in layer_set])

    def selected(name: str) -> bool:
        return layer_index(name) in layer_set and (parts is None or bool(matches(name)))

    return selected


class Layers(SectionConfig, MethodBase):
    name = "layers"
    train_defaults = TrainDefaults(lr=5e-4, generative_lr=5e-5)  # benchmarks/README.md: "Training defaults"
    folds = True
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
        model_type = model_type_of(model_config)
        if model_type in CONV1D_MODEL_TYPES:
            names = [n for n in names if not _GPT2_BUFFERS.search(n)]
        chosen = inplace.in_layers(names, names, cfg.layers)
        parts = cfg.module_names
        if parts is not None:
            matches = _matcher(parts, model_type, chosen)
            hits = {n: matches(n) for n in chosen}
            found = set().union(*hits.values())
            missing = [p for p in parts if p not in found]
            if missing:
                raise UsageError(
                    f"`modules` {', '.join(missing)} matches no tensor of `layers` {cfg.layers}", _hint(chosen, model_type)
                )
            chosen = [n for n in chosen if hits[n]]
        return chosen

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LayersConfig) -> list[BudgetRow]:
        rows = []
        for n in self._selected(shapes, model_config, cfg):
            shape = tuple(shapes[n])  # as stored: φ has the base tensor's own layout
            rows.append(BudgetRow(n, shape, math.prod(shape)))
        return rows

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: LayersConfig, generator: "torch.Generator") -> dict[str, LazyTensor]:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        # Δθ = 0, in fp32, each made only when written: φ is as large as the layers it trains.
        return {n: lazy_zeros(shapes[n]) for n in self._selected(shapes, ckpt.config, cfg)}

    def deltas(self, cfg: LayersConfig, tensors: dict, ckpt) -> dict:
        return inplace.stored_deltas(tensors, ckpt)

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: LayersConfig, tensors: dict, model_config: dict) -> Attached:
        selection = f"`layers` {cfg.layers}, `modules` {cfg.modules or 'all'}"
        names = [n for n, _ in model.named_parameters()]
        return inplace.attach_in_place(model, tensors, _selector(cfg, model_type_of(model_config), names), selection)
