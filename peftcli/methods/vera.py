"""VeRA (Kopiczko et al., 2024): one pair of frozen random projections shared by every adapted
layer, and two trained vectors per layer, ΔW = diag(λ_b)·B[:out, :r]·diag(λ_d)·A[:r, :in].

As PEFT's VeRA (peft_type VERA): ``base_model.vera_A`` [r, max in] and ``base_model.vera_B``
[max out, r] are the shared projections, sized by the largest input and output among the
targeted layers (each layer slices its own corner); ``base_model.model.<module>.vera_lambda_b``
[out] and ``vera_lambda_d`` [r] are φ. A layer adds out + r parameters; the projections are
stored (PEFT's ``save_projection=True``) but neither trained nor counted. As PEFT's init: the
projections are Kaiming-uniform draws (gain √2) from a generator seeded with
``projection_prng_key`` (0), A then B, so they equal PEFT's bit for bit; λ_b = 0 and λ_d =
``d_initial``, so ΔW = 0 before training. GPT-2's Conv1D is adapted as PEFT does (its ΔW is
stored transposed). An adapter without its projections (``save_projection=False``) is refused:
PEFT would regenerate them from its PRNG, which peftcli does not reproduce. The helpers that read
PEFT's common adapter-config fields (targets, layers, the keys that cannot change the math) are
shared with OFT (``peftcli.methods.oft``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from peftcli.checkpoint.model_config import is_json_number
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import (
    PEFT_PREFIX, Attached, BudgetRow, MethodBase, SeededDraws, TrainDefaults, lazy_full, lazy_zeros, mismatch_error, peft_key, selection,
    checkpoint_finder, model_finder,
)
from peftcli.options import option
from peftcli.patterns import from_file
from peftcli.targets import LinearModule, is_regex, linear_modules, resolve_targets

if TYPE_CHECKING:
    import torch

A_KEY, B_KEY = "base_model.vera_A", "base_model.vera_B"
SUFFIXES = ("vera_lambda_b", "vera_lambda_d")
CORRUPT = "the adapter config is corrupt or was edited by hand"
FP32_MAX = 3.4028234663852886e38
# Keys PEFT writes that cannot change ΔW nor φ's layout: bookkeeping, and the initialisation
# before training (init_weights). modules_to_save is read by every command (saved heads).
ACCEPTED = ("task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
            "modules_to_save", "init_weights", "peft_type", "target_modules", "layers_to_transform", "layers_pattern")
_VERA_KEYS = ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out", "bias")


def targets_option(default: str = "the query and value projections (PEFT's default)"):
    return option(
        None,
        metavar="NAMES|REGEX|all-linear",
        help="modules to adapt: comma-separated names (q_proj,v_proj), a regex over module paths, or all-linear; default: " + default,
    )


def layers_option():
    return option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")


def read_only(default: Any) -> Any:
    """A field read from an adapter, never an option, and not recorded in what inject writes."""
    return field(default=default, metadata={"recorded": False})


@dataclass
class VeraConfig:
    rank: int = option(256, "-r", help="rank r of the shared random projections (PEFT's default 256; VeRA wants more than LoRA)")
    targets: str | None = targets_option()
    layers: str | None = layers_option()
    d_initial: float = option(0.1, help="initial value of every λ_d entry (PEFT's default 0.1; the paper recommends ≤ 0.1)")
    dropout: float = option(0.0, help="dropout on each adapted layer's input to VeRA's branch while training (default 0)")
    # Read from a PEFT adapter, never an option: the seed PEFT draws the projections from.
    projection_prng_key: int = read_only(0)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise UsageError(f"`rank` must be a positive integer, got {self.rank}", "e.g. `rank` 256")
        if not math.isfinite(self.d_initial):
            raise UsageError(f"`d_initial` must be a finite number, got {self.d_initial}", "e.g. `d_initial` 0.1")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"`dropout` must be in [0, 1), got {self.dropout}", "e.g. `dropout` 0.0")


# -- reading PEFT's adapter_config.json (shared with OFT) --------------------------------------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def refuse_unknown(d: dict, what: str, known: tuple[str, ...]) -> None:
    """Refuse a key PEFT 0.21 does not write for this type (a newer PEFT's option may change the math)."""
    unknown = sorted(k for k in d if k not in set(ACCEPTED) | set(known))
    if unknown:
        raise BadInputError(
            f"{what} adapter config has {unknown[0]!r}, which peftcli does not understand",
            f"peftcli reads PEFT 0.21's {what} options; merge this adapter with PEFT's merge_and_unload",
        )
    if d.get("layers_pattern"):
        raise BadInputError(
            f"{what} adapter config uses layers_pattern {d['layers_pattern']!r}, which peftcli does not support",
            "peftcli reads the layer index from the module path: save the adapter with layers_pattern null",
        )
    if not isinstance(d.get("inference_mode", False), bool):
        raise BadInputError(f"{what} adapter config: inference_mode must be true or false", CORRUPT)


def target_fields(d: dict, what: str) -> dict:
    """``targets`` and ``layers`` from PEFT's target_modules and layers_to_transform."""
    targets = d.get("target_modules")
    if targets is not None and not (targets.strip() if isinstance(targets, str) else targets):
        raise BadInputError(
            f"{what} adapter config: 'target_modules' is empty, so the adapter targets no module",
            "list the adapted modules in target_modules (the keys' module paths)",
        )
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = ",".join(targets)  # PEFT's rule for a list is ours for names: exact path or dotted suffix
    elif isinstance(targets, str) and targets != "all-linear":
        # PEFT full-matches a string even without regex characters; (?:...) would break a leading (?i)
        targets = from_file(targets if is_regex(targets) else f"(?:{targets})", "adapter_config.json target_modules")
    elif targets is not None and targets != "all-linear":
        raise BadInputError(f"{what} adapter config: 'target_modules' must be a string or a list of strings", CORRUPT)
    layers = d.get("layers_to_transform")
    if not (layers is None or (is_int(layers) and layers >= 0) or (isinstance(layers, list) and all(is_int(x) and x >= 0 for x in layers))):
        raise BadInputError(f"{what} adapter config: 'layers_to_transform' must be a layer index or a list of them", CORRUPT)
    layers = ",".join(map(str, layers)) if isinstance(layers, list) else (str(layers) if layers is not None else None)
    return {"targets": targets, "layers": layers}


def build(cls: type, fields: dict, what: str):
    try:
        return cls(**fields)
    except UsageError as exc:
        raise BadInputError(f"{what} adapter config: {exc.message}", CORRUPT) from None


def _kaiming(shape: tuple[int, int]):
    """PEFT's VeRA ``_kaiming_init``: U(±√3·√2/√fan_in), fan_in = shape[1], drawn from the generator."""
    import torch

    def draw(g: "torch.Generator") -> "torch.Tensor":
        std = math.sqrt(2) / math.sqrt(shape[1])
        bound = math.sqrt(3.0) * std
        return torch.empty(shape).uniform_(-bound, bound, generator=g)

    return draw


# -- the method --------------------------------------------------------------------------------

class Vera(MethodBase):
    name = "vera"
    config_cls = VeraConfig
    summary = "Shared frozen random projections scaled by trained vectors, ΔW = diag(λ_b)·B·diag(λ_d)·A (VeRA)."
    peft_type = "VERA"
    folds = True
    train_defaults = TrainDefaults(lr=1e-1, generative_lr=1e-2)  # benchmarks/README.md: "Training defaults" (lm/sft: ÷10, not swept)
    examples = (
        "peftcli inject vera model/ -o runs/vera/",
        "peftcli inject vera --rank 64 --targets all-linear --d-initial 0.05 model/ -o runs/vera-all/",
    )

    def _targets(self, shapes, model_config, cfg: VeraConfig) -> list[LinearModule]:
        return resolve_targets(shapes, model_config, cfg.targets, cfg.layers)

    @staticmethod
    def projection_shapes(modules: list[LinearModule], rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(A, B) shapes: [r, largest in] and [largest out, r] over the targeted modules, as PEFT's ``_find_dim``."""
        return (rank, max(m.shape[1] for m in modules)), (max(m.shape[0] for m in modules), rank)

    def budget(self, shapes, model_config, cfg: VeraConfig) -> list[BudgetRow]:
        return [BudgetRow(m.name, m.shape, m.shape[0] + cfg.rank) for m in self._targets(shapes, model_config, cfg)]

    def derived_keys(self, cfg: VeraConfig) -> set[str]:
        """The shared projections: stored, never trained."""
        return {A_KEY, B_KEY}

    def init(self, ckpt, cfg: VeraConfig, generator: "torch.Generator") -> dict:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        a_shape, b_shape = self.projection_shapes(modules, cfg.rank)
        # PEFT's own generator, not inject's: the projections are those PEFT draws for this key.
        draws = SeededDraws(torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key))
        out = {A_KEY: draws.draw(a_shape, _kaiming(a_shape)), B_KEY: draws.draw(b_shape, _kaiming(b_shape))}
        for m in modules:
            out[peft_key(m.name, "vera_lambda_b")] = lazy_zeros(m.shape[0])
            out[peft_key(m.name, "vera_lambda_d")] = lazy_full((cfg.rank,), cfg.d_initial)
        return out

    def adapter_config(self, ckpt, cfg: VeraConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "r": cfg.rank,
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules],
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": True,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "fan_in_fan_out": any(m.transposed for m in modules),
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": False,
        }

    def config_from_adapter(self, d: dict) -> VeraConfig:
        what = "VeRA"
        refuse_unknown(d, what, _VERA_KEYS)
        if d.get("save_projection", True) is not True:
            raise BadInputError(
                "VeRA adapter config has save_projection false: its shared projections vera_A and vera_B are not stored",
                "PEFT regenerates them from its PRNG, which peftcli does not reproduce: save the adapter with save_projection=True",
            )
        if d.get("bias", "none") != "none":
            raise BadInputError(f"VeRA adapter config has bias {d.get('bias')!r}, which peftcli does not support",
                                "peftcli folds VeRA adapters saved with bias \"none\"; merge this one with PEFT's merge_and_unload")
        r, key = d.get("r", 256), d.get("projection_prng_key", 0)
        if not is_int(r) or r < 1:
            raise BadInputError(f"VeRA adapter config: 'r' must be a positive integer, not {r!r}", CORRUPT)
        if not is_int(key):
            raise BadInputError(f"VeRA adapter config: 'projection_prng_key' must be an integer, not {key!r}", CORRUPT)
        dropout, d_initial = d.get("vera_dropout", 0.0), d.get("d_initial", 0.1)
        if not is_json_number(dropout) or not 0 <= dropout < 1:
            raise BadInputError("VeRA adapter config: 'vera_dropout' must be a number in [0, 1)", CORRUPT)
        if not is_json_number(d_initial) or not isinstance(d.get("fan_in_fan_out", False), bool):
            raise BadInputError("VeRA adapter config: 'd_initial' must be a number and 'fan_in_fan_out' true or false", CORRUPT)
        # fan_in_fan_out is not read: PEFT sets it by the layer's type (Conv1D or nn.Linear), as here.
        return build(VeraConfig, {**target_fields(d, what), "rank": r, "d_initial": float(d_initial),
                                  "dropout": float(dropout), "projection_prng_key": key}, what)

    # -- reading an adapter's tensors ---------------------------------------------------------------
    def _matched(self, tensors: dict, selected: dict | None, unfit, find, cfg: VeraConfig):
        """(projections A and B, [(path, found, λ_b, λ_d)]) after refusing every problem."""
        problems: list[str] = []
        by_module: dict[str, dict] = {}
        for key, t in tensors.items():
            suffix = key.rsplit(".", 1)[-1]
            if key in (A_KEY, B_KEY):
                continue
            if not key.startswith(PEFT_PREFIX) or suffix not in SUFFIXES:
                problems.append(f"unexpected key {key}")
                continue
            by_module.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
        if A_KEY not in tensors or B_KEY not in tensors:
            raise BadInputError(
                f"VeRA adapter has no shared projections {A_KEY} and {B_KEY} (saved with save_projection false?)",
                "peftcli does not regenerate PEFT's PRNG projections: save the adapter with save_projection=True",
            )
        a, b = tensors[A_KEY], tensors[B_KEY]
        out = []
        for path, parts in by_module.items():
            found, problem = find(path)
            if problem is None and selected is not None:
                problem = self._parts_problem(path, parts, selected[found[0]], cfg.rank)
            if problem:
                problems.append(problem)
            elif selected is not None:
                out.append((path, found, parts["vera_lambda_b"], parts["vera_lambda_d"]))
        if selected is not None and not problems:
            want_a, want_b = self.projection_shapes(list(selected.values()), cfg.rank)
            for key, t, want in ((A_KEY, a, want_a), (B_KEY, b, want_b)):
                if tuple(t.shape) != want:
                    problems.append(f"{key} is {list(t.shape)}, not {list(want)}: r and the largest targeted layer give that")
            problems += [p for path, _, lb, ld in out if (p := _finite_problem(path, a, b, lb, ld))]
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        return a, b, out

    @staticmethod
    def _parts_problem(path: str, parts: dict, m: LinearModule, rank: int) -> str | None:
        got = {s: list(t.shape) for s, t in parts.items()}
        want = {"vera_lambda_b": [m.shape[0]], "vera_lambda_d": [rank]}
        return None if got == want else f"{path}: VeRA tensors {got} do not match {want}, what r = {rank} gives a layer of shape {list(m.shape)}"

    def _selected(self, shapes, model_config, cfg):
        return selection(lambda: {m.name: m for m in self._targets(shapes, model_config, cfg)}, "VeRA adapter config", "was target_modules")

    def deltas(self, cfg: VeraConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: (λ_b·B[:out]) @ (λ_d·A[:, :in]) as PEFT's get_delta_weight, stored orientation."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(shapes, ckpt.config, cfg)

        find = checkpoint_finder(linear, selected, "VeRA tensors")

        a, b, matched = self._matched(tensors, selected, unfit, find, cfg)
        return {
            found[0] + ".weight": partial(_fold, a=a, b=b, lambda_b=lb, lambda_d=ld, transposed=linear[found[0]].transposed)
            for path, found, lb, ld in matched
        }

    def attach(self, model, cfg: VeraConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.vera_layer import VeraLinear, VeraProjections

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        selected, unfit = self._selected(shapes, model_config, cfg)  # as PEFT selects them: on the model's names

        find = model_finder(model, selected, "VeRA tensors")

        a, b, matched = self._matched(tensors, selected, unfit, find, cfg)
        device = next(iter(model.parameters())).device
        projections = VeraProjections(a.float().to(device), b.float().to(device))
        phi = {}
        for path, (_real, layer), lb, ld in matched:
            new = VeraLinear(layer, projections, cfg.rank, cfg.dropout)
            new.load_phi(lb, ld)
            mod.replace(model, path, new)
            phi[peft_key(path, "vera_lambda_b")] = new.vera_lambda_b
            phi[peft_key(path, "vera_lambda_d")] = new.vera_lambda_d

        def export() -> dict:
            return {**phi, A_KEY: projections.vera_A, B_KEY: projections.vera_B}

        return Attached(phi=phi, export=export, derived=frozenset({A_KEY, B_KEY}))


def _finite_problem(path: str, a, b, lambda_b, lambda_d) -> str | None:
    """Why ΔW is not finite in float32, or None: a bound from the largest entries decides it in an
    adapter-sized pass; only a module whose bound passes float32's range is multiplied out."""
    import torch

    peak = lambda t: float(t.float().abs().max())  # noqa: E731
    if a.shape[0] * peak(a) * peak(b) * peak(lambda_b) * peak(lambda_d) <= FP32_MAX / 2:
        return None  # False for NaN: multiplied out below
    out, inp = lambda_b.shape[0], a.shape[1]
    if bool(torch.isfinite(_delta(a, b, lambda_b, lambda_d, out, inp)).all()):
        return None
    return f"{path}: the update ΔW = diag(λ_b)·B·diag(λ_d)·A is not finite in float32 (NaN/Inf or absurd values in the tensors)"


def _delta(a, b, lambda_b, lambda_d, out: int, inp: int) -> "torch.Tensor":
    """PEFT's get_delta_weight: (λ_b ⊙ B[:out, :]) @ (λ_d ⊙ A[:, :in]), in float32."""
    return (lambda_b.float().unsqueeze(-1) * b.float()[:out, :]) @ (lambda_d.float().unsqueeze(-1) * a.float()[:, :inp])


def _fold(stored: "torch.Tensor", *, a, b, lambda_b, lambda_d, transposed: bool) -> "torch.Tensor":
    out, inp = (stored.shape[1], stored.shape[0]) if transposed else tuple(stored.shape)
    delta = _delta(a, b, lambda_b, lambda_d, out, inp)
    return delta.T if transposed else delta
