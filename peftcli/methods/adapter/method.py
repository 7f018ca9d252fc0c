"""Bottleneck adapters: f(x) = W_up·σ(W_down·x + b_down) + b_up, W_down: [b, h], W_up: [h, b].

Styles (where f goes in each block; h is the hidden size, b the bottleneck):

- ``pfeiffer`` (Pfeiffer et al., 2021): after the FFN's output projection, y ← y + s·f(y),
  before the block's dropout/residual/LayerNorm. AdapterHub's ``seq_bn`` differs: it feeds
  the adapter LN(y + residual) (the block's own LayerNorm, ``original_ln_before``), so the
  same weights give other outputs there (about 1 in the logits on MiniLM); Houlsby and
  parallel match AdapterHub's exactly;
- ``houlsby`` (Houlsby et al., 2019): the same after the attention output projection too;
- ``parallel`` (He et al., 2022): around the FFN, FFN(x) + s·f(x). BERT splits its FFN over
  ``intermediate`` and ``output``; ``output`` receives the FFN's input as its residual
  argument, so the adapter wraps ``output`` and adds s·f(x) to that argument (see
  ``layer.ResidualParallelAdapter``).

Each adds 2·h·b + b + h parameters per placement. W_down starts Kaiming-uniform
(U(−1/√h, 1/√h), as LoRA's A), W_up and both biases at zero, so f = 0 before training.
PEFT lacks this method: ``adapter_config.json`` is ``{"peft_type": "PEFTCLI", "peftcli":
{"method": "adapter", "style", "bottleneck", "reduction_factor", "activation", "scaling",
"layers", "placements": [module paths]}, "base_model_name_or_path"}`` and the tensors are
``<module path>.adapter.down.weight`` [b, h], ``.adapter.down.bias`` [b],
``.adapter.up.weight`` [h, b], ``.adapter.up.bias`` [h], where the module path is the
wrapped module's path in the checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftcli.architectures import BLOCKS_BY_NAME, HIDDEN_SIZE_KEYS, Family, find_family
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, MethodBase, BudgetRow, LazyTensor, SeededDraws, lazy_zeros, mismatch_error, TrainDefaults
from peftcli.methods.peftcli_section import PEFTCLI_PEFT_TYPE
from peftcli.options import option
from peftcli.targets import block_paths, linear_modules, model_type_of, parse_layers, require_layers, split_layer

if TYPE_CHECKING:
    import torch

STYLES = ("houlsby", "pfeiffer", "parallel")
ACTIVATION_NAMES = ("relu", "gelu", "silu")
PARTS = ("adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias")


@dataclass
class BottleneckAdapterConfig:
    style: str = option(
        "pfeiffer", metavar="houlsby|pfeiffer|parallel",
        help="where the adapters go: after the FFN (pfeiffer, default; AdapterHub's seq_bn also applies the "
        "block's LayerNorm before the adapter, this does not), after attention and FFN (houlsby), or beside "
        "the FFN (parallel)",
    )
    reduction_factor: int = option(16, help="bottleneck = hidden size // this, at least 1 (default 16, as AdapterHub)")
    bottleneck: int | None = option(None, help="bottleneck width b; overrides --reduction-factor")
    activation: str = option("relu", metavar="relu|gelu|silu", help="nonlinearity σ between the projections (default relu)")
    scaling: float | None = option(
        None, help="factor s on the adapter's output; default 1, or 4 for --style parallel (He et al., 2022)"
    )
    layers: str | None = option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")
    # Not an option: the exact modules, read back from adapter_config.json to check the tensors.
    placements: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise UsageError(f"`style` must be one of {', '.join(STYLES)}, got {self.style!r}", "e.g. `style` pfeiffer")
        if self.activation not in ACTIVATION_NAMES:
            raise UsageError(
                f"`activation` must be one of {', '.join(ACTIVATION_NAMES)}, got {self.activation!r}", "e.g. `activation` relu"
            )
        if self.reduction_factor <= 0:
            raise UsageError(f"`reduction_factor` must be positive, got {self.reduction_factor}", "e.g. `reduction_factor` 16")
        if self.bottleneck is not None and self.bottleneck <= 0:
            raise UsageError(f"`bottleneck` must be positive, got {self.bottleneck}", "e.g. `bottleneck` 64")
        if self.scaling is None:
            self.scaling = 4.0 if self.style == "parallel" else 1.0
        elif not (math.isfinite(self.scaling) and self.scaling > 0):
            raise UsageError(f"`scaling` must be a positive number, got {self.scaling}", "e.g. `scaling` 1")

    def bottleneck_for(self, hidden: int) -> int:
        return self.bottleneck if self.bottleneck is not None else max(1, hidden // self.reduction_factor)


def _unsupported(model_type: str | None) -> UsageError:
    looked = "; ".join(f"{f.attn_out} + {f.ffn_out}" for f in BLOCKS_BY_NAME)
    return UsageError(
        f"cannot find the attention and FFN output projections of this architecture (model_type {model_type!r})",
        f"looked for, in each numbered block: {looked}; for other blocks use another method, e.g. lora",
    )


def _anchors(family: Family, style: str) -> tuple[str, ...]:
    """The linear layers whose output width is h, one per placement, in block order."""
    return (family.attn_out, family.ffn_out) if style == "houlsby" else (family.ffn_out,)


@dataclass(frozen=True)
class Placement:
    module: str  # the wrapped module's path: the projection (sequential) or the FFN (parallel)
    shape: tuple[int, int]  # [out, in] of its anchor, the linear layer whose output width is h
    layer: int | None


@dataclass(frozen=True)
class Plan:
    placements: list[Placement]
    hidden: int
    bottleneck: int


def plan(shapes: dict[str, tuple[int, ...]], config: dict | None, cfg: BottleneckAdapterConfig) -> Plan:
    """Tensor level: the placements for ``cfg`` and the sizes h and b, from shapes and config.json."""
    model_type = model_type_of(config)
    linears = {m.name: m for m in linear_modules(shapes, config)}
    family = find_family(model_type, block_paths(linears))
    if family is None:
        raise _unsupported(model_type)
    if cfg.style == "parallel" and family.ffn is None:
        raise UsageError(
            f"`style` parallel needs the FFN as one module, but this architecture's FFN ({family.ffn_out}) is inline in its block",
            "use `style` pfeiffer or houlsby",
        )
    order = _anchors(family, cfg.style)
    found = []
    for m in linears.values():
        split = split_layer(m.name)
        if split is not None and split[1] in order:
            stack = split[0].rsplit(".", 1)[0]
            module = f"{split[0]}.{family.ffn}" if cfg.style == "parallel" else m.name
            found.append(((stack, m.layer, order.index(split[1])), Placement(module, m.shape, m.layer)))
    placements = [p for _, p in sorted(found, key=lambda kv: kv[0])]
    placements = _select_layers(placements, cfg.layers)
    hidden = _hidden_size(placements, config)
    bottleneck = cfg.bottleneck_for(hidden)
    if bottleneck > hidden:
        raise UsageError(
            f"`bottleneck` {bottleneck} is larger than the hidden size {hidden}",
            f"use `bottleneck` {max(1, hidden // 16)} or another value up to {hidden}: "
            "an adapter wider than the hidden state is no bottleneck",
        )
    return Plan(placements, hidden, bottleneck)


def _select_layers(placements: list[Placement], layers: str | None) -> list[Placement]:
    layer_set = parse_layers(layers)
    if layer_set is None:
        return placements
    require_layers(layer_set, {p.layer for p in placements})  # not empty: the family was found in a block
    return [p for p in placements if p.layer in layer_set]


def _hidden_size(placements: list[Placement], config: dict | None) -> int:
    """h: config.json's hidden size, which every anchor must output (else the family guess is wrong)."""
    declared = next((config[k] for k in HIDDEN_SIZE_KEYS if isinstance((config or {}).get(k), int)), None)
    hidden = declared if declared is not None else placements[0].shape[0]
    wrong = [p for p in placements if p.shape[0] != hidden]
    if wrong:
        raise BadInputError(
            f"{wrong[0].module}: outputs {wrong[0].shape[0]} features, but the hidden size is {hidden}",
            "the checkpoint does not match its config.json, or its blocks are not of a supported family",
        )
    return hidden


