"""HRA (Yuan et al., 2024, Householder reflection adaptation): each adapted linear layer's weight
is multiplied by a chain of r Householder reflections, W' = W·H, H = Π_i (I − 2·û_i·û_iᵀ) with
û_i = u_i/‖u_i‖ (PEFT's HRA, peft_type HRA).

φ is ``base_model.model.<module>.hra_u`` [in, r]. As PEFT's init for an even r: r/2 columns
Kaiming-uniform (U(±1/√(r/2))), each repeated (``repeat_interleave``), so consecutive
reflections cancel and H = I before training; an odd r (PEFT then draws every column and the
model does not start as the base) is refused by ``inject`` and read from an adapter. With
``apply_GS`` (read from an adapter) the columns are first made orthonormal by Gram-Schmidt, in
PEFT's order, and H = I − 2·U·Uᵀ. A layer adds in·r parameters. The fold is PEFT's merge,
W·H; refused by name: ``bias`` other than "none", a GPT-2 Conv1D target (PEFT's HRA adapts
``nn.Linear``), a reflection chain not finite in float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import (
    Attached,
    BudgetRow,
    LazyTensor,
    MethodBase,
    Replacement,
    SeededDraws,
    TrainDefaults,
    checkpoint_finder,
    matched_keys,
    model_finder,
    peft_key,
    linear_only_targets,
    selection,
)
from peftcli.methods.vera import CORRUPT, build, is_int, layers_option, read_only, refuse_unknown, target_fields, targets_option
from peftcli.options import option
from peftcli.targets import LinearModule, linear_modules

if TYPE_CHECKING:
    import torch

SUFFIX = "hra_u"
_HRA_KEYS = ("r", "apply_GS", "exclude_modules", "bias")


@dataclass
class HraConfig:
    rank: int = option(8, "-r", help="number r of Householder reflections per layer (PEFT's default 8); even, so that H = I at start")
    targets: str | None = targets_option("the query and value projections (PEFT's default); nn.Linear only (not GPT-2's Conv1D), as PEFT")
    layers: str | None = layers_option()
    # Read from a PEFT adapter, never options.
    apply_gs: bool = read_only(False)
    exclude: str | tuple[str, ...] | None = read_only(None)
    read: bool = read_only(False)  # from an adapter: an odd rank is PEFT's to have chosen

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise UsageError(f"`rank` must be a positive integer, got {self.rank}", "e.g. `rank` 8")
        if self.rank % 2 and not self.read:
            raise UsageError(f"HRA `rank` {self.rank} is odd: PEFT's init leaves the model the base only for an even rank",
                             "choose an even `rank`, e.g. 8")


class Hra(MethodBase):
    name = "hra"
    config_cls = HraConfig
    summary = "A chain of r Householder reflections multiplying each layer's weight, W' = W·Π(I − 2ûûᵀ) (HRA)."
    peft_type = "HRA"
    folds = True
    adapts_conv1d = False  # PEFT's layer takes nn.Linear only: a Conv1D target is refused
    train_defaults = TrainDefaults(lr=3e-2, generative_lr=3e-3)  # benchmarks/README.md: "Training defaults" (lm/sft: ÷10, not swept)
    examples = (
        "peftcli inject hra model/ -o runs/hra/",
        "peftcli inject hra --rank 4 --targets all-linear model/ -o runs/hra-all/",
    )

    def _targets(self, shapes, model_config, cfg: HraConfig) -> list[LinearModule]:
        modules = linear_only_targets(shapes, model_config, cfg, "HRA")
        return modules

    def budget(self, shapes, model_config, cfg: HraConfig) -> list[BudgetRow]:
        return [BudgetRow(m.name, m.shape, m.shape[1] * cfg.rank) for m in self._targets(shapes, model_config, cfg)]

    def init(self, ckpt, cfg: HraConfig, generator: "torch.Generator") -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        draws = SeededDraws(generator)
        return {peft_key(m.name, SUFFIX): _paired(draws, m.shape[1], cfg.rank) for m in self._targets(shapes, ckpt.config, cfg)}

    def adapter_config(self, ckpt, cfg: HraConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "r": cfg.rank,
            "apply_GS": cfg.apply_gs,
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules],
            "exclude_modules": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": False,
        }

    def config_from_adapter(self, d: dict) -> HraConfig:
        what = "HRA"
        refuse_unknown(d, what, _HRA_KEYS)
        if d.get("bias", "none") != "none":
            raise BadInputError(f"HRA adapter config has bias {d.get('bias')!r}, which peftcli does not support",
                                "peftcli folds HRA adapters saved with bias \"none\"; merge this one with PEFT's merge_and_unload")
        r, gs, exclude = d.get("r", 8), d.get("apply_GS", False), d.get("exclude_modules")
        if not is_int(r) or r < 1 or not isinstance(gs, bool):
            raise BadInputError("HRA adapter config: 'r' must be a positive integer and 'apply_GS' true or false", CORRUPT)
        if not (exclude is None or isinstance(exclude, str) or (isinstance(exclude, list) and all(isinstance(t, str) for t in exclude))):
            raise BadInputError("HRA adapter config: 'exclude_modules' must be a string or a list of strings", CORRUPT)
        return build(HraConfig, {**target_fields(d, what), "rank": r, "apply_gs": gs, "read": True,
                                 "exclude": (exclude if isinstance(exclude, str) else tuple(exclude)) if exclude else None}, what)

    # -- reading an adapter's tensors ---------------------------------------------------------------
    def _selected(self, shapes, model_config, cfg):
        return selection(lambda: {m.name: m for m in self._targets(shapes, model_config, cfg)}, "HRA adapter config", "was target_modules")

    def _matched(self, tensors: dict, selected, unfit, find, cfg: HraConfig) -> list:
        """(path, found, φ) per adapted module, after refusing every problem."""

        def check(path, found, t):
            want = [selected[found[0]].shape[1], cfg.rank]
            if list(t.shape) != want:
                return f"{path}: hra_u {list(t.shape)} does not match {want}, [in, r] for this layer and config", None
            if not bool(reflections(t, cfg.apply_gs).isfinite().all()):
                return f"{path}: the reflections built from hra_u are not finite in float32 (a zero column, NaN/Inf or absurd values)", None
            return None, (path, found, t)

        return matched_keys(tensors, SUFFIX, find, check, selected, unfit)

    def deltas(self, cfg: HraConfig, tensors: dict, ckpt) -> dict:
        """The merged weight itself, W·H as PEFT's merge computes it (a ``Replacement``)."""
        from functools import partial

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(shapes, ckpt.config, cfg)

        find = checkpoint_finder(linear, selected, "an hra_u")

        return {found[0] + ".weight": Replacement(partial(_reflected, u=u, gs=cfg.apply_gs, name=found[0]))
                for path, found, u in self._matched(tensors, selected, unfit, find, cfg)}

    def attach(self, model, cfg: HraConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.hra_layer import HraLinear

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        selected, unfit = self._selected(shapes, model_config, cfg)  # as PEFT selects them: on the model's names

        find = model_finder(model, selected, "an hra_u")

        phi = {}
        for path, (_real, layer), u in self._matched(tensors, selected, unfit, find, cfg):
            new = HraLinear(layer, cfg.rank, cfg.apply_gs)
            new.load_phi(u)
            mod.replace(model, path, new)
            phi[peft_key(path, SUFFIX)] = new.hra_u
        return Attached(phi=phi)


def _paired(draws: SeededDraws, inp: int, rank: int) -> LazyTensor:
    """PEFT's symmetric init: [in, r/2] Kaiming-uniform (a = √5: U(±1/√(r/2))), each column twice."""
    import torch

    if rank % 2:  # read from an adapter: PEFT draws every column (the shapes are what check compares)
        return draws.draw((inp, rank), lambda g: torch.empty(inp, rank).uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=g))
    half = (inp, rank // 2)
    bound = 1.0 / math.sqrt(half[1])
    return draws.draw((inp, rank), lambda g: torch.repeat_interleave(torch.empty(half).uniform_(-bound, bound, generator=g), 2, dim=1))


def reflections(u: "torch.Tensor", gs: bool) -> "torch.Tensor":
    """PEFT's ``get_delta_weight``: H [in, in], in PEFT's order of operations."""
    import torch

    rank, inp = u.shape[1], u.shape[0]
    if gs:
        cols = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (cols[j].t() @ ui) * cols[j]
            cols.append((ui / ui.norm()).view(-1, 1))
        w = torch.cat(cols, dim=1)
        return torch.eye(inp, device=u.device, dtype=u.dtype) - 2 * w @ w.t()
    unit = u / u.norm(dim=0)
    h = torch.eye(inp, device=u.device, dtype=u.dtype)
    for i in range(rank):
        ui = unit[:, i].view(-1, 1)
        h = h - 2 * h @ ui @ ui.t()
    return h


def _reflected(stored: "torch.Tensor", *, u, gs: bool, name: str) -> "torch.Tensor":
    """The merged weight W·H in float32, as PEFT's merge; refused if it is not finite."""
    import torch

    merged = torch.mm(stored.float(), reflections(u.float(), gs))
    if not bool(torch.isfinite(merged).all()):
        raise BadInputError(f"HRA: merging {name} gives weights that are not finite in float32",
                            "the adapter's reflections are absurd for these weights; check the adapter with peftcli check")
    return merged
