"""Lottery tickets (Frankle & Carbin, 2019): iterative magnitude pruning with rewinding.

``inject lottery`` records the options; ``peftcli train`` runs the rounds
(``peftcli.training.lottery``): train, prune ``--prune-rate`` of the remaining prunable weights
with the smallest magnitude (``--select random``: at random, the random-ticket control),
rewind the survivors to their values at ``--rewind-step`` (0: the pretrained start), repeat.
``--rounds N`` prunes N times, so N + 1 trainings, the last one of the final ticket.

Prunable: the matrices (2-D weights) inside the numbered layers, as in the BERT lottery-ticket
studies (Chen et al., 2020); embeddings, norms, biases and a task head stay dense. The result
is a checkpoint, ``RUN/ticket/`` (θ ∘ m, loadable by ``transformers``), and the mask
``RUN/mask.safetensors`` (BOOL, keyed as the ticket's tensors) — not an adapter, so it is not
attached or merged: use the ticket as a model directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, MethodBase, ROUNDS, BudgetRow, TrainDefaults
from peftcli.methods.peftcli_section import SectionConfig
from peftcli.options import option
from peftcli.targets import layer_index

if TYPE_CHECKING:
    import torch

LOTTERY_SELECTIONS = ("magnitude", "random")


def prunable(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of the matrices inside numbered layers, sorted."""
    return sorted(n for n, s in shapes.items() if len(s) == 2 and n.endswith(".weight") and layer_index(n) is not None)


@dataclass
class LotteryConfig:
    rounds: int = option(5, help="pruning rounds (default 5): rounds + 1 trainings, the last of the final ticket")
    prune_rate: float = option(0.2, help="fraction of the remaining prunable weights pruned each round (default 0.2)")
    rewind_step: int = option(0, help="rewind survivors to their values after this many steps of round 0 (default 0: the start)")
    select: str = option("magnitude", metavar="magnitude|random", help="prune the smallest |θ| (default) or at random (control)")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"`rounds` must be at least 1, got {self.rounds}", "e.g. `rounds` 5")
        if not 0 < self.prune_rate < 1:
            raise UsageError(f"`prune_rate` must be in (0, 1), got {self.prune_rate}", "it is the fraction pruned per round: `prune_rate` 0.2 prunes 20%")
        if self.rewind_step < 0:
            raise UsageError(f"`rewind_step` must be non-negative, got {self.rewind_step}", "use 0 to rewind to the start, or a step of round 0")
        if self.select not in LOTTERY_SELECTIONS:
            raise UsageError(f"unknown `select` {self.select!r}", "choose magnitude or random")

    @property
    def final_density(self) -> float:
        return (1.0 - self.prune_rate) ** self.rounds


class Lottery(SectionConfig, MethodBase):
    name = "lottery"
    train_defaults = TrainDefaults(lr=1e-4, generative_lr=2e-5, head_lr=None)  # benchmarks/README.md: "Training defaults"
    trains_in_place = True
    schedule = ROUNDS  # peftcli train runs the rounds (peftcli.training.lottery); the result is a checkpoint
    config_cls = LotteryConfig
    summary = "Lottery tickets: iterative magnitude pruning with rewinding; the result is a sparse checkpoint."
    peft_type = None
    examples = (
        "peftcli inject lottery --rounds 5 --prune-rate 0.2 model/ -o runs/lth/",
        "peftcli train runs/lth/ --model model/ --data train.jsonl --eval dev.jsonl --phase1-steps 200",
        "peftcli inject lottery --rounds 3 --select random model/ -o runs/random-ticket/",
    )

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LotteryConfig) -> list[BudgetRow]:
        names = prunable(shapes)
        if not names:
            raise UsageError(
                "this checkpoint has no matrices inside numbered layers to prune",
                "lottery prunes the weights of a transformer's layers; pass a model with numbered layers (model.layers.N...)",
            )
        rows = [BudgetRow(n, tuple(shapes[n]), round(math.prod(shapes[n]) * cfg.final_density)) for n in names]
        return rows

    def init(self, ckpt, cfg: LotteryConfig, generator: "torch.Generator") -> dict:
        return {}

    def attach(self, model, cfg, tensors: dict, model_config: dict) -> Attached:
        raise BadInputError(
            "a lottery run is not an adapter: its result is the checkpoint RUN/ticket/",
            "train it with peftcli train RUN, then use RUN/ticket/ as a model directory",
        )