def added_params(hidden: int, bottleneck: int) -> int:
    return 2 * hidden * bottleneck + bottleneck + hidden


class BottleneckAdapter(MethodBase):
    name = "adapter"
    train_defaults = TrainDefaults(lr=3e-3, generative_lr=3e-4)  # benchmarks/README.md: "Training defaults"
    config_cls = BottleneckAdapterConfig
    summary = "Bottleneck adapters W_up·σ(W_down·x) in each block: Pfeiffer, Houlsby or parallel."
    peft_type = None
    examples = (
        "peftcli inject adapter model/ -o runs/pfeiffer/",
        "peftcli inject adapter --style houlsby --reduction-factor 16 model/ -o runs/houlsby/",
        "peftcli inject adapter --style parallel --bottleneck 64 --layers 12-23 model/ -o runs/parallel/",
    )

    # -- tensor level --------------------------------------------------------------------
    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: BottleneckAdapterConfig) -> list[BudgetRow]:
        p = plan(shapes, model_config, cfg)
        return [BudgetRow(pl.module, pl.shape, added_params(p.hidden, p.bottleneck)) for pl in p.placements]

    def init(self, ckpt, cfg: BottleneckAdapterConfig, generator: "torch.Generator") -> dict[str, LazyTensor]:
        import torch

        p = plan({t.name: t.shape for t in ckpt.tensors.values()}, ckpt.config, cfg)
        h, b = p.hidden, p.bottleneck
        bound = 1.0 / math.sqrt(h)  # kaiming_uniform_(a=√5) on [b, h], as LoRA's A
        out: dict[str, LazyTensor] = {}  # each made when written (inject holds one at a time)
        draws = SeededDraws(generator)  # the down weights, drawn in placement order as an eager loop would
        for pl in p.placements:
            out[f"{pl.module}.adapter.down.weight"] = draws.draw(
                (b, h), lambda g: torch.empty(b, h).uniform_(-bound, bound, generator=g)
            )
            out[f"{pl.module}.adapter.down.bias"] = lazy_zeros(b)
            out[f"{pl.module}.adapter.up.weight"] = lazy_zeros(h, b)  # f = 0: the base model exactly
            out[f"{pl.module}.adapter.up.bias"] = lazy_zeros(h)
        return out

    def adapter_config(self, ckpt, cfg: BottleneckAdapterConfig) -> dict:
        p = plan({t.name: t.shape for t in ckpt.tensors.values()}, ckpt.config, cfg)
        return {
            "peft_type": PEFTCLI_PEFT_TYPE,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "peftcli": {
                "method": self.name,
                "style": cfg.style,
                "bottleneck": p.bottleneck,
                "reduction_factor": cfg.reduction_factor,
                "activation": cfg.activation,
                "scaling": cfg.scaling,
                "layers": cfg.layers,
                "placements": [pl.module for pl in p.placements],
            },
        }

    def config_from_adapter(self, d: dict) -> BottleneckAdapterConfig:
        s = d.get("peftcli")
        if not isinstance(s, dict) or "style" not in s or not isinstance(s.get("bottleneck"), int):
            raise BadInputError(
                "adapter config has no peftcli section with the adapter's style and bottleneck",
                "was it written by peftcli inject adapter?",
            )
        placements = s.get("placements")
        if placements is not None and not (isinstance(placements, list) and all(isinstance(x, str) for x in placements)):
            raise BadInputError(
                "adapter config: 'placements' must be a list of module paths", "was it written by peftcli inject adapter?"
            )
        try:
            return BottleneckAdapterConfig(
                style=s["style"],
                reduction_factor=int(s.get("reduction_factor", 16)),
                bottleneck=s["bottleneck"],
                activation=s.get("activation", "relu"),
                scaling=float(s["scaling"]) if s.get("scaling") is not None else None,
                layers=s.get("layers"),
                placements=placements,
            )
        except UsageError as exc:
            raise BadInputError(f"adapter config: {exc.message}", "was it written by peftcli inject adapter?") from None

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: BottleneckAdapterConfig, tensors: dict, model_config: dict) -> Attached:
        by_module, problems = _group(tensors)
        if cfg.placements is not None:
            for path in sorted(set(cfg.placements) - set(by_module)):
                problems.append(f"{path}: listed in the adapter config but has no tensors")
            for path in sorted(set(by_module) - set(cfg.placements)):
                problems.append(f"{path}: has tensors but is not among the config's placements")
        family = None
        if cfg.style == "parallel":
            family = find_family(model_type_of(model_config), block_paths(n for n, _ in model.named_modules()))
            if family is None or family.ffn is None:
                problems.append("cannot tell this architecture's FFN module, which `style` parallel wraps")
                by_module = {}
        phi = {}
        for path, parts in by_module.items():
            problem = _attach_one(model, path, parts, cfg, family, phi)
            if problem:
                problems.append(f"{path}: {problem}")
        if problems:
            raise mismatch_error(problems)
        return Attached(phi=phi)


