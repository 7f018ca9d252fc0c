"""LoRA on nn.Parameters: PEFT's ``target_parameters`` (its ``lora.ParamWrapper``, PEFT ≥ 0.17),
at tensor level (targets, shapes, ΔW for merge) and module level (attach for train/evaluate).

A target is a 2-D or 3-D parameter named by a suffix of its path, e.g. a fused MoE expert
tensor ``feed_forward.experts.gate_up_proj``. PEFT's layout, for r the rank and s the scaling:

- 2-D [out, in]: ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r], ΔW = s·B·A (as lora.Linear);
- 3-D [E, d1, d2] (E experts, the module's ``is_transposed`` false): ``lora_A.weight`` [r·E, d2]
  whose rows are expert-major (row e·r + k), ``lora_B.weight`` [d1, r·E] whose columns are
  rank-major (column k·E + e); ΔW[e] = s·B_e·A_e, PEFT's ``einsum("o r e, e r i -> e o i")``.

Keys: ``base_model.model.<module>.lora_A.weight`` with <module> the parameter's owner. Several
targeted parameters of one module are nested wrappers, the first registered innermost: the
i-th of n (in the module's registration order) is keyed ``<module>`` + ``.base_layer`` × (n−1−i).
A checkpoint does not record that order nor ``is_transposed``, so 3-D targets are taken only
for the model types in ``EXPERTS``, whose modeling code gives both: ``llama4_text`` (fused
experts stored as such) and ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, whose
checkpoints store experts one by one and transformers fuses them on load (expert_layouts.py:
targets named by the loaded model's paths, e.g. ``model.layers.0.mlp.experts.gate_up_proj``;
merge writes ΔW[e] back into the per-expert tensors, gate's rows then up's). PEFT refuses dropout,
DoRA, lora_bias and fan_in_fan_out with it; peftcli also offers only the kaiming init and no
rank/alpha patterns there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import LazyTensor, lazy_zeros, mismatch_error, peft_key
from peftcli.methods.lora import expert_layouts

if TYPE_CHECKING:
    import torch

# model_type -> the registration order of its fused expert parameters (transformers 5's
# modeling code; none of these sets ``is_transposed``). Checkpoints of the types in
# expert_layouts.LAYOUTS store experts one by one (transformers fuses them when it loads).
EXPERTS: dict[str, tuple[str, ...]] = {"llama4_text": ("gate_up_proj", "down_proj"),
                                       **dict.fromkeys(expert_layouts.LAYOUTS, expert_layouts.FUSED)}
NESTED = ".base_layer"
PARTS = ("lora_A.weight", "lora_B.weight")


@dataclass(frozen=True)
class Target:
    name: str  # the parameter's path in the checkpoint, e.g. model.layers.0.feed_forward.experts.gate_up_proj
    shape: tuple[int, ...]
    path: str  # where PEFT keys its LoRA tensors: the owner module, with .base_layer per outer wrapper
    # the on-disk tensors when transformers fuses or renames them on load (expert_layouts.Loaded.disk):
    # per expert, the tensors ΔW[e]'s rows go to in order; () when the parameter is stored under ``name``
    disk: tuple[tuple[str, ...], ...] = ()

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def param(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def ab_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """lora_A's and lora_B's shapes in PEFT's layout."""
        d_out, d_in = self.shape[-2:]
        e = self.experts
        return (rank * e, d_in), (d_out, rank * e)


def names(spec) -> tuple[str, ...]:
    """``--target-parameters`` (comma-separated) or adapter_config.json's list, as a tuple."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else spec
    return tuple(t.strip() for t in items if t.strip())


def refuse_options(cfg) -> None:
    """The LoRA options PEFT's ParamWrapper refuses, or peftcli does not implement with it (an
    adapter's init, ``peft_embeddings`` set, changes nothing once A and B are trained)."""
    given = [(cfg.dropout > 0, "dropout", "PEFT's ParamWrapper cannot apply dropout to a parameter's input"),
             (cfg.dora, "dora", "PEFT's ParamWrapper refuses DoRA"),
             (cfg.lora_bias, "lora_bias", "PEFT's ParamWrapper refuses lora_bias"),
             (cfg.init != "kaiming" and not cfg.peft_embeddings, f"init {cfg.init}", "peftcli initialises parameter targets as kaiming only"),
             (bool(cfg.ranks or cfg.alphas), "rank_pattern/alpha_pattern", "peftcli gives parameter targets the one rank and alpha"),
             # PEFT applies layers_to_transform (and exclude_modules) to target_modules only, as peftcli reads adapters
             (bool(cfg.layers) and not cfg.peft_embeddings, "layers", "PEFT applies layers_to_transform to modules, not to target_parameters")]
    for on, what, why in given:
        if on:
            raise UsageError(f"`target_parameters` with `{what}`: {why}",
                             "name the parameters of the layers wanted by their paths" if what == "layers" else f"drop `{what}`, or target modules with `targets` instead")


