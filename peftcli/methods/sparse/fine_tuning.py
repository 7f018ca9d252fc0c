"""Sparse fine-tuning methods whose entries are chosen by training: LT-SFT and diff-pruning.

- **LT-SFT** (Ansell et al., 2022, "Composable Sparse Fine-Tuning"): phase 1 fully fine-tunes
  θ⁽⁰⁾ → θ⁽¹⁾; the K entries with the largest score (default |θ⁽¹⁾ − θ⁽⁰⁾|) are kept; every
  weight is reset to θ⁽⁰⁾; phase 2 fine-tunes only those K entries. φ = θ⁽²⁾ − θ⁽⁰⁾.
- **Diff-pruning** (Guo et al., 2021): phase 1 trains a dense φ on top of the frozen θ⁽⁰⁾
  (θ = θ⁽⁰⁾ + φ, optionally with an L1 penalty ``--l1`` pulling φ to 0; Guo et al. relax an
  L0 penalty, L1 is its convex stand-in), magnitude-prunes φ to K entries *keeping their
  values*, and (unless ``--no-retrain``) phase 2 fine-tunes the kept entries.

``inject`` writes the options and no tensors: which entries train is only known after phase
1, which ``peftcli train`` runs (``--phase1-steps``, ``--phase1-lr``; see
``peftcli.training.phased``). From then on the run is a sparse adapter (``phi``) that
attaches, merges and converts like any other, and training also writes ``RUN/phi.diff``.

Candidates: every floating-point tensor of the base (weights, biases, norms, embeddings),
ranked together, so K is exact and global; ``--dense REGEX`` takes tensors out of the
ranking to train them whole (stored with every index, and whole in ``phi.diff``). A new
classification head is not a candidate: it trains dense in both phases and is saved beside φ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

from peftcli import patterns
from peftcli.architectures import GPT2_MASK_BUFFERS
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, MethodBase, PHASES, BudgetRow, TrainDefaults
from peftcli.methods.peftcli_section import SectionConfig
from peftcli.methods.sparse import phi as sparse_phi
from peftcli.options import option

if TYPE_CHECKING:
    import torch

SELECTIONS = ("magnitude", "movement", "random")

# Stored buffers that are not parameters: integer position ids, GPT-2's causal-mask buffers.
_NOT_PARAMETERS = re.compile(rf"(position_ids|token_type_ids|{GPT2_MASK_BUFFERS})$")


def candidates(shapes: dict[str, tuple[int, ...]], dense: str | None = None) -> list[str]:
    """The base tensors whose entries compete for the K places, in sorted name order."""
    return sorted(n for n in shapes if not _NOT_PARAMETERS.search(n) and not is_dense(n, dense))


def dense_tensors(shapes: dict[str, tuple[int, ...]], dense: str | None) -> list[str]:
    """The base tensors ``--dense REGEX`` trains whole, outside the top-K, in sorted name order."""
    return sorted(n for n in shapes if not _NOT_PARAMETERS.search(n) and is_dense(n, dense))


def is_dense(name: str, dense: str | None) -> bool:
    return dense is not None and patterns.search(dense, name, "`dense`")


def _check_dense(cfg) -> None:
    if cfg.dense is not None:
        try:
            re.compile(cfg.dense)
        except re.error as exc:
            raise UsageError(
                f"`dense` {cfg.dense!r} is not a valid regular expression: {exc}",
                "`dense` takes a Python regex over tensor names, e.g. `dense` 'norm|bias'",
            ) from None


def k_for(cfg, n: int) -> int:
    if cfg.top_k is not None:
        if cfg.top_k > n:
            raise UsageError(f"`top_k` {cfg.top_k} is more than the {n:,} entries of the base", f"give at most {n}")
        return cfg.top_k
    # round half up, as peftcli diff counts K, and at least one entry
    return max(1, int((Decimal(repr(cfg.density)) * n).to_integral_value(ROUND_HALF_UP)))


def _check_size(cfg) -> None:
    if (cfg.density is None) == (cfg.top_k is None):
        raise UsageError("give exactly one of `density` or `top_k`", "e.g. `density` 0.01 keeps 1% of the entries")
    if cfg.density is not None and not 0 < cfg.density <= 1:
        raise UsageError(f"`density` must be in (0, 1], got {cfg.density}", "it is the fraction of entries kept: `density` 0.01 keeps 1%")
    if cfg.top_k is not None and cfg.top_k <= 0:
        raise UsageError(f"`top_k` must be positive, got {cfg.top_k}", "it is the number of entries kept, e.g. `top_k` 1000")
    if cfg.select not in SELECTIONS:
        raise UsageError(f"unknown `select` {cfg.select!r}", "choose " + ", ".join(SELECTIONS))
    _check_dense(cfg)


@dataclass
class LtSftConfig:
    density: float | None = option(None, metavar="D", help="keep the fraction D of all entries (e.g. 0.01)")
    top_k: int | None = option(None, metavar="K", help="keep exactly K entries instead of a fraction")
    select: str = option(
        "magnitude", metavar="magnitude|movement|random",
        help="rank entries by |θ1 − θ0| (default), by movement away from zero θ1² − θ0² (Sanh et al.), or at random",
    )
    dense: str | None = option(
        None, metavar="REGEX", help="base tensors to train whole, outside the top-K (searched in the name, e.g. 'norm|bias')"
    )

    def __post_init__(self) -> None:
        _check_size(self)


@dataclass
class DiffPruningConfig:
    density: float | None = option(None, metavar="D", help="keep the fraction D of all entries of φ (e.g. 0.005)")
    top_k: int | None = option(None, metavar="K", help="keep exactly K entries instead of a fraction")
    select: str = option("magnitude", metavar="magnitude|movement|random", help="rank entries of φ by |φ| (default), movement or at random")
    dense: str | None = option(
        None, metavar="REGEX", help="base tensors to train whole, outside the top-K (searched in the name, e.g. 'norm|bias')"
    )
    l1: float = option(0.0, help="L1 penalty λ·Σ|φ| (mean over entries × λ) added to the phase-1 loss (default 0)")
    no_retrain: bool = option(False, help="keep the pruned φ of phase 1 as it is: no phase 2 fine-tuning of the kept entries")

    def __post_init__(self) -> None:
        _check_size(self)
        if self.l1 < 0:
            raise UsageError(f"`l1` must be non-negative, got {self.l1}", "use 0 for no penalty, or a small λ such as `l1` 1e-4")


class SparseFineTuning(SectionConfig, MethodBase):
    """What LT-SFT and diff-pruning share: budget, layout, attaching and folding."""

    trains_in_place = True  # φ lives on base tensors: it adds no parameters to the model
    schedule = PHASES  # inject writes no φ; train's phase 1 picks the entries (peftcli.training.phased)
    folds = True
    peft_type = None
    resets_after_phase1: bool

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg) -> list[BudgetRow]:
        names = candidates(shapes, cfg.dense)
        if not names:
            raise UsageError(f"`dense` {cfg.dense!r} leaves no tensor to select entries from", "narrow the pattern")
        n = sum(math.prod(shapes[x]) for x in names)
        rows = [BudgetRow(f"global top-K of {len(names)} tensors (chosen after phase 1)", (n,), k_for(cfg, n))]
        return rows + [BudgetRow(x, tuple(shapes[x]), math.prod(shapes[x])) for x in dense_tensors(shapes, cfg.dense)]

    def init(self, ckpt, cfg, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        return {}  # nothing to train before phase 1 has chosen the entries

    def retrains(self, cfg) -> bool:
        """Phase 2 fine-tunes the K kept entries (diff-pruning --no-retrain keeps phase 1's)."""
        return True

    def phase1_l1(self, cfg) -> float:
        """λ of the L1 penalty on φ added to phase 1's loss (diff-pruning --l1); 0: none."""
        return 0.0

    def deltas(self, cfg, tensors: dict, ckpt) -> dict:
        self._require_selected(tensors)
        return sparse_phi.stored_deltas(tensors, ckpt)

    def attach(self, model, cfg, tensors: dict, model_config: dict) -> Attached:
        self._require_selected(tensors)
        return sparse_phi.attach_sparse(model, tensors)

    def _require_selected(self, tensors: dict) -> None:
        if not sparse_phi.is_selected(tensors):
            raise BadInputError(
                f"this {self.name} run has not been trained yet: its entries are chosen by training",
                "run `peftcli train RUN --data FILE` first",
            )


class LtSft(SparseFineTuning):
    name = "lt-sft"
    train_defaults = TrainDefaults(lr=3e-3, generative_lr=3e-4)  # benchmarks/README.md: "Training defaults"
    config_cls = LtSftConfig
    summary = "Lottery-ticket sparse fine-tuning: full FT, keep the top-K changes, reset, train only those K."
    resets_after_phase1 = True
    examples = (
        "peftcli inject lt-sft --density 0.01 model/ -o runs/ltsft/",
        "peftcli train runs/ltsft/ --model model/ --data train.jsonl --phase1-steps 300 --steps 300",
        "peftcli inject lt-sft --top-k 100000 --select movement model/ -o runs/ltsft-mv/",
    )


class DiffPruning(SparseFineTuning):
    name = "diff-pruning"
    train_defaults = TrainDefaults(lr=1e-4, generative_lr=2e-5)  # benchmarks/README.md: "Training defaults"
    config_cls = DiffPruningConfig
    summary = "Diff-pruning: train a dense φ on frozen θ (optional L1), magnitude-prune it to K entries, retrain them."
    resets_after_phase1 = False
    examples = (
        "peftcli inject diff-pruning --density 0.005 model/ -o runs/dp/",
        "peftcli train runs/dp/ --model model/ --data train.jsonl --phase1-steps 300 --steps 100",
        "peftcli inject diff-pruning --density 0.005 --l1 1e-4 --no-retrain model/ -o runs/dp-l1/",
    )

    def retrains(self, cfg) -> bool:
        return not cfg.no_retrain

    def phase1_l1(self, cfg) -> float:
        return cfg.l1