def _group(tensors: dict) -> tuple[dict[str, dict[str, "torch.Tensor"]], list[str]]:
    """Adapter tensors by module path, and the keys that are not adapter tensors."""
    by_module: dict[str, dict[str, "torch.Tensor"]] = {}
    problems = []
    for key, t in tensors.items():
        suffix = next((s for s in PARTS if key.endswith("." + s)), None)
        if suffix is None:
            problems.append(f"unexpected key {key}")
            continue
        by_module.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
    return by_module, problems


def _attach_one(model, path: str, parts: dict, cfg: BottleneckAdapterConfig, family: Family | None, phi: dict) -> str | None:
    """Wrap module ``path`` with its adapter and add its φ to ``phi``; or say what does not fit."""
    from peftcli import modules as mod
    from peftcli.methods.adapter.layer import Bottleneck, ParallelAdapter, ResidualParallelAdapter, SequentialAdapter

    real = mod.resolve(model, path)
    if real is None:
        return "no such module in the base"
    layer = model.get_submodule(real)
    if family is None:  # sequential: the module is the projection itself
        anchor = layer
    else:
        split = split_layer(path)
        if split is None or split[1] != family.ffn:
            return f"is not this architecture's FFN module ({family.ffn})"
        anchor = layer.get_submodule(family.ffn_out[len(family.ffn) + 1 :])
    try:
        hidden = mod.linear_dims(anchor)[0]
    except BadInputError:
        return f"is {type(anchor).__name__}, not a linear layer"
    missing = [s for s in PARTS if s not in parts]
    if missing:
        return f"missing {', '.join(missing)}"
    b = cfg.bottleneck_for(hidden)
    expected = {PARTS[0]: (b, hidden), PARTS[1]: (b,), PARTS[2]: (hidden, b), PARTS[3]: (hidden,)}
    wrong = [f"{s} {list(parts[s].shape)}" for s in PARTS if tuple(parts[s].shape) != expected[s]]
    if wrong:
        return f"{', '.join(wrong)} do not fit hidden size {hidden} with bottleneck {b}"
    adapter = Bottleneck(hidden, b, cfg.activation)
    adapter.load_phi(*(parts[s] for s in PARTS))
    if family is None:
        wrapper = SequentialAdapter(layer, adapter, cfg.scaling)
    elif family.ffn_takes_residual:
        wrapper = ResidualParallelAdapter(layer, adapter, cfg.scaling)
    else:
        wrapper = ParallelAdapter(layer, adapter, cfg.scaling)
    mod.replace(model, path, wrapper)
    params = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
    phi.update({f"{path}.{s}": p for s, p in zip(PARTS, params)})
    return None
