"""LoRA (Hu et al., 2021): h = W₀x + (α/r)·B·A·x with A: [r, in], B: [out, r].

Variants: rsLoRA scales by α/√r; DoRA adds a magnitude vector of one entry per output
feature. On a d×k matrix LoRA adds r·(d + k) parameters (+ d for DoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import UsageError
from peftcli.methods.base import BudgetRow
from peftcli.options import option
from peftcli.targets import resolve_targets


@dataclass
class LoraConfig:
    rank: int = option(8, "-r", help="rank r of the update B·A (default 8)")
    alpha: float | None = option(
        None, help="scaling numerator α; default 2×rank (PEFT defaults to 8 whatever the rank)"
    )
    targets: str | None = option(
        None,
        metavar="NAMES|REGEX|all-linear",
        help="modules to adapt: comma-separated names (q_proj,v_proj), a regex over module paths, "
        "or all-linear; default: the query and value projections, as in the LoRA paper",
    )
    layers: str | None = option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")
    dora: bool = option(False, help="DoRA: also learn a magnitude per output feature")
    rslora: bool = option(False, help="rsLoRA: scale by α/√r instead of α/r")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UsageError(f"--rank must be positive, got {self.rank}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        elif self.alpha <= 0:
            raise UsageError(f"--alpha must be positive, got {self.alpha}")


class LoRA:
    name = "lora"
    config_cls = LoraConfig

    @staticmethod
    def added_params(shape: tuple[int, int], cfg: LoraConfig) -> int:
        out_features, in_features = shape
        return cfg.rank * (out_features + in_features) + (out_features if cfg.dora else 0)

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LoraConfig) -> list[BudgetRow]:
        rows = []
        for m in resolve_targets(shapes, model_config, cfg.targets, cfg.layers):
            if cfg.rank > min(m.shape):
                raise UsageError(
                    f"--rank {cfg.rank} is larger than min(out, in) = {min(m.shape)} of {m.name}",
                    "a rank above that adds parameters without adding expressiveness",
                )
            rows.append(BudgetRow(m.name, m.shape, self.added_params(m.shape, cfg)))
        return rows