def targets(shapes: dict, model_config: dict | None, spec, linear_targets: list, on_disk: bool = True) -> list[Target]:
    """The parameters ``spec`` names among ``shapes`` (a name equal to a tensor's path or to a
    dotted suffix of it, as PEFT matches), each with the path PEFT keys its LoRA under
    (``linear_targets``: the modules target_modules selects beside them). ``shapes`` are a
    checkpoint's tensors (``on_disk``: those transformers fuses or renames on load are taken
    as it loads them, expert_layouts.py) or a loaded model's parameters."""
    conv1d = next((m.name for m in linear_targets if m.transposed), None)
    if conv1d is not None:  # the config's fan_in_fan_out, which PEFT's ParamWrapper refuses
        raise UsageError(f"`target_parameters` beside the Conv1D target {conv1d}: PEFT's ParamWrapper refuses fan_in_fan_out",
                         "target this model's modules with `targets` alone, or its parameters alone")
    wanted = names(spec)
    model_type = (model_config or {}).get("model_type")
    plain, moved, stored_fused = expert_layouts.loaded_shapes(shapes, model_type) if on_disk else (dict(shapes), {}, set())
    loaded = {**plain, **{n: m.shape for n, m in moved.items()}}
    found: dict[str, tuple[int, ...]] = {}
    for t in wanted:
        refused = next((n for n in stored_fused if n == t or n.endswith("." + t)), None)
        if refused is not None:
            expert_layouts.refuse_stored_fused(refused, model_type)
        hits = {n: tuple(s) for n, s in loaded.items() if n == t or n.endswith("." + t)}
        if not hits and on_disk:
            expert_layouts.refuse_undeclared(t, shapes, model_type)
        if not hits:
            raise BadInputError(
                f"`target_parameters` names {t}, which is no parameter of this model",
                "name a parameter path or its suffix as `peftcli inspect MODEL --tensors` lists it, or as transformers' "
                f"loaded model names it for {', '.join(expert_layouts.LAYOUTS)} (e.g. mlp.experts.gate_up_proj)",
            )
        bad = next((n for n, s in hits.items() if len(s) not in (2, 3)), None)
        if bad is not None:
            raise BadInputError(f"`target_parameters` names {bad}, a {len(hits[bad])}-D parameter: LoRA needs a 2-D or 3-D one",
                                "name matrices or stacked expert matrices only")
        found.update(hits)
    _refuse_tied(found, shapes, model_config)
    layout = expert_layouts.LAYOUTS.get(model_type or "") if on_disk else None
    # the modules target_modules selects, named as in the loaded model (Mixtral's block_sparse_moe is its mlp)
    linear = {expert_layouts.loaded_name(m.name, layout) if layout else m.name for m in linear_targets}
    nested = _nest(found, model_type, linear)
    return [dataclasses.replace(t, disk=moved[t.name].disk) if t.name in moved else t for t in nested]


def _refuse_tied(found: dict, shapes: dict, model_config: dict | None) -> None:
    """A tied input embedding: PEFT's ParamWrapper changes it for the input only (the output
    head keeps W) while its merge changes the one tensor for both, so no fold is right."""
    from peftcli.methods.prompting import dims

    if not (model_config or {}).get("tie_word_embeddings", True):
        return
    try:
        embedding = dims.input_embedding(shapes, model_config)[0] + ".weight"
    except BadInputError:
        return  # no input embedding found: nothing to be tied
    if embedding in found:
        raise BadInputError(f"`target_parameters` names {embedding}, which this model ties to its output head",
                            "PEFT's model with it computes other outputs than its merge: target another parameter")


