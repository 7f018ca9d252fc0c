"""The small interface every method implements, and the parameter budget it reports.

A method has a config dataclass (its options, declared once with ``peftcli.options.option``)
and computes, from tensor shapes alone, which modules it touches and how many trainable
parameters it adds there. ``inspect --budget`` and ``inject`` both call ``budget`` so the
numbers they print cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BudgetRow:
    module: str
    shape: tuple[int, ...]  # the base tensor's logical shape ([out, in] for linear layers)
    params: int  # trainable parameters the method adds for this module


@dataclass(frozen=True)
class Budget:
    method: str
    rows: list[BudgetRow]
    base_params: int  # every parameter of the base checkpoint

    @property
    def trainable(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def pct_of_base(self) -> float:
        """Trainable parameters as a % of the base's parameters."""
        return 100.0 * self.trainable / self.base_params if self.base_params else 0.0

    @property
    def pct_of_total(self) -> float:
        """As a % of base + added: the convention of PEFT's ``print_trainable_parameters``."""
        total = self.base_params + self.trainable
        return 100.0 * self.trainable / total if total else 0.0

    @property
    def reduction_pct(self) -> float:
        """How much smaller the trainable set is than full fine-tuning of the base."""
        return 100.0 - self.pct_of_base

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "targets": [{"module": r.module, "shape": list(r.shape), "params": r.params} for r in self.rows],
            "trainable_params": self.trainable,
            "base_params": self.base_params,
            "pct_of_base": self.pct_of_base,
            "pct_of_total": self.pct_of_total,
            "reduction_pct": self.reduction_pct,
        }


class Method(Protocol):
    name: str
    config_cls: type

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: object) -> list[BudgetRow]:
        """The modules ``cfg`` selects in a base with these tensor ``shapes``, and what it adds to each."""
        ...
