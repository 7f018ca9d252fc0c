"""What LoHa and LoKr share: PEFT's LyCORIS adapter config read key by key, the modules it
selects, per-module rank and alpha, and the fold and attach loops over a module's φ parts.

A LyCORIS method here is its φ parts per linear module (``parts``: suffix -> shape, from the
module's [out, in], its rank and the config), their initial values (``initial``) and ΔW from
them (``delta``, unscaled; the fold multiplies by α/r, PEFT's ``scaling`` for both types). PEFT
adapts ``nn.Linear`` (and convolutions, which text models here do not have) but not
transformers' ``Conv1D``: a GPT-2 target is refused rather than written in a layout PEFT
cannot load. Every key PEFT writes in a LOHA or LOKR adapter_config.json is read below:
understood (``_ACCEPTED``: what cannot change the fold or φ's layout on linear layers) or
refused naming it; a key PEFT does not write is refused too.
"""

from __future__ import annotations

import math
import os
from dataclasses import field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from peftcli.checkpoint.model_config import is_json_number
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import (
    TrainDefaults,
    PEFT_PREFIX, Attached, BudgetRow, MethodBase, SeededDraws, lazy_zeros, mismatch_error, peft_key, selection, targeted_module,
)
from peftcli.methods import rank_patterns
from peftcli.options import option
from peftcli.patterns import from_file
from peftcli.targets import LinearModule, linear_modules

if TYPE_CHECKING:
    import torch

FP32_MAX = 3.4028234663852886e38
CORRUPT = "the adapter config is corrupt or was edited by hand"

# Keys PEFT writes that cannot change the fold, nor φ's layout on linear layers: bookkeeping,
# the initialisation of φ before training (init_weights), the decomposition PEFT uses for
# convolution kernels only (use_effective_conv2d: linear layers ignore it in PEFT's update_layer)
# and modules_to_save (the saved heads, which merge and check read for every method).
_ACCEPTED = ("task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
             "modules_to_save", "init_weights", "use_effective_conv2d")
# Keys whose values are read into the config (LoKr adds its own).
_READ = ("peft_type", "r", "alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
         "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout")


def rank_option(help: str = "rank r of each low-rank factor (default 8)"):
    return option(8, "-r", help=help)


def alpha_option():
    return option(None, help="scaling numerator α: ΔW is scaled by α/r (default: the rank, so a scale of 1)")


def targets_option():
    return option(
        None,
        metavar="NAMES|REGEX|all-linear",
        help="modules to adapt: comma-separated names (q_proj,v_proj), a regex over module paths, "
        "or all-linear; default: the query and value projections (PEFT's default); nn.Linear layers only, "
        "as PEFT (not GPT-2's Conv1D)",
    )


def layers_option():
    return option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")


def read_only(default: Any) -> Any:
    """A field read from an adapter, never an option, and not recorded in what inject writes."""
    return field(default=default, metadata={"recorded": False})