def _nest(found: dict[str, tuple[int, ...]], model_type: str | None, linear_targets: set[str]) -> list[Target]:
    """Targets keyed as PEFT nests the wrappers of one module's parameters."""
    by_module: dict[str, list[str]] = {}
    for n in found:
        by_module.setdefault(n.rpartition(".")[0], []).append(n)
    out = []
    for module, params in by_module.items():
        if module in linear_targets:
            raise BadInputError(f"{module} is targeted both by `targets` and by `target_parameters` ({params[0]})",
                                "target it one way (PEFT refuses both)")
        three_d = next((n for n in params if len(found[n]) == 3), None)
        order = EXPERTS.get(model_type or "")
        if three_d is not None and order is None:
            raise BadInputError(
                f"`target_parameters` names the 3-D parameter {three_d} of a {model_type} model: peftcli knows PEFT's "
                f"layout of fused expert tensors for {', '.join(EXPERTS)} only",
                "use PEFT for this model, or target its 2-D modules with `targets`",
            )
        if len(params) > 1:
            short = [n.rpartition(".")[2] for n in params]
            if order is None or any(s not in order for s in short):
                raise BadInputError(
                    f"`target_parameters` names {len(params)} parameters of {module}: PEFT nests them in the module's "
                    "registration order, which peftcli knows for fused experts only",
                    "target one parameter per module",
                )
            params = sorted(params, key=lambda n: order.index(n.rpartition(".")[2]))
        for i, n in enumerate(params):
            out.append(Target(n, found[n], module + NESTED * (len(params) - 1 - i)))
    return sorted(out, key=lambda t: t.name)


def added_params(target: Target, rank: int) -> int:
    (ra, da), (db, rb) = target.ab_shapes(rank)
    return ra * da + db * rb


def init(found: list[Target], rank: int, draws) -> dict[str, LazyTensor]:
    """A as PEFT's kaiming_uniform_(a=√5) on its [r·E, in] weight, U(−1/√in, 1/√in); B zero."""
    import torch

    out = {}
    for t in found:
        (ra, da), b = t.ab_shapes(rank)
        bound = 1.0 / math.sqrt(da)
        out[peft_key(t.path, PARTS[0])] = draws.draw((ra, da), lambda g, ra=ra, da=da, bound=bound: torch.empty(ra, da).uniform_(-bound, bound, generator=g))
        out[peft_key(t.path, PARTS[1])] = lazy_zeros(*b)
    return out


def delta(a: "torch.Tensor", b: "torch.Tensor", scaling: float, experts: int) -> "torch.Tensor":
    """ΔW in fp32 in the parameter's own layout ([out, in], or [E, d1, d2]), as PEFT's get_delta_weight."""
    import torch

    a, b = a.float(), b.float()
    if experts == 1:
        return scaling * (b @ a)
    a3 = a.reshape(experts, -1, a.shape[-1])  # [E, r, d2]
    b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # [E, d1, r]
    return scaling * torch.bmm(b3, a3)


def _fold(stored: "torch.Tensor", *, a: "torch.Tensor", b: "torch.Tensor", scaling: float, experts: int) -> "torch.Tensor":
    return delta(a, b, scaling, experts)


def split(by_module: dict[str, dict], found: list[Target]) -> dict[Target, dict]:
    """The adapter's tensors grouped per parameter target, taken out of ``by_module`` (grouped
    by key path), so that what is left there is LoRA on modules."""
    by_path = {t.path: t for t in found}
    return {by_path[path]: by_module.pop(path) for path in [p for p in by_module if p in by_path]}


def problem(t: Target, parts: dict, rank: int) -> str | None:
    """What is wrong with one parameter target's LoRA tensors, or None."""
    extra = sorted(set(parts) - set(PARTS))
    if extra:
        return f"{t.path}: {', '.join(extra)} beside LoRA on the parameter {t.name} (PEFT's ParamWrapper has lora_A and lora_B only)"
    if any(p not in parts for p in PARTS):
        return f"{t.path}: lora_A and lora_B must both be present"
    want = t.ab_shapes(rank)
    got = tuple(tuple(parts[p].shape) for p in PARTS)
    if got != want:
        return (f"{t.path}: lora_A {list(got[0])} / lora_B {list(got[1])} do not fit r={rank} on {t.name} "
                f"{list(t.shape)} (PEFT's layout: {list(want[0])} / {list(want[1])})")
    return None


