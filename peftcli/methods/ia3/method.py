"""IA³ (Liu et al., 2022): learned vectors that rescale activations of chosen linear layers.

For a target layer, y = base(x) ⊙ l with l: [out, 1] (keys, values: the output, bias
included, is rescaled); for a feedforward target, y = base(x ⊙ l) with l: [1, in] (the FFN
intermediate is rescaled on its way into the down-projection). l starts at ones, so the
adapted model starts as the base. A layer adds out parameters, a feedforward one in.
Written in PEFT's layout: ``base_model.model.<module>.ia3_l``; default targets and
feedforward modules are PEFT 0.21's per-family mappings, so both select the same modules:
Llama's k_proj, v_proj (outputs) and down_proj (input: the FFN intermediate); BERT's key,
value and every ``output.dense`` (PEFT's suffix rule also takes attention.output.dense, whose
input is the attention's context); GPT-2's whole c_attn (q, k and v are one Conv1D) and
mlp.c_proj. A model_type PEFT has no mapping for gets the first family whose target names
are all among its modules (a fine-tune relabelled ``foo`` of a Llama gets Llama's).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from peftcli.architectures import IA3_FEEDFORWARD, IA3_TARGETS
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, MethodBase, BudgetRow, mismatch_error, peft_key, selection, targeted_module, PEFT_PREFIX, TrainDefaults
from peftcli.options import option
from peftcli.patterns import compile_pattern, from_file
from peftcli.targets import LinearModule, is_regex, linear_modules, linear_names_hint, model_type_of, names_hint, names_module, resolve_targets

if TYPE_CHECKING:
    import torch

# For a model_type without a mapping: (targets, feedforward) of each family, in the order they are
# tried against the module names (the common families first; each needs all its targets present).
_BY_NAME: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = tuple(
    dict.fromkeys(
        (IA3_TARGETS[t], IA3_FEEDFORWARD[t])
        for t in ("llama", "bert", "gpt2", *IA3_TARGETS)
        if IA3_FEEDFORWARD[t]  # mt5 has none: not a default to guess
    )
)



def _names(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]




def _peft_suffix_regex(names) -> str:
    """PEFT's rule for a feedforward_modules list (``key.endswith(name)``, no dot) as a regex."""
    names = list(names)
    return ".*(?:" + "|".join(re.escape(n) for n in names) + ")" if names else ""


@dataclass
class IA3Config:
    targets: str | None = option(
        None,
        metavar="NAMES|REGEX|all-linear",
        help="modules to adapt: comma-separated names (k_proj,v_proj), a regex over module paths, "
        "or all-linear; default: PEFT's per-family IA³ targets: key and value outputs (GPT-2: all of c_attn) "
        "and the input of the FFN down-projection, i.e. the FFN intermediate (BERT: of every output.dense, "
        "attention.output.dense too); other model_types by their module names",
    )
    feedforward: str | None = option(
        None,
        metavar="NAMES|REGEX",
        help="which targets are feedforward (their input is scaled, not their output): names or a regex "
        "as for --targets, '' for none; default: PEFT's per-family choice (the FFN down-projection; "
        "BERT: every output.dense)",
    )
    layers: str | None = option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")

    def __post_init__(self) -> None:
        if self.feedforward and is_regex(self.feedforward):
            compile_pattern(self.feedforward, "`feedforward`", "e.g. `feedforward` '.*\\.down_proj'")


