"""SHiRA (Bhardwaj et al., 2024; PEFT's SHIRA), read and folded only: per adapted ``nn.Linear``
r·(in + out) trained entries ``base_model.model.<module>.shira_weight`` at the positions
``...shira_indices`` [2, r·(in + out)] (row, column; PEFT saves them, as integers, or as
float32 on Windows), and ΔW the sparse [out, in] matrix of those entries (PEFT's scale 1: no
config key sets another). Duplicate positions add, as in PEFT's sparse COO tensor.

Refused, naming the key: indices that are not whole numbers inside the layer, entries and
indices of other lengths, a module the config does not target or that misses either tensor, a
GPT-2 Conv1D target (PEFT's SHiRA adapts ``nn.Linear`` only), a ``mask_type`` other than
``random``, a config key PEFT 0.21 does not write.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError
from peftcli.methods.base import PEFT_PREFIX, lazy_zeros, peft_key, targeted_module
from peftcli.methods.read_fold.base import ReadFoldBase, checked_folds, positive_int, require_targets
from peftcli.methods.vera import FP32_MAX, refuse_unknown, target_fields
from peftcli.targets import linear_modules

if TYPE_CHECKING:
    import torch

WEIGHT, INDICES = "shira_weight", "shira_indices"
_KEYS = ("r", "mask_type", "random_seed", "fan_in_fan_out")


@dataclass(frozen=True)
class ShiraConfig:
    targets: str | None
    layers: str | None
    rank: int


class Shira(ReadFoldBase):
    name = "shira"
    config_cls = ShiraConfig
    summary = "Trained sparse entries of W at saved positions, r·(in + out) per layer (PEFT's SHIRA)."
    peft_type = "SHIRA"

    def config_from_adapter(self, d: dict) -> ShiraConfig:
        refuse_unknown(d, "SHIRA", _KEYS)
        if d.get("mask_type", "random") != "random":
            raise BadInputError(f"SHIRA adapter config has mask_type {d['mask_type']!r}, which peftcli does not read",
                                "peftcli folds SHiRA adapters of PEFT's random mask; merge this one with PEFT's merge_and_unload")
        require_targets(d, "SHIRA")
        return ShiraConfig(**target_fields(d, "SHIRA"), rank=positive_int(d, "SHIRA", "r", 32))

    def init(self, ckpt, cfg: ShiraConfig, generator: "torch.Generator") -> dict:
        """The tensors PEFT saves for this config on ``ckpt`` (shapes only matter: check compares them)."""
        selected, unfit = self._selected(ckpt, cfg)
        if unfit is not None:
            raise unfit
        out = {}
        for m in selected.values():
            n = cfg.rank * sum(m.shape)
            out[peft_key(m.name, WEIGHT)] = lazy_zeros(n)
            out[peft_key(m.name, INDICES)] = lazy_zeros(2, n)
        return out

    def deltas(self, cfg: ShiraConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: the entries at their positions (PEFT's get_delta_weight, densely)."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(ckpt, cfg)
        problems: list[str] = []
        parts: dict[str, dict] = {}
        for key, t in sorted(tensors.items()):
            suffix = key.rsplit(".", 1)[-1]
            if not key.startswith(PEFT_PREFIX) or suffix not in (WEIGHT, INDICES):
                problems.append(f"unexpected key {key}")
                continue
            parts.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
        out = {}
        for path, got in parts.items():
            name, problem = targeted_module(path, linear, selected, "SHiRA tensors")
            problem = problem or (_problem(path, got, cfg.rank, linear[name]) if name else None)
            if problem:
                problems.append(problem)
            elif name is not None:
                out[name + ".weight"] = partial(_fold, weight=got[WEIGHT], indices=got[INDICES].long())
        return checked_folds(out, problems, selected, unfit, 'SHiRA tensors')


def _problem(path: str, got: dict, rank: int, m) -> str | None:
    import torch

    if m.transposed:
        return f"{path}: a GPT-2 Conv1D layer, which PEFT's SHiRA does not adapt"
    if WEIGHT not in got or INDICES not in got:
        return f"{path}: {WEIGHT} and {INDICES} must both be present"
    w, idx = got[WEIGHT], got[INDICES]
    n = rank * sum(m.shape)
    if tuple(w.shape) != (n,) or tuple(idx.shape) != (2, n):
        return f"{path}: {WEIGHT} {list(w.shape)} / {INDICES} {list(idx.shape)} are not [{n}] / [2, {n}], what r = {rank} gives a {m.shape[0]}×{m.shape[1]} layer"
    if idx.is_floating_point() and not bool((idx == idx.round()).all()):
        return f"{path}.{INDICES}: positions that are not whole numbers"
    bounds = torch.tensor(m.shape).unsqueeze(1)
    if bool((idx < 0).any()) or bool((idx.long() >= bounds).any()):
        return f"{path}.{INDICES}: positions outside the {m.shape[0]}×{m.shape[1]} layer"
    if not float(w.float().abs().sum()) <= FP32_MAX / 2:
        return f"{path}.{WEIGHT}: ΔW is not finite in float32 (NaN/Inf or absurd values)"
    return None


def _fold(stored: "torch.Tensor", *, weight, indices) -> "torch.Tensor":
    """The [out, in] ΔW: ``weight`` at ``indices`` (row, column), duplicates added."""
    import torch

    delta = torch.zeros(tuple(stored.shape))
    return delta.index_put_((indices[0], indices[1]), weight.float(), accumulate=True)


__all__ = ["Shira"]