def deltas(by_module: dict, found: list[Target], cfg, out: dict, problems: list) -> None:
    """ΔW per targeted parameter into ``out`` (one tensor at a time when merge writes them)."""
    from functools import partial

    grouped = split(by_module, found)
    for t, parts in grouped.items():
        p = problem(t, parts, cfg.rank)
        if p:
            problems.append(p)
            continue
        check_finite(t, parts, cfg.scaling, cfg.rank)
        a, b = parts[PARTS[0]], parts[PARTS[1]]
        if not t.disk:
            out[t.name] = partial(_fold, a=a, b=b, scaling=cfg.scaling, experts=t.experts)
        for e, stored in enumerate(t.disk):  # fused on load: each expert's rows back to its tensors
            rows = t.shape[-2] // len(stored)
            for k, name in enumerate(stored):
                out[name] = partial(expert_layouts.fold_expert, a=a, b=b, scaling=cfg.scaling, experts=t.experts,
                                    expert=e, rows=slice(k * rows, (k + 1) * rows))


def check_finite(t: Target, parts: dict, scaling: float, rank: int) -> None:
    """Refuse a ΔW that is not finite in fp32 (bounded first, multiplied out only if the bound overflows)."""
    import torch

    a, b = parts[PARTS[0]], parts[PARTS[1]]
    bound = scaling * rank * float(b.abs().max()) * float(a.abs().max())
    if bound <= 3.4e38 / 2 or bool(torch.isfinite(delta(a, b, scaling, t.experts)).all()):
        return
    raise BadInputError(
        f"{t.path}: the scaled update (lora_alpha/r)·B·A = {scaling:g}·B·A of {t.name} is not finite in float32",
        "lora_alpha in adapter_config.json is absurd for these weights, or they hold NaN/Inf (peftcli check names them)",
    )


# -- module level ---------------------------------------------------------------------------
def attach(model, by_module: dict, found: list[Target], cfg) -> dict:
    """Put each target's LoRA on its parameter as a parametrization W + ΔW(A, B); returns φ."""
    import torch
    from torch.nn.utils import parametrize

    grouped = split(by_module, found)
    problems = [p for t, parts in grouped.items() if (p := problem(t, parts, cfg.rank))]
    if problems:
        raise mismatch_error(problems)
    phi = {}
    for t, parts in grouped.items():
        owner = model.get_submodule(t.module)
        weight = getattr(owner, t.param, None)
        if not (isinstance(weight, torch.nn.Parameter) and weight.is_floating_point()):  # e.g. quantised: no W to add ΔW to
            raise BadInputError(f"{t.name} is no floating-point parameter in this model ({type(owner).__name__})",
                                "load the base unquantised to train or evaluate LoRA on its parameters")
        if getattr(owner, "is_transposed", False):  # PEFT's other layout ("e i o"): not the one EXPERTS promises
            raise BadInputError(f"{t.module} stores its experts transposed (is_transposed), which peftcli does not attach",
                                "use PEFT for this model")
        lora = param_lora()(parts[PARTS[0]], parts[PARTS[1]], cfg.scaling, t.experts)
        parametrize.register_parametrization(owner, t.param, lora)
        phi[peft_key(t.path, PARTS[0])] = lora.lora_A
        phi[peft_key(t.path, PARTS[1])] = lora.lora_B
    return phi


@functools.cache
def param_lora() -> type:
    """The parametrization class (made on first use: this module imports torch lazily)."""
    from torch import nn

    class ParamLora(nn.Module):
        """W ↦ W + ΔW(A, B): the parameter as PEFT's ParamWrapper makes it while LoRA is active."""

        def __init__(self, a, b, scaling: float, experts: int):
            super().__init__()
            self.lora_A = nn.Parameter(a.detach().float().clone())
            self.lora_B = nn.Parameter(b.detach().float().clone())
            self.scaling, self.experts = scaling, experts

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w + delta(self.lora_A, self.lora_B, self.scaling, self.experts).to(w.dtype)

    return ParamLora