def check_common(cfg: Any) -> None:
    """``__post_init__`` of both configs: rank, alpha (default: the rank) and dropouts."""
    if not isinstance(cfg.rank, int) or cfg.rank <= 0:
        raise UsageError(f"`rank` must be a positive integer, got {cfg.rank}", "e.g. `rank` 8")
    if cfg.alpha is None:
        cfg.alpha = float(cfg.rank)
    elif not math.isfinite(cfg.alpha) or cfg.alpha <= 0:
        raise UsageError(f"`alpha` must be a positive number, got {cfg.alpha}", "e.g. `alpha` 8, or leave it out for the rank")
    for name in ("rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UsageError(f"{name} must be in [0, 1), got {getattr(cfg, name)}", "e.g. 0.0")


def rank_alpha(cfg: Any, module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module`` (rank_pattern/alpha_pattern, else r and alpha),
    as PEFT 0.15 on matches the keys (``rank_patterns``)."""
    rank, alpha = rank_patterns.module_values(cfg.rank_pattern, cfg.alpha_pattern, module, cfg.rank, cfg.alpha, rank_patterns.CURRENT)
    return rank, float(alpha)


# -- reading adapter_config.json ------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def refuse_unknown(d: dict, what: str, own: tuple[str, ...]) -> None:
    """Refuse a key PEFT does not write for this type (a newer PEFT's option changes the math)."""
    known = set(_ACCEPTED) | set(_READ) | set(own)
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise BadInputError(
            f"{what} adapter config has {unknown[0]!r}, which peftcli does not understand",
            "peftcli reads PEFT 0.21's " + what + " options; merge this adapter with PEFT's merge_and_unload",
        )
    if d.get("layers_pattern"):
        raise BadInputError(
            f"{what} adapter config uses layers_pattern {d['layers_pattern']!r}, which peftcli does not support",
            "peftcli reads the layer index from the module path: save the adapter with layers_pattern null",
        )
    if not isinstance(d.get("use_effective_conv2d", False), bool) or not isinstance(d.get("inference_mode", False), bool):
        raise BadInputError(f"{what} adapter config: use_effective_conv2d and inference_mode must be true or false", CORRUPT)


def common_fields(d: dict, what: str) -> dict:
    """The config fields both types read, each checked as PEFT writes it."""
    if "r" not in d:
        raise BadInputError(f"{what} adapter config has no rank 'r'", "add \"r\": <rank> to adapter_config.json")
    r, alpha = d["r"], d.get("alpha", 8)  # PEFT's default alpha when absent
    if not _is_int(r) or r < 1:
        raise BadInputError(f"{what} adapter config: 'r' must be a positive integer, not {r!r}", CORRUPT)
    if not is_json_number(alpha) or alpha <= 0:
        raise BadInputError(f"{what} adapter config: 'alpha' must be a positive number, not {alpha!r}", CORRUPT)
    for key in ("rank_dropout", "module_dropout"):
        if not is_json_number(d.get(key, 0.0)) or not 0 <= d.get(key, 0.0) < 1:
            raise BadInputError(f"{what} adapter config: '{key}' must be a number in [0, 1)", CORRUPT)
    targets = d.get("target_modules")
    if targets is not None and not (targets.strip() if isinstance(targets, str) else targets):
        raise BadInputError(
            f"{what} adapter config: 'target_modules' is empty, so the adapter targets no module",
            "list the adapted modules in target_modules (the keys' module paths)",
        )
    if not (targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise BadInputError(f"{what} adapter config: 'target_modules' must be a string or a list of strings", CORRUPT)
    layers = d.get("layers_to_transform")
    if not (layers is None or (_is_int(layers) and layers >= 0) or (isinstance(layers, list) and all(_is_int(x) and x >= 0 for x in layers))):
        raise BadInputError(f"{what} adapter config: 'layers_to_transform' must be a layer index or a list of them", CORRUPT)
    exclude = d.get("exclude_modules")
    if not (exclude is None or isinstance(exclude, str) or (isinstance(exclude, list) and all(isinstance(t, str) for t in exclude))):
        raise BadInputError(f"{what} adapter config: 'exclude_modules' must be a string or a list of strings", CORRUPT)
    return dict(
        rank=r,
        alpha=float(alpha),
        targets=",".join(targets) if isinstance(targets, list) else from_file(targets, "adapter_config.json target_modules"),
        layers=",".join(map(str, layers)) if isinstance(layers, list) else (str(layers) if layers is not None else None),
        exclude=(exclude if isinstance(exclude, str) else tuple(exclude)) if exclude else None,
        rank_pattern=rank_patterns.from_config(d, "rank_pattern", what, CORRUPT),
        alpha_pattern=rank_patterns.from_config(d, "alpha_pattern", what, CORRUPT),
        rank_dropout=float(d.get("rank_dropout", 0.0)),
        module_dropout=float(d.get("module_dropout", 0.0)),
    )


def build(cls: type, fields: dict, what: str):
    try:
        return cls(**fields)
    except UsageError as exc:
        raise BadInputError(f"{what} adapter config: {exc.message}", CORRUPT) from None


# -- the method ----------------------------------------------------------------------------------

class LycorisMethod(MethodBase):
    """LoHa and LoKr: subclasses give ``parts``, ``initial`` and ``delta`` (see the module docstring)."""
    train_defaults = TrainDefaults(lr=1e-2, generative_lr=1e-3)  # benchmarks/README.md: "Training defaults"

    folds = True
    adapts_conv1d = False  # PEFT's layer takes nn.Linear only: a Conv1D target is refused
    label: str  # "LoHa", "LoKr": how errors name the type
    peft_type: str  # "LOHA", "LOKR"
    suffixes: tuple[str, ...]  # every φ part PEFT may save for a linear layer
    conv_parts: dict[str, str] = {}  # φ parts PEFT saves for convolutions only -> what they are
    own_keys: tuple[str, ...] = ()  # adapter_config.json keys of this type alone

    def parts(self, shape: tuple[int, int], rank: int, cfg: Any) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def initial(self, suffix: str, shape: tuple[int, int]) -> str:
        """"zeros" or "kaiming" (PEFT's kaiming_uniform_(a=√5): U(±1/√fan_in))."""
        raise NotImplementedError

    def delta(self, parts: dict) -> "torch.Tensor":
        raise NotImplementedError

    def fold_delta(self, parts: dict) -> "torch.Tensor":
        """``delta`` without autograd, as a tensor of its own that the fold may scale in place:
        the same values, with fewer whole-weight temporaries where the type can (LoHa)."""
        return self.delta(parts)

    def _targets(self, shapes, model_config, cfg) -> list[LinearModule]:
        from peftcli.methods.base import linear_only_targets

        return linear_only_targets(shapes, model_config, cfg, self.label)

    def _module_parts(self, m: LinearModule, cfg) -> tuple[dict[str, tuple[int, int]], float]:
        rank, alpha = rank_alpha(cfg, m.name)
        return self.parts(m.shape, rank, cfg), alpha / rank

    def budget(self, shapes, model_config, cfg) -> list[BudgetRow]:
        return [
            BudgetRow(m.name, m.shape, sum(math.prod(s) for s in self._module_parts(m, cfg)[0].values()))
            for m in self._targets(shapes, model_config, cfg)
        ]

    def init(self, ckpt, cfg, generator: "torch.Generator") -> dict:

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        draws, out = SeededDraws(generator), {}
        for m in self._targets(shapes, ckpt.config, cfg):
            for suffix, shape in self._module_parts(m, cfg)[0].items():
                if self.initial(suffix, shape) == "zeros":
                    out[peft_key(m.name, suffix)] = lazy_zeros(*shape)
                else:
                    out[peft_key(m.name, suffix)] = draws.draw(shape, _kaiming_uniform(shape))
        return out

    def adapter_config(self, ckpt, cfg) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "r": cfg.rank,
            "alpha": alpha,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "use_effective_conv2d": False,
            **self.own_config(cfg),
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules],
            "exclude_modules": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
            "inference_mode": False,
        }

    def own_config(self, cfg) -> dict:
        return {}

    def _selected(self, shapes, model_config, cfg):
        return selection(lambda: {m.name: m for m in self._targets(shapes, model_config, cfg)}, f"{self.label} adapter config", "was target_modules")

    def _group(self, tensors: dict) -> tuple[dict[str, dict], list[str]]:
        """Adapter tensors by module path; a convolution's part is refused naming what it is."""
        by_module: dict[str, dict] = {}
        problems: list[str] = []
        for key, t in tensors.items():
            suffix = key.rsplit(".", 1)[-1]
            if suffix in self.conv_parts:
                raise BadInputError(
                    f"{self.label} adapter has {key[len(PEFT_PREFIX):]}: {self.conv_parts[suffix]}, which peftcli does not fold",
                    "peftcli folds LyCORIS adapters of linear layers; merge this one with PEFT's merge_and_unload",
                )
            if not key.startswith(PEFT_PREFIX) or suffix not in self.suffixes:
                problems.append(f"unexpected key {key}")
                continue
            by_module.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
        return by_module, problems

    def _parts_problem(self, path: str, parts: dict, expected: dict) -> str | None:
        got = {s: list(t.shape) for s, t in parts.items()}
        want = {s: list(v) for s, v in expected.items()}
        if got != want:
            return f"{path}: {self.label} tensors {got} do not match {want}, the parts this config gives a layer of this shape"
        return None

    def _matched(self, tensors: dict, selected, unfit, find: Callable[[str], tuple[Any, str | None]], cfg) -> list:
        """(path, found, parts, scale) for each adapted module, after refusing every problem."""
        by_module, problems = self._group(tensors)
        out = []
        for path, parts in by_module.items():
            found, problem = find(path)
            if problem is None and selected is not None:
                m = selected[found[0]]
                expected, scale = self._module_parts(m, cfg)
                problem = self._parts_problem(path, parts, expected) or self._finite_problem(path, parts, scale)
            if problem:
                problems.append(problem)
            elif selected is not None:
                out.append((path, found, parts, scale))
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        return out

    def bound(self, parts: dict) -> float:
        """An upper bound of max |ΔW| before scaling, from the parts' largest entries."""
        raise NotImplementedError

    def _finite_problem(self, path: str, parts: dict, scale: float) -> str | None:
        """Why α/r·ΔW is not finite in float32, or None. The bound decides it in an adapter-sized
        pass; only a module whose bound passes float32's range is multiplied out (merge would
        otherwise write Inf or NaN weights; attach and merge check the same modules)."""
        import torch

        if not abs(scale) <= FP32_MAX:
            return f"{path}: the scale alpha/r = {scale:g} does not fit a float32"
        if abs(scale) * self.bound(parts) <= FP32_MAX / 2:
            return None  # False for NaN: multiplied out below, NaN is not finite
        if bool(torch.isfinite(self.delta({s: t.float() for s, t in parts.items()}) * scale).all()):
            return None
        return (f"{path}: the scaled update ΔW = (alpha/r)·{self.label} = {scale:g}·{self.label} is not finite in float32 "
                "(absurd alpha for these weights, or NaN/Inf in them)")

    # -- folding --------------------------------------------------------------------------------
    def deltas(self, cfg, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: α/r times the type's ``delta`` of the module's parts, [out, in]."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(shapes, ckpt.config, cfg)

        def find(path):
            name, problem = targeted_module(path, linear, selected, f"{self.label} tensors")
            return (name,), problem

        return {
            found[0] + ".weight": partial(_fold, parts=parts, scale=scale, delta=self.fold_delta)
            for path, found, parts, scale in self._matched(tensors, selected, unfit, find, cfg)
        }

    # -- module level -----------------------------------------------------------------------------
    def attach(self, model, cfg, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.lycoris.layer import LycorisLinear

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        selected, unfit = self._selected(shapes, model_config, cfg)  # as PEFT selects them: on the model's names

        def find(path):
            layer, dims, problem = mod.find_linear(model, path)
            real = mod.resolve(model, path) if problem is None else None
            if problem is None and selected is not None and real not in selected:
                problem = f"{path}: {self.label} tensors for a module the adapter config does not target"
            return (real, layer), problem

        phi = {}
        for path, (_real, layer), parts, scale in self._matched(tensors, selected, unfit, find, cfg):
            new = LycorisLinear(layer, {s: tuple(t.shape) for s, t in parts.items()}, self.delta, scale,
                                cfg.rank_dropout, cfg.module_dropout, self.rescales_rank_dropout(cfg))
            new.load_phi(parts)
            mod.replace(model, path, new)
            phi.update({peft_key(path, s): p for s, p in new.phi.items()})
        return Attached(phi=phi)

    def rescales_rank_dropout(self, cfg) -> bool:
        return True


def peak(t: "torch.Tensor") -> float:
    return float(t.abs().max())


def product_bound(parts: dict, a: str, b: str) -> float:
    """max |(A·B)_ij| ≤ inner · max|A| · max|B|."""
    return parts[a].shape[1] * peak(parts[a]) * peak(parts[b])


def _fold(stored: "torch.Tensor", *, parts: dict, scale: float, delta) -> "torch.Tensor":
    # In place: a 4096² weight's fold holds one fp32 copy of ΔW less (the bound on merge memory).
    return delta({s: t.float() for s, t in parts.items()}).mul_(scale)


def _kaiming_uniform(shape: tuple[int, int]) -> Callable[["torch.Generator"], "torch.Tensor"]:
    """A draw of U(−1/√fan_in, 1/√fan_in) of ``shape``, as PEFT initialises these factors."""
    import torch

    bound = 1.0 / math.sqrt(shape[1])
    return lambda g: torch.empty(shape).uniform_(-bound, bound, generator=g)