def family_defaults(model_type: str | None, paths) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(targets, feedforward): PEFT's mapping for ``model_type``, else the first family whose
    target names all match module ``paths`` (exactly or as a dotted suffix); None if none does."""
    if model_type in IA3_TARGETS:
        return IA3_TARGETS[model_type], IA3_FEEDFORWARD[model_type]
    paths = list(paths)
    for targets, feedforward in _BY_NAME:
        if all(any(names_module(p, n) for p in paths) for n in targets):
            return targets, feedforward
    return None


def _feedforward_rule(cfg: IA3Config, model_type: str | None, paths, hint: str = "") -> Callable[[str], bool]:
    """Whether the module at a path is feedforward, per --feedforward or the family default."""
    spec = cfg.feedforward
    if spec is None:
        found = family_defaults(model_type, paths)
        if found is None:
            raise UsageError(
                f"peftcli does not know which IA³ targets are feedforward for model_type {model_type!r}",
                "pass `feedforward` NAMES (or `feedforward` '' for none)" + (f"; {hint}" if hint else ""),
            )
        spec = _peft_suffix_regex(found[1])
    if spec.strip() == "":
        return lambda path: False
    if is_regex(spec):
        pattern = compile_pattern(spec, "`feedforward`")
        return lambda path: pattern.fullmatch(path)
    names = _names(spec)
    return lambda path: any(names_module(path, n) for n in names)


def _check_feedforward_spec(cfg: IA3Config, modules: list[LinearModule]) -> None:
    """An explicit --feedforward must pick targets, as PEFT requires feedforward ⊆ targets."""
    spec = cfg.feedforward
    if spec is None or spec.strip() == "":
        return
    if is_regex(spec):
        pattern = compile_pattern(spec, "`feedforward`")
        missing = [] if any(pattern.fullmatch(m.name) for m in modules) else [spec]
    else:
        missing = [n for n in _names(spec) if not any(names_module(m.name, n) for m in modules)]
    if missing:
        # A value read from adapter_config.json is named as the file names it, not as a field.
        name = getattr(spec, "origin", "") or "`feedforward`"
        raise UsageError(
            f"{name} {', '.join(missing)} matches none of the targets",
            "feedforward modules must be among `targets`; targets here: " + names_hint(m.name for m in modules),
        )


# PEFT 0.21/0.22's IA3Config keys beside the ones every PEFT config has (``vera.ACCEPTED``).
_IA3_KEYS = ("exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights")


class IA3(MethodBase):
    name = "ia3"
    train_defaults = TrainDefaults(lr=4.5e-2, generative_lr=3e-3)  # benchmarks/README.md: "Training defaults"
    folds = True
    config_cls = IA3Config
    summary = "Learned vectors rescaling keys, values and the FFN intermediate (IA³)."
    peft_type = "IA3"
    examples = (
        "peftcli inject ia3 model/ -o runs/ia3/",
        "peftcli inject ia3 --targets k_proj,v_proj,down_proj --feedforward down_proj --layers 20-29 model/ -o runs/ia3-top/",
        "peftcli inject ia3 --targets q_proj,v_proj --feedforward '' model/ -o runs/ia3-qv/",
    )

    def _targets(self, shapes, model_config, cfg: IA3Config) -> list[tuple[LinearModule, bool]]:
        """(module, is feedforward) for every target."""
        model_type = model_type_of(model_config)
        linear = linear_modules(shapes, model_config)
        paths = [m.name for m in linear]
        targets = cfg.targets
        if targets is None or targets.strip() == "":
            found = family_defaults(model_type, paths)
            if found is None and linear:
                raise UsageError(
                    f"peftcli has no default IA³ targets for model_type {model_type!r} and recognises none of its modules",
                    "pass `targets` and `feedforward`; " + linear_names_hint(linear),
                )
            targets = ",".join(found[0]) if found else None  # None: resolve_targets says there is no linear weight
        modules = resolve_targets(shapes, model_config, targets, cfg.layers)
        _check_feedforward_spec(cfg, modules)
        is_ff = _feedforward_rule(cfg, model_type, paths, linear_names_hint(linear))
        return [(m, is_ff(m.name)) for m in modules]

    @staticmethod
    def phi_shape(module: LinearModule, feedforward: bool) -> tuple[int, int]:
        d_out, d_in = module.shape
        return (1, d_in) if feedforward else (d_out, 1)

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: IA3Config) -> list[BudgetRow]:
        return [BudgetRow(m.name, m.shape, math.prod(self.phi_shape(m, ff))) for m, ff in self._targets(shapes, model_config, cfg)]

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: IA3Config, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        # Ones, as PEFT's init_ia3_weights=True: deterministic, so the generator is unused.
        return {peft_key(m.name, "ia3_l"): torch.ones(self.phi_shape(m, ff)) for m, ff in self._targets(shapes, ckpt.config, cfg)}

    def adapter_config(self, ckpt, cfg: IA3Config) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        targets = self._targets(shapes, ckpt.config, cfg)
        return {
            "peft_type": "IA3",
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            # Exact module paths: PEFT suffix-matches both lists, so it selects exactly these modules.
            "target_modules": [m.name for m, _ in targets],
            "feedforward_modules": [m.name for m, ff in targets if ff],
            "fan_in_fan_out": any(m.transposed for m, _ in targets),
            "init_ia3_weights": True,
            "modules_to_save": None,
            "inference_mode": False,
        }

    def config_from_adapter(self, d: dict) -> IA3Config:
        from peftcli.methods.vera import refuse_unknown

        refuse_unknown(d, "IA3", _IA3_KEYS)  # a newer PEFT's option may change what IA³ computes
        if d.get("exclude_modules"):
            raise BadInputError(
                "IA³ adapter config uses exclude_modules, which peftcli does not support yet",
                "list the modules to adapt in target_modules instead",
            )
        targets, feedforward = d.get("target_modules"), d.get("feedforward_modules")
        if targets is not None and not (targets.strip() if isinstance(targets, str) else targets):
            raise BadInputError(
                "IA³ adapter config: 'target_modules' is empty, so the adapter targets no module",
                "list the adapted modules in target_modules (the keys' module paths), or remove the key for the defaults",
            )
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            outside = sorted(set(feedforward) - set(targets))
            raise BadInputError(  # PEFT's IA3Config refuses this too
                f"IA³ adapter config: 'feedforward_modules' names {', '.join(outside[:3])}, which is not in 'target_modules'",
                "feedforward_modules must be a subset of target_modules; fix adapter_config.json",
            )
        try:
            return IA3Config(targets=_peft_targets(targets), feedforward=_peft_feedforward(feedforward))
        except UsageError as exc:
            raise BadInputError(f"IA³ adapter config: {exc.message}", "the adapter config is corrupt or was edited by hand") from None

    def _selected(self, shapes, model_config, cfg: IA3Config) -> tuple[dict[str, bool] | None, BadInputError | None]:
        """Module path -> is feedforward, for the modules the adapter config selects among
        ``shapes``; or why it selects none (raised after the per-key problems, which say more)."""
        return selection(
            lambda: {m.name: ff for m, ff in self._targets(shapes, model_config, cfg)},
            "IA³ adapter config", "were target_modules/feedforward_modules",
        )

    # -- module level ---------------------------------------------------------------------
    def deltas(self, cfg: IA3Config, tensors: dict, ckpt) -> dict:
        """ΔW = W·(l − 1) on rows (output scaling, the bias too) or columns (feedforward input)."""
        from functools import partial

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(shapes, ckpt.config, cfg)
        problems, out = [], {}
        for key, t in tensors.items():
            if not key.startswith(PEFT_PREFIX) or not key.endswith(".ia3_l"):
                problems.append(f"unexpected key {key}")
                continue
            path = key[len(PEFT_PREFIX) : -len(".ia3_l")]
            name, problem = targeted_module(path, linear, selected, "an ia3_l")
            if problem:
                problems.append(problem)
                continue
            m = linear[name]
            if selected is None:
                continue  # unfit is raised below
            feedforward = selected[name]
            problem = _shape_problem(path, t, *m.shape, feedforward)
            if problem:
                problems.append(problem)
                continue
            out[name + ".weight"] = partial(_fold_weight, scale=t, transposed=m.transposed)
            if not feedforward and name + ".bias" in shapes:  # the output is scaled, bias included
                out[name + ".bias"] = partial(_fold_bias, scale=t)
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        return out

    def attach(self, model, cfg: IA3Config, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.ia3.layer import IA3Linear

        problems: list[str] = []
        try:
            is_ff = _feedforward_rule(cfg, model_type_of(model_config), [n for n, _ in model.named_modules()])
        except UsageError as exc:
            raise BadInputError(f"adapter config: {exc.message}", "add feedforward_modules to adapter_config.json") from None
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        selected, unfit = self._selected(shapes, model_config, cfg)  # as PEFT selects them: on the model's names
        phi = {}
        for key, t in tensors.items():
            if not key.startswith(PEFT_PREFIX) or not key.endswith(".ia3_l"):
                problems.append(f"unexpected key {key}")
                continue
            path = key[len(PEFT_PREFIX) : -len(".ia3_l")]
            layer, dims, problem = mod.find_linear(model, path)
            if problem is None and selected is not None and mod.resolve(model, path) not in selected:
                problem = f"{path}: an ia3_l for a module the adapter config does not target"
            if problem:
                problems.append(problem)
                continue
            ff = is_ff(path)
            problem = _shape_problem(path, t, *dims, ff)
            if problem:
                problems.append(problem)
                continue
            new = IA3Linear(layer, feedforward=ff)
            new.load_phi(t)
            mod.replace(model, path, new)
            phi[key] = new.ia3_l
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        return Attached(phi=phi)


def _shape_problem(path: str, t: "torch.Tensor", d_out: int, d_in: int, feedforward: bool) -> str | None:
    """Why ``t`` is not the ia3_l of a d_out×d_in layer, feedforward or not; None if it is."""
    expected = (1, d_in) if feedforward else (d_out, 1)
    if tuple(t.shape) != expected:
        return (
            f"{path}: ia3_l {list(t.shape)} does not fit a {d_out}×{d_in} layer "
            f"({'feedforward' if feedforward else 'not feedforward'} per the config, so {list(expected)})"
        )
    return None


def _peft_targets(value) -> str | None:
    """PEFT's target_modules as --targets: a list has the same rule (exact or dot-suffix)."""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, str) and value != "all-linear":
        # PEFT full-matches a string even without regex characters; (?:...) would break a leading (?i)
        return from_file(value if is_regex(value) else f"(?:{value})", "adapter_config.json target_modules")
    return value


def _peft_feedforward(value) -> str | None:
    """PEFT's feedforward_modules as --feedforward, keeping PEFT's plain-suffix rule for a list."""
    if isinstance(value, list):
        return _peft_suffix_regex(value)
    if isinstance(value, str):
        return from_file(value if is_regex(value) else f"(?:{value})", "adapter_config.json feedforward_modules") if value else ""
    return value


def _fold_weight(stored: "torch.Tensor", *, scale: "torch.Tensor", transposed: bool) -> "torch.Tensor":
    w = (stored.T if transposed else stored).float()
    delta = w * (scale.float() - 1.0)  # [out, 1] scales rows, [1, in] scales columns
    return delta.T if transposed else delta


def _fold_bias(stored: "torch.Tensor", *, scale: "torch.Tensor") -> "torch.Tensor":
    return stored.float() * (scale.float().flatten() - 1.0)
