"""MiSS (Kang et al., 2025; PEFT's MISS, formerly Bone), read and folded only: per adapted
``nn.Linear`` one trained ``base_model.model.<module>.miss_block``, whose shape and fold depend on
``init_weights`` (PEFT's ``miss_fn``):

- ``true``/``false`` (MiSS): block [r, out], ΔW[o, c] = block[c mod r, o] (PEFT adds it to
  every r-column slice of W, the remainder slice too);
- ``"mini"``: block [r, mini_r], repeated along the outputs, ΔW[o, c] = block[c mod r, o mod mini_r];
- ``"bat"`` (Bone's block affine): block [out/r, r, r], ΔW = W_blocks·block + block per r×r block
  of W (a function of the base weight, as PEFT's get_delta_weight).

Refused, naming the key: ``exclude_modules``, ``bias`` other than ``"none"``, a config key PEFT
0.21 does not write, a block of another shape or missing, a module the config does not target,
a GPT-2 Conv1D target (PEFT's MiSS adapts ``nn.Linear`` only), a layer ``bat``/``mini`` cannot
divide, a ΔW that could leave float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError
from peftcli.methods.base import PEFT_PREFIX, lazy_zeros, peft_key, targeted_module
from peftcli.methods.read_fold.base import CORRUPT, ReadFoldBase, checked_folds, positive_int, refuse_options, require_targets
from peftcli.methods.vera import FP32_MAX, refuse_unknown, target_fields
from peftcli.targets import linear_modules

if TYPE_CHECKING:
    import torch

BLOCK = "miss_block"
_KEYS = ("r", "miss_dropout", "mini_r", "exclude_modules", "bias")


@dataclass(frozen=True)
class MissConfig:
    targets: str | None
    layers: str | None
    rank: int
    fn: str  # "miss", "bat" or "mini"
    mini_r: int

    def block_shape(self, out_f: int, in_f: int) -> tuple[int, ...]:
        return {"miss": (self.rank, out_f), "bat": (out_f // self.rank, self.rank, self.rank), "mini": (self.rank, self.mini_r)}[self.fn]


class Miss(ReadFoldBase):
    name = "miss"
    config_cls = MissConfig
    summary = "A trained block added to every r-column slice of W (or Bone's block affine) (PEFT's MISS)."
    peft_type = "MISS"

    def config_from_adapter(self, d: dict) -> MissConfig:
        refuse_unknown(d, "MISS", _KEYS)
        refuse_options(d, "MISS", "MiSS", {"exclude_modules": None, "bias": "none"})
        require_targets(d, "MISS")
        r, mini_r, init = positive_int(d, "MISS", "r", 64), positive_int(d, "MISS", "mini_r", 1), d.get("init_weights", True)
        if init not in (True, False, "bat", "mini"):
            raise BadInputError(f"MISS adapter config has init_weights {init!r}, which peftcli does not read",
                                "PEFT's MiSS writes true, false, \"bat\" or \"mini\"; " + CORRUPT)
        return MissConfig(**target_fields(d, "MISS"), rank=r, fn=init if isinstance(init, str) else "miss", mini_r=mini_r)

    def init(self, ckpt, cfg: MissConfig, generator: "torch.Generator") -> dict:
        """The blocks PEFT saves for this config on ``ckpt`` (shapes only matter: check compares them)."""
        selected, unfit = self._selected(ckpt, cfg)
        if unfit is not None:
            raise unfit
        return {peft_key(m.name, BLOCK): lazy_zeros(*cfg.block_shape(*m.shape)) for m in selected.values()}

    def deltas(self, cfg: MissConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight, as PEFT's merge changes it."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(ckpt, cfg)
        problems, out = [], {}
        for key, t in sorted(tensors.items()):
            if not key.startswith(PEFT_PREFIX) or not key.endswith("." + BLOCK):
                problems.append(f"unexpected key {key}")
                continue
            path = key[len(PEFT_PREFIX) : -len(BLOCK) - 1]
            name, problem = targeted_module(path, linear, selected, "a MiSS block")
            problem = problem or (_problem(key, t, cfg, linear[name]) if name else None)
            if problem:
                problems.append(problem)
            elif name is not None:
                out[name + ".weight"] = partial(_fold_bat if cfg.fn == "bat" else _fold_miss, block=t, cfg=cfg)
        return checked_folds(out, problems, selected, unfit, BLOCK)


def _problem(key: str, t, cfg: MissConfig, m) -> str | None:
    out_f, in_f = m.shape
    if m.transposed:
        return f"{key}: a GPT-2 Conv1D layer, which PEFT's MiSS does not adapt"
    if cfg.rank > in_f:
        return f"{key}: r = {cfg.rank} is more than the layer's {in_f} inputs"
    if cfg.fn == "bat" and (out_f % cfg.rank or in_f % cfg.rank):
        return f"{key}: init_weights \"bat\" needs r = {cfg.rank} to divide the {out_f}×{in_f} layer"
    if cfg.fn == "mini" and out_f % cfg.mini_r:
        return f"{key}: init_weights \"mini\" needs mini_r = {cfg.mini_r} to divide the layer's {out_f} outputs"
    want = cfg.block_shape(out_f, in_f)
    if tuple(t.shape) != want:
        return f"{key} is {list(t.shape)}, not {list(want)} (init_weights {cfg.fn}, r = {cfg.rank}, a {out_f}×{in_f} layer)"
    # MiSS and mini: ΔW's entries are the block's. Bat's also scale W's: checked when folded (_fold_bat).
    if not float(t.float().abs().max()) <= FP32_MAX / 2:
        return f"{key}: ΔW is not finite in float32 (NaN/Inf or absurd values)"
    return None


def _fold_miss(stored: "torch.Tensor", *, block, cfg: MissConfig) -> "torch.Tensor":
    """MiSS and mini: ΔW[o, c] = block[c mod r, o] (mini: block repeated along the outputs)."""
    out_f, in_f = stored.shape
    b = block.float()
    if cfg.fn == "mini":
        b = b.repeat(1, out_f // cfg.mini_r)
    reps = -(-in_f // cfg.rank)  # ⌈in / r⌉ slices, the last one cut to the remainder
    return b.T.repeat(1, reps)[:, :in_f]


def _fold_bat(stored: "torch.Tensor", *, block, cfg: MissConfig) -> "torch.Tensor":
    """Bone's block affine, PEFT's get_delta_weight: W_blocks·block + block per r×r block, in float32."""
    import torch

    w = stored.float()
    b = block.float()
    r = b.size(-1)
    blocks = w.reshape(w.size(0) // r, r, w.size(1) // r, r).permute(2, 0, 1, 3)
    delta = (blocks @ b + b).permute(1, 2, 0, 3).reshape(*w.shape)
    if not bool(torch.isfinite(delta).all()):
        raise BadInputError("a MiSS \"bat\" block makes ΔW = W_blocks·block + block not finite in float32 (absurd values in miss_block)",
                            "the adapter is corrupt: merge another one")
    return delta
