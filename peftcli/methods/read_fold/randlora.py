"""RandLoRA (Albert et al., 2025; PEFT's RANDLORA), read and folded only: shared frozen random
bases ``base_model.randlora_A`` [r, 1, largest min(out, in)] and ``base_model.randlora_B``
[largest max(out, in), n, r] (saved: ``save_projection``), and per adapted linear layer (GPT-2's
Conv1D too) trained ``randlora_lambda`` [r, n_l] and ``randlora_gamma`` [n_l, min(out, in)],
n_l = ⌈min(out, in) / r⌉. ΔW is PEFT's ``get_delta_weight``: Â = (λ ⊗ A ⊙ γ) flattened
[r·n_l, min], B̂ = B[:max, :n_l] flattened [max, n_l·r], ΔW = (α/r)·(B̂·Â or its transpose
arrangement when out < in), in the same float32 operations as PEFT.

PEFT before 0.22 also saves each layer's view of the shared bases under the layer's name; they
must be the shared ones bit for bit (PEFT loads both into one buffer). PEFT 0.22 saves the
shared bases alone (the ``peft_version`` recorded says which layout to expect). Refused, by name: an adapter without
its bases (``save_projection`` false: PEFT regenerates them), ``bias`` other than ``"none"``,
``layers_pattern``, a config key PEFT 0.21 does not write, tensors of other shapes or missing,
a module the config does not target, a ΔW that could leave float32's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from peftcli.checkpoint.model_config import is_json_number
from peftcli.errors import BadInputError
from peftcli.methods.base import PEFT_PREFIX, lazy_zeros, peft_key, targeted_module
from peftcli.methods.rank_patterns import release
from peftcli.methods.read_fold.base import CORRUPT, ReadFoldBase, checked_folds, positive_int, refuse_options, require_targets
from peftcli.methods.vera import FP32_MAX, refuse_unknown, target_fields
from peftcli.targets import linear_modules

if TYPE_CHECKING:
    import torch

A_KEY, B_KEY = "base_model.randlora_A", "base_model.randlora_B"
TRAINED = ("randlora_lambda", "randlora_gamma")
VIEWS = ("randlora_A", "randlora_B")
_KEYS = ("r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "save_projection", "sparse", "very_sparse",
         "fan_in_fan_out", "bias")


@dataclass(frozen=True)
class RandLoraConfig:
    targets: str | None
    layers: str | None
    rank: int
    alpha: float
    views: bool = True  # each layer's copy of the shared bases saved too (PEFT before 0.22)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def bases(shape: tuple[int, int], rank: int) -> int:
    """PEFT's num_bases: ⌈min(out, in) / r⌉ (full rank)."""
    return math.ceil(min(shape) / rank)


