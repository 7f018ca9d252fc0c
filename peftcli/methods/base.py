"""The small interface every method implements, and the parameter budget it reports.

A method is one module in ``peftcli/methods/`` (a family of several files is a folder there:
``lora/``, ``ia3/``, ``adapter/``, ``prompting/``, ``sparse/``) defining a config dataclass (its
options, declared once with ``peftcli.options.option``) and a class with:

- ``budget(shapes, model_config, cfg)``: tensor level, from shapes alone — which modules it
  touches and the trainable parameters it adds there (``inspect --budget`` and ``inject``
  both print this, so the numbers cannot disagree);
- ``init(ckpt, cfg, generator)``: tensor level — the initial φ, keyed as in
  ``adapter_model.safetensors``; their sizes add up to the budget. A value may be a
  ``LazyTensor`` (shape and dtype now, values when written), so that ``inject`` holds one φ
  tensor at a time, never the whole φ: ``lazy_zeros``/``lazy_ones`` for constants,
  ``SeededDraws`` for random ones (the values of the eager loop, made in any order);
- ``adapter_config(ckpt, cfg)`` / ``config_from_adapter(json)``: the ``adapter_config.json``
  it writes and reads back (PEFT's fields where PEFT has the method);
- ``attach(model, cfg, tensors, model_config)``: module level — put φ into a
  ``transformers`` model in place and return the φ parameters (and, for input composition,
  a transform of the forward's keyword arguments).

Every method class inherits ``MethodBase``, which declares its optional capabilities with
their defaults, so a method's whole contract reads in one place and no caller probes with
``hasattr``:

- ``folds``: φ folds into the weights, and the method has ``deltas(cfg, tensors, ckpt)``: for
  each base tensor it changes, a function from that tensor (as stored) to its fp32 ΔW — what
  ``peftcli merge`` adds. Prompt, prefix and bottleneck adapters do not fold: they add
  computation that no weight change reproduces;
- ``schedule``: how ``peftcli train`` runs it — ``one-pass`` (one training of the φ that
  ``inject`` wrote), ``phases`` (LT-SFT, diff-pruning: training chooses the entries, then
  trains them; ``inject`` writes no φ) or ``rounds`` (lottery: prune-and-rewind rounds whose
  result is a checkpoint, not an adapter);
- ``trains_in_place``: trains existing tensors (adds no parameters to the model);
- ``identity_at_init``: the φ ``inject`` writes leaves the model's outputs those of the base
  (a zero ΔW, a zero-initialised up projection); prompt and prefix tuning add tokens;
- ``derived_keys(cfg)``: artifact keys recomputed from φ rather than trained;
- ``examples``: command lines shown by ``peftcli inject METHOD --help``;
- ``train_defaults``: the ``TrainDefaults`` ``peftcli train`` uses for what the user leaves
  out (learning rates, warmup, schedule), chosen by measurement (benchmarks/README.md);
- ``read_only``: a PEFT type peftcli reads and folds but never injects, attaches or trains
  (``peftcli.methods.read_fold``; registered in ``READ_FOLD``, not ``METHODS``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from peftcli.errors import BadInputError, UsageError

if TYPE_CHECKING:
    import torch

    from peftcli.checkpoint.reader import Checkpoint
    from peftcli.errors import BadInputError

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


def selection(select: Callable[[], Any], config: str, edited: str) -> tuple[Any, BadInputError | None]:
    """``select()``, the modules an adapter ``config`` selects on a base; or None and why it
    selects none, to raise after the per-key problems (which say more of another base)."""
    try:
        return select(), None
    except UsageError as exc:
        return None, BadInputError(
            f"the {config} selects no valid set of modules on this base: {exc.message}",
            f"was it made for another base model? Or {edited} edited?",
        )


def targeted_module(path: str, modules, targeted, what: str) -> tuple[str | None, str | None]:
    """The base module an adapter key's ``path`` names (``base_module``) if the adapter config
    targets it (``targeted``: None when unknown), else None and the problem (``what``: the key)."""
    name = base_module(path, modules)
    if name is None:
        return None, f"{path}: no such linear module in the base"
    if targeted is not None and name not in targeted:
        return None, f"{path}: {what} for a module the adapter config does not target"
    return name, None


def linear_only_targets(shapes: dict, model_config: dict | None, cfg, label: str) -> list:
    """The nn.Linear modules ``cfg`` (``targets``, ``layers``, ``exclude``) selects for a method
    PEFT applies to nn.Linear only (LoHa, LoKr, OFT, BOFT, HRA: ``label``, ``adapts_conv1d``
    False): a GPT-2 Conv1D among them is refused naming the method."""
    from peftcli.targets import excluded, resolve_targets

    modules = resolve_targets(shapes, model_config, cfg.targets, cfg.layers)
    if cfg.exclude:
        modules = [m for m in modules if not excluded(m.name, cfg.exclude)]
        if not modules:
            raise UsageError("exclude_modules removes every module target_modules selects", "fix exclude_modules in adapter_config.json")
    conv1d = next((m for m in modules if m.transposed), None)
    if conv1d is not None:
        raise UsageError(f"{conv1d.name} is a transformers Conv1D (GPT-2 style), which PEFT's {label} does not adapt",
                         f"{label} applies to nn.Linear layers; use lora, ia3 or vera on this model")
    return modules


def checkpoint_finder(linear: dict, selected, what: str) -> Callable:
    """``find(path)`` for a fold over a checkpoint: (the targeted linear module's name,), or
    the problem (``targeted_module``'s, ``what`` naming the method's tensors)."""

    def find(path):
        name, problem = targeted_module(path, linear, selected, what)
        return (name,), problem

    return find


def model_finder(model, selected, what: str) -> Callable:
    """``find(path)`` for an attach: (the module's real path, its linear layer), or the
    problem (no such linear layer, or one the adapter config does not target)."""
    from peftcli import modules as mod

    def find(path):
        layer, dims, problem = mod.find_linear(model, path)
        real = mod.resolve(model, path) if problem is None else None
        if problem is None and selected is not None and real not in selected:
            problem = f"{path}: {what} for a module the adapter config does not target"
        return (real, layer), problem

    return find


class Replacement:
    """A delta that is really new values: ``Replacement(values)(stored)`` is the change
    values − stored (for sums of task vectors), and ``values(stored)`` the new tensor itself,
    which a merge of this input alone with weight 1 writes as it is: θ₀ + (t − θ₀) in floating
    point is not t bit for bit, and PEFT's merge_and_unload writes t (a saved module, new rows)."""

    def __init__(self, values: Callable[[Any], Any]):
        self.values = values

    def __call__(self, stored):
        from peftcli.checkpoint.dtypes import work_dtype

        work = work_dtype(stored.dtype)
        return self.values(stored).to(work) - stored.to(work)


def matched_keys(tensors: dict, suffix: str, find: Callable, check: Callable, selected, unfit, unexpected: Callable = lambda key: "") -> list:
    """The adapter's tensors ``PEFT_PREFIX + path + "." + suffix`` matched to their modules:
    ``find(path)`` → (found, problem), then, where the config's targets are known,
    ``check(path, found, tensor)`` → (problem, item). Every problem is raised at once, then the
    config's own unfitness (``unfit``); else the items. ``unexpected(key)``: what to add to
    the message of a key of another kind."""
    problems, out = [], []
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith("." + suffix):
            problems.append(f"unexpected key {key}" + unexpected(key))
            continue
        path = key[len(PEFT_PREFIX) : -len(suffix) - 1]
        found, problem = find(path)
        if problem is None and selected is not None:
            problem, item = check(path, found, t)
            if problem is None:
                out.append(item)
        if problem:
            problems.append(problem)
    if problems:
        raise mismatch_error(problems)
    if unfit is not None:
        raise unfit
    return out


def mismatch_error(problems: list[str]) -> BadInputError:
    return BadInputError(
        f"adapter does not match the base model: {len(problems)} problem(s): " + "; ".join(problems[:5])
        + (" ..." if len(problems) > 5 else ""),
        "was it made for another base model?",
    )


class LazyTensor:
    """A φ tensor not made yet: ``shape``, ``dtype`` and ``numel()`` cost nothing, ``make()``
    creates its values (a new tensor each call, which the caller frees once written)."""

    __slots__ = ("shape", "dtype", "_make")

    def __init__(self, shape, dtype: "torch.dtype", make: Callable[[], "torch.Tensor"]):
        import torch

        self.shape = torch.Size(int(d) for d in shape)
        self.dtype = dtype
        self._make = make

    def numel(self) -> int:
        return math.prod(self.shape)

    def make(self) -> "torch.Tensor":
        t = self._make()
        if t.shape != self.shape or t.dtype != self.dtype:  # the header was written from shape and dtype
            raise AssertionError(f"lazy tensor made {t.dtype}{list(t.shape)}, promised {self.dtype}{list(self.shape)}")
        return t

    def __repr__(self) -> str:
        return f"LazyTensor({list(self.shape)}, {self.dtype})"


def lazy_full(shape, value: float, dtype: "torch.dtype | None" = None) -> LazyTensor:
    """``torch.full(shape, value)`` (fp32 by default), made when written."""
    import torch

    dtype = dtype or torch.float32
    shape = tuple(int(d) for d in shape)
    return LazyTensor(shape, dtype, lambda: torch.full(shape, value, dtype=dtype))


def _shape(args: tuple) -> tuple:
    """``(2, 3)`` or ``((2, 3),)`` -> ``(2, 3)``, as torch.zeros takes either."""
    return tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else args


def lazy_zeros(*shape) -> LazyTensor:
    """``torch.zeros(*shape)`` (fp32), made when written."""
    return lazy_full(_shape(shape), 0.0)


def lazy_ones(*shape) -> LazyTensor:
    """``torch.ones(*shape)`` (fp32), made when written."""
    return lazy_full(_shape(shape), 1.0)


class SeededDraws:
    """Random tensors drawn one after another from one generator, each made when written.

    ``draw(shape, fn)`` registers the next draw, ``fn(generator) -> tensor``; its values are
    those of the eager loop calling every ``fn`` in turn on ``generator``, whatever order the
    tensors are made in: the draws are made in order from ``generator`` (remembering the
    state before each, a few KB), and a draw made again, or after a later one, is redrawn
    from its remembered state. ``generator`` advances only as draws are made.
    """

    def __init__(self, generator: "torch.Generator"):
        self._generator = generator
        self._draws: list[Callable[["torch.Generator"], "torch.Tensor"]] = []
        self._states: list = []  # generator state before draw i, for the draws made so far

    def draw(self, shape, fn: Callable[["torch.Generator"], "torch.Tensor"], dtype: "torch.dtype | None" = None) -> LazyTensor:
        import torch

        i = len(self._draws)
        self._draws.append(fn)
        return LazyTensor(shape, dtype or torch.float32, lambda: self._make(i))

    def _make(self, i: int) -> "torch.Tensor":
        import torch

        while len(self._states) <= i:  # the draws before i were never made: make (and drop) them in order
            j = len(self._states)
            self._states.append(self._generator.get_state())
            t = self._draws[j](self._generator)
            if j == i:
                return t
            del t
        g = torch.Generator()
        g.set_state(self._states[i])
        return self._draws[i](g)


def materialize(tensor: "torch.Tensor | LazyTensor") -> "torch.Tensor":
    """A φ value as a tensor (a ``LazyTensor`` is made now)."""
    return tensor.make() if isinstance(tensor, LazyTensor) else tensor


def materialized(tensors: Mapping[str, "torch.Tensor | LazyTensor"]) -> dict[str, "torch.Tensor"]:
    """Every φ value as a tensor, all in memory at once (small φ, tests)."""
    return {k: materialize(v) for k, v in tensors.items()}



@dataclass(frozen=True)
class TrainDefaults:
    """What ``peftcli train`` uses for a method when the command line leaves it out.

    ``lr``: peak learning rate of φ for classification; ``generative_lr``: for ``lm``/``sft``
    (a decoder's whole vocabulary is the output: a φ that suits a 2-way head can be too
    eager there), None for the same as ``lr``; ``head_lr``: a new classification head's
    (hundreds of fresh parameters that must move far, where φ nudges pretrained ones), None
    for ``lr``;
    ``warmup_ratio``: the share of the run's steps the learning rate warms up over;
    ``schedule``: its decay after warmup. The full fine-tuning of a method that trains in
    phases or rounds (LT-SFT, diff-pruning, lottery) takes full fine-tuning's."""

    lr: float
    generative_lr: float | None = None
    head_lr: float | None = 2e-3
    warmup_ratio: float = 0.06
    schedule: str = "linear"

    def lr_for(self, task: str) -> float:
        return self.generative_lr if task in ("lm", "sft") and self.generative_lr is not None else self.lr

    def describe(self) -> str:
        """One line for people: ``lr 0.006 (lm/sft 0.001), head 0.002, warmup 6% of the steps, linear decay``."""
        text = f"lr {self.lr:g}" + (f" (lm/sft {self.generative_lr:g})" if self.generative_lr is not None else "")
        text += f", head {self.head_lr:g}" if self.head_lr is not None else ", head at lr"
        return text + f", warmup {self.warmup_ratio:.0%} of the steps, {self.schedule} decay"


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
    train_defaults: TrainDefaults | None = None  # what `peftcli train` will use where its flags are left out

    @classmethod
    def of(cls, method: "Method", ckpt: "Checkpoint", cfg: Any) -> "Budget":
        """The budget of ``method`` with options ``cfg`` on checkpoint ``ckpt`` (inspect and inject both use this)."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        rows = method.budget(shapes, ckpt.config, cfg)
        return cls(method.name, rows, ckpt.num_params, method.trains_in_place, method.train_defaults)

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
            **({"train_defaults": dataclasses.asdict(self.train_defaults)} if self.train_defaults is not None else {}),
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


ONE_PASS, PHASES, ROUNDS = "one-pass", "phases", "rounds"  # a method's training ``schedule``
SCHEDULES = (ONE_PASS, PHASES, ROUNDS)


class MethodBase:
    """The optional capabilities every method declares, with their defaults (see the module docstring)."""

    folds: bool = False  # has ``deltas``: φ is a weight change that ``merge`` and ``convert`` fold
    schedule: str = ONE_PASS  # ONE_PASS | PHASES | ROUNDS
    trains_in_place: bool = False  # trains existing tensors: adds no parameters to the model
    identity_at_init: bool = True  # the injected φ leaves the base's outputs unchanged
    adapts_conv1d: bool = True  # adapts GPT-2's Conv1D layers (PEFT's LyCORIS, OFT, BOFT and HRA take nn.Linear only)
    examples: tuple[str, ...] = ()  # shown by `peftcli inject METHOD --help`
    train_defaults: TrainDefaults = TrainDefaults(lr=1e-3)  # each method declares its own
    read_only: bool = False  # read and folded only (READ_FOLD): inject, attach and train refuse it

    def derived_keys(self, cfg: Any) -> set[str]:
        """Artifact keys recomputed from φ on save rather than trained (none by default)."""
        return set()

    def deltas(self, cfg: Any, tensors: dict, ckpt: "Checkpoint") -> dict:
        raise AssertionError(f"{type(self).__name__} does not fold (folds is False): callers check method.folds first")


class Method(Protocol):
    # Read-only members: a method sets them as class attributes of narrower types
    # (type[LoraConfig], a 3-tuple, None), which a settable protocol attribute would refuse.
    @property
    def name(self) -> str: ...
    @property
    def config_cls(self) -> type: ...
    @property
    def summary(self) -> str: ...  # one line, shown by `peftcli inject --help`
    @property
    def peft_type(self) -> str | None: ...  # PEFT's peft_type when PEFT has the method, else None
    @property
    def folds(self) -> bool: ...
    @property
    def schedule(self) -> str: ...
    @property
    def trains_in_place(self) -> bool: ...
    @property
    def identity_at_init(self) -> bool: ...
    @property
    def examples(self) -> tuple[str, ...]: ...
    @property
    def train_defaults(self) -> TrainDefaults: ...
    @property
    def read_only(self) -> bool: ...

    def derived_keys(self, cfg: Any) -> set[str]: ...

    def deltas(self, cfg: Any, tensors: dict, ckpt: "Checkpoint") -> dict: ...

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: Any) -> list[BudgetRow]: ...

    def init(self, ckpt: "Checkpoint", cfg: Any, generator: "torch.Generator") -> dict[str, "torch.Tensor | LazyTensor"]: ...

    def adapter_config(self, ckpt: "Checkpoint", cfg: Any) -> dict: ...

    def config_from_adapter(self, adapter_config: dict) -> Any: ...

    def attach(self, model: "torch.nn.Module", cfg: Any, tensors: dict[str, "torch.Tensor"], model_config: dict) -> Attached: ...
