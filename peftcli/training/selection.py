"""Tensor level: choosing the K entries of a sparse fine-tuning after its full fine-tuning phase.

Compares the base θ⁽⁰⁾ with the phase-1 checkpoint θ⁽¹⁾ one tensor at a time (memory
O(largest tensor)) and selects the exact global top-K of a score with the same radix select
and tie order as ``peftcli diff`` (``peftcli.diffing.global_cuts``):

- ``magnitude``: |θ⁽¹⁾ − θ⁽⁰⁾|;
- ``movement``: θ⁽¹⁾² − θ⁽⁰⁾² where positive, else 0. Movement pruning (Sanh et al., 2020)
  scores a weight by S = −Σₜ (∂L/∂W)·W over training, i.e. (for SGD) Σₜ W·ΔW / lr: how far it
  moved *away from zero*. Σₜ W·ΔW sums to ∫W dW = (θ⁽¹⁾² − θ⁽⁰⁾²)/2 along any path, so the
  closed form needs no per-step accumulator (and no dense optimizer-sized buffer);
- ``random``: uniform scores from a seeded generator per tensor (the random-ticket control).

The phase-1 checkpoint is saved from the task model (``bert.encoder...`` where the base says
``encoder...``), so base names are matched to it by the model's prefix; its tensors with no
base counterpart are the new head.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from peftcli.checkpoint.reader import Checkpoint
from peftcli.errors import BadInputError


def counterparts(base_names, trained_names) -> dict[str, str]:
    """{base name: the trained checkpoint's name for it} (itself, or under/without one prefix)."""
    trained = set(trained_names)
    prefixes = {n.split(".", 1)[0] for n in trained if "." in n}
    out = {}
    for name in base_names:
        if name in trained:
            out[name] = name
            continue
        match = [f"{p}.{name}" for p in prefixes if f"{p}.{name}" in trained]
        if not match and "." in name and name.split(".", 1)[1] in trained:
            match = [name.split(".", 1)[1]]
        if len(match) == 1:
            out[name] = match[0]
    return out


@dataclass
class Selection:
    indices: dict[str, torch.Tensor]  # base tensor name -> sorted flat int64 indices (K in all)
    values: dict[str, torch.Tensor]  # base tensor name -> θ⁽¹⁾ − θ⁽⁰⁾ at those indices (fp32)
    head: dict[str, torch.Tensor]  # trained tensors with no base counterpart, by trained name

    @property
    def k(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())


class _Scores:
    """A score source for ``global_cuts``: ``phi(name)`` gives the flat score of a base tensor."""

    def __init__(self, base: Checkpoint, trained: Checkpoint, names: dict[str, str], select: str, seed: int):
        self.path = trained.path
        self.base, self.trained, self.names, self.select, self.seed = base, trained, names, select, seed

    def delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        theta0 = self.base.get(name).float().reshape(-1)
        theta1 = self.trained.get(self.names[name]).float().reshape(-1)
        if not bool(torch.isfinite(theta1).all()):
            raise BadInputError(
                f"{self.trained.path}: tensor {self.names[name]!r} is not finite after phase 1",
                "lower `phase1_lr` (training diverged)",
            )
        return theta0, theta1

    def phi(self, name: str) -> torch.Tensor:
        theta0, theta1 = self.delta(name)
        if self.select == "magnitude":
            return theta1 - theta0
        if self.select == "movement":
            return (theta1.square() - theta0.square()).clamp_min_(0.0)
        g = torch.Generator().manual_seed((zlib.crc32(name.encode()) << 16) ^ self.seed)
        return torch.rand(theta0.numel(), generator=g)


def select(base: Checkpoint, trained: Checkpoint, candidates: list[str], k: int, how: str, seed: int = 0, progress=None) -> Selection:
    """The K entries of ``candidates`` (base tensor names) to train, and θ⁽¹⁾ − θ⁽⁰⁾ there."""
    from peftcli.diffing import global_cuts

    # A base tensor the task model does not use (a causal LM's lm_head under a classifier) has
    # no phase-1 counterpart and cannot be chosen.
    names = counterparts(candidates, trained.tensors)
    present = [n for n in candidates if n in names]
    if k > sum(base.tensors[n].numel for n in present):
        raise BadInputError(f"K = {k:,} is more than the entries of the tensors this task trains", "lower `density` or `top_k`")
    scores = _Scores(base, trained, names, how, seed)
    infos = [base.tensors[n] for n in present]
    cuts = global_cuts(base, scores, infos, k, progress)
    indices, values = {}, {}
    for info, (cut, kept) in zip(infos, cuts):
        if kept == 0:
            continue
        bits = scores.phi(info.name).abs().to(torch.float32).view(torch.int32)
        idx = cut.keep(bits)
        theta0, theta1 = scores.delta(info.name)
        indices[info.name], values[info.name] = idx.to(torch.int64), (theta1 - theta0)[idx].clone()
    matched = set(counterparts(base.tensors, trained.tensors).values())
    head = {n: trained.get(n).float().clone() for n in sorted(trained.tensors) if n not in matched}
    return Selection(indices, values, head)