class RandLora(ReadFoldBase):
    name = "randlora"
    config_cls = RandLoraConfig
    summary = "Shared frozen random bases scaled by trained λ and γ per layer (PEFT's RANDLORA)."
    peft_type = "RANDLORA"

    def config_from_adapter(self, d: dict) -> RandLoraConfig:
        refuse_unknown(d, "RANDLORA", _KEYS)
        if d.get("save_projection", True) is not True:
            raise BadInputError("RANDLORA adapter config has save_projection false: its bases randlora_A and randlora_B are not stored",
                                "PEFT regenerates them from its PRNG, which peftcli does not reproduce: save the adapter with save_projection=True")
        refuse_options(d, "RANDLORA", "RandLoRA", {"bias": "none"})
        require_targets(d, "RANDLORA")
        r, alpha = positive_int(d, "RANDLORA", "r", 32), d.get("randlora_alpha", 640)
        if not is_json_number(alpha) or not abs(alpha) <= FP32_MAX:
            raise BadInputError(f"RANDLORA adapter config: 'randlora_alpha' must be a finite number, not {alpha!r}", CORRUPT)
        version = release(d.get("peft_version"))
        if version is False:
            raise BadInputError(f"RANDLORA adapter config: 'peft_version' {d.get('peft_version')!r} is not a version", CORRUPT)
        # Without a version: PEFT from before it recorded one, long before 0.22.
        views = version is None or version < (0, 22)
        return RandLoraConfig(**target_fields(d, "RANDLORA"), rank=r, alpha=float(alpha), views=views)

    @staticmethod
    def _base_shapes(modules, r: int) -> tuple[tuple, tuple]:
        """(A, B) shapes PEFT makes for these layers: [r, 1, largest min], [largest max, n, r]."""
        out_f, in_f = max(m.shape[0] for m in modules), max(m.shape[1] for m in modules)
        return (r, 1, min(out_f, in_f)), (max(out_f, in_f), math.ceil(min(out_f, in_f) / r), r)

    def init(self, ckpt, cfg: RandLoraConfig, generator: "torch.Generator") -> dict:
        """The tensors PEFT saves for this config on ``ckpt`` (shapes only matter: check compares them)."""
        selected, unfit = self._selected(ckpt, cfg)
        if unfit is not None:
            raise unfit
        a, b = self._base_shapes(list(selected.values()), cfg.rank)
        out = {A_KEY: lazy_zeros(*a), B_KEY: lazy_zeros(*b)}
        for m in selected.values():
            n = bases(m.shape, cfg.rank)
            out[peft_key(m.name, "randlora_lambda")] = lazy_zeros(cfg.rank, n)
            out[peft_key(m.name, "randlora_gamma")] = lazy_zeros(n, min(m.shape))
            if cfg.views:
                out[peft_key(m.name, "randlora_A")], out[peft_key(m.name, "randlora_B")] = lazy_zeros(*a), lazy_zeros(*b)
        return out

    def deltas(self, cfg: RandLoraConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: PEFT's get_delta_weight, in the stored orientation."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(ckpt, cfg)
        if A_KEY not in tensors or B_KEY not in tensors:
            raise BadInputError(f"RANDLORA adapter has no shared bases {A_KEY} and {B_KEY} (saved with save_projection false?)",
                                "peftcli does not regenerate PEFT's PRNG bases: save the adapter with save_projection=True")
        a, b = tensors[A_KEY], tensors[B_KEY]
        problems: list[str] = []
        parts: dict[str, dict] = {}
        for key, t in sorted(tensors.items()):
            suffix = key.rsplit(".", 1)[-1]
            if key in (A_KEY, B_KEY):
                continue
            if not key.startswith(PEFT_PREFIX) or suffix not in TRAINED + VIEWS:
                problems.append(f"unexpected key {key}")
            else:
                parts.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
        if selected is not None and not problems:
            want_a, want_b = self._base_shapes(list(selected.values()), cfg.rank)
            for key, t, want in ((A_KEY, a, want_a), (B_KEY, b, want_b)):
                if tuple(t.shape) != want:
                    problems.append(f"{key} is {list(t.shape)}, not {list(want)}: r and the largest targeted layer give that")
        out = {}
        for path, got in parts.items():
            name, problem = targeted_module(path, linear, selected, "RandLoRA tensors")
            problem = problem or (_problem(path, got, a, b, cfg, linear[name].shape) if name and not problems else None)
            if problem:
                problems.append(problem)
            elif name is not None:
                out[name + ".weight"] = partial(_fold, a=a, b=b, lam=got["randlora_lambda"], gamma=got["randlora_gamma"],
                                                scaling=cfg.scaling, transposed=linear[name].transposed)
        return checked_folds(out, problems, selected, unfit, 'RandLoRA tensors')


def _problem(path: str, got: dict, a, b, cfg: RandLoraConfig, shape: tuple[int, int]) -> str | None:
    import torch

    expected = TRAINED + VIEWS if cfg.views else TRAINED
    if any(s not in got for s in expected) or (not cfg.views and any(s in got for s in VIEWS)):
        return f"{path}: {', '.join(expected)} must be present" + ("" if cfg.views else ", and no copy of the shared bases (PEFT 0.22 saves none)")
    for suffix, shared in (("randlora_A", a), ("randlora_B", b)):
        if cfg.views and (got[suffix].shape != shared.shape or not torch.equal(got[suffix], shared)):
            return f"{path}.{suffix}: this layer's copy of the shared base differs from base_model.{suffix}"
    n = bases(shape, cfg.rank)
    want = {"randlora_lambda": (cfg.rank, n), "randlora_gamma": (n, min(shape))}
    if any(tuple(got[s].shape) != w for s, w in want.items()):
        have = {s: list(got[s].shape) for s in TRAINED}
        return f"{path}: RandLoRA tensors {have} do not match {{'randlora_lambda': [{cfg.rank}, {n}], 'randlora_gamma': [{n}, {min(shape)}]}}"
    peak = lambda t: float(t.float().abs().max())  # noqa: E731
    if not abs(cfg.scaling) * cfg.rank * n * peak(a) * peak(b) * peak(got["randlora_lambda"]) * peak(got["randlora_gamma"]) <= FP32_MAX / 2:
        return f"{path}: ΔW is not finite in float32 (NaN/Inf or absurd values in the tensors)"
    return None


def _fold(stored: "torch.Tensor", *, a, b, lam, gamma, scaling: float, transposed: bool) -> "torch.Tensor":
    """PEFT's get_scaled_bases and get_delta_weight, step for step, in float32."""
    out_f, in_f = (stored.shape[1], stored.shape[0]) if transposed else tuple(stored.shape)
    lo, hi = min(out_f, in_f), max(out_f, in_f)
    n = lam.shape[1]
    update_b = b.float()[:hi, :n, :].flatten(start_dim=1)
    update_a = (lam.float()[:, :, None] * a.float()[:, :n, :lo] * gamma.float()[None,]).flatten(end_dim=1)
    first, second = (update_a, update_b) if lo == in_f else (update_b.T, update_a.T)
    delta = (first.T @ second.T).T * scaling  # [out, in]
    return delta.T if transposed else delta
