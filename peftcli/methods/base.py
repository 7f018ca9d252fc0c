"""The small interface every method implements, and the parameter budget it reports.

A method is one module in ``peftcli/methods/`` defining a config dataclass (its options,
declared once with ``peftcli.options.option``) and a class with:

- ``budget(shapes, model_config, cfg)``: tensor level, from shapes alone — which modules it
  touches and the trainable parameters it adds there (``inspect --budget`` and ``inject``
  both print this, so the numbers cannot disagree);
- ``init(ckpt, cfg, generator)``: tensor level — the initial φ, keyed as in
  ``adapter_model.safetensors``; their sizes add up to the budget;
- ``adapter_config(ckpt, cfg)`` / ``config_from_adapter(json)``: the ``adapter_config.json``
  it writes and reads back (PEFT's fields where PEFT has the method);
- ``attach(model, cfg, tensors, model_config)``: module level — put φ into a
  ``transformers`` model in place and return the φ parameters (and, for input composition,
  a transform of the forward's keyword arguments).

Methods whose φ folds into the weights also have ``deltas(cfg, tensors, ckpt)``: for each
base tensor they change, a function from that tensor (as stored) to its fp32 ΔW — what
``peftcli merge`` adds. Prompt, prefix and bottleneck adapters have none: they add
computation that no weight change reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from peftcli.checkpoint.reader import Checkpoint

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors


def peft_key(module: str, suffix: str) -> str:
    return f"{PEFT_PREFIX}{module}.{suffix}"


def base_module(path: str, modules) -> str | None:
    """The checkpoint module an adapter key's path names: itself, or without the head model's
    base prefix (a BertModel checkpoint's ``encoder...`` is ``bert.encoder...`` under a head)."""
    if path in modules:
        return path
    head, _, rest = path.partition(".")
    return rest if rest in modules else None


def mismatch_error(problems: list[str]) -> "BadInputError":
    from peftcli.errors import BadInputError

    return BadInputError(
        f"adapter does not match the base model: {len(problems)} problem(s): " + "; ".join(problems[:5])
        + (" ..." if len(problems) > 5 else ""),
        "was it made for another base model?",
    )


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
    in_place: bool = False  # the method trains existing tensors (BitFit, layers) instead of adding some

    @classmethod
    def of(cls, method: "Method", ckpt: "Checkpoint", cfg: Any) -> "Budget":
        """The budget of ``method`` with options ``cfg`` on checkpoint ``ckpt`` (inspect and inject both use this)."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        rows = method.budget(shapes, ckpt.config, cfg)
        return cls(method.name, rows, ckpt.num_params, bool(getattr(method, "trains_in_place", False)))

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
        total = self.base_params + (0 if self.in_place else self.trainable)
        return 100.0 * self.trainable / total if total else 0.0

    @property
    def reduction_pct(self) -> float:
        """How much smaller the trainable set is than full fine-tuning of the base."""
        return 100.0 - self.pct_of_base

    @property
    def reduction_pct_of_total(self) -> float:
        """The reduction in PEFT's convention: 100 − ``pct_of_total``."""
        return 100.0 - self.pct_of_total

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "in_place": self.in_place,
            "targets": [{"module": r.module, "shape": list(r.shape), "params": r.params} for r in self.rows],
            "trainable_params": self.trainable,
            "base_params": self.base_params,
            "pct_of_base": self.pct_of_base,
            "pct_of_total": self.pct_of_total,
            "reduction_pct": self.reduction_pct,
            "reduction_pct_of_total": self.reduction_pct_of_total,
        }


@dataclass
class Attached:
    """What ``attach`` put into a model: φ as live parameters, keyed as in the artifact."""

    phi: dict[str, "torch.nn.Parameter"]
    # For input composition (prompt, prefix): rewrites the forward's keyword arguments.
    input_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # For methods whose φ is a difference from base parameters trained in place (BitFit,
    # layers): returns φ in the artifact's layout. Default: the ``phi`` parameters themselves.
    export: Callable[[], dict[str, "torch.Tensor"]] | None = None
    # Artifact keys attach consumed that are recomputed from φ on save rather than trained
    # (prefix tuning's projected prefix): neither trainable nor counted.
    derived: frozenset[str] = frozenset()
    extras: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    name: str
    config_cls: type
    summary: str  # one line, shown by `peftcli inject --help`
    peft_type: str | None  # PEFT's peft_type when PEFT has the method, else None

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: Any) -> list[BudgetRow]: ...

    def init(self, ckpt: "Checkpoint", cfg: Any, generator: "torch.Generator") -> dict[str, "torch.Tensor"]: ...

    def adapter_config(self, ckpt: "Checkpoint", cfg: Any) -> dict: ...

    def config_from_adapter(self, adapter_config: dict) -> Any: ...

    def attach(self, model: "torch.nn.Module", cfg: Any, tensors: dict[str, "torch.Tensor"], model_config: dict) -> Attached: ...
