"""Pre-flight validation: do adapter directories and sparse diffs fit a base checkpoint?

Nothing is built or written, and problems are collected, not raised: the report lists every
problem of every artifact (an artifact that cannot be read has that one problem).

- The base: opened and validated by the reader (headers, shard index). ``config.json``'s
  ``vocab_size`` must equal the rows of the input embedding (and of an ``lm_head``): a resized
  vocabulary saved without its config is the usual cause of shape mismatches. With
  ``scan_base``, every floating-point tensor is scanned for NaN/Inf (it reads the whole base,
  one tensor at a time).
- An adapter directory: read (``read_adapter``); its method found from ``adapter_config.json``
  and the method's config built from it; then the method's own tensor-level ``init`` (the code
  ``inject`` uses; the seed does not change shapes) is re-run on the base, and the keys and
  shapes it creates are compared with the adapter's: missing keys, unexpected keys, shapes
  that differ (a rank that differs from the config's ``r`` is named as such). A key may name
  its module through one wrapper component more or less than the base does (a classifier
  trained on ``BertForSequenceClassification`` writes ``bert.encoder...`` for ``encoder...``), as
  attaching accepts. An adapter that holds only a method's derived tensors (PEFT saves prefix
  tuning's projected prefix without the MLP) is complete. ``modules_to_save`` heads (keys
  ``base_model.model.<head>.*``) are allowed extras, reported as heads and compared in shape
  with the base tensor of that name when the base has one. Every tensor must be floating-point
  and free of NaN/Inf.
- A ``.diff``: read and validated (the header, and every index list as the tensors are read),
  its fingerprint compared with the base's tensor names, dtypes and shapes (one problem, its
  details listing every difference), with ``content``
  also its content hash with the base's bytes, and every stored value free of NaN/Inf.
- A fine-tuned checkpoint (a model directory without ``adapter_config.json``), as ``merge`` takes
  one: the same tensor names, dtypes and shapes as the base (its values are not read); or the
  base's architecture with a task head (a classifier, ``peftcli.heads``): its body the base's
  tensors under the head model's names, its head that model's. A mismatch says which differs.
  A diff's task head is validated with the rest of the diff and scanned for NaN/Inf too.

When everything fits, the report says what ``merge`` of these inputs with ``method`` would do:
tensors changed, bytes read, hashed and written, peak memory and time
(``peftcli.merging.estimate``); or why it would refuse (a method that does not fold).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from peftcli.artifacts.adapter_dir import replaced_modules
from peftcli.artifacts.sparse_diff import FLOAT_DTYPES, IDX, VAL, read_diff
from peftcli.checkpoint.fingerprint import content_hash, summarize_differences, table_differences, tensor_table
from peftcli.checkpoint.reader import ADAPTER_WEIGHTS, Checkpoint, open_checkpoint
from peftcli.errors import BadInputError, PeftcliError, UsageError
from peftcli.merging.estimate import Input, MergeEstimate, estimate
from peftcli.training.memory import TrainMemory, TrainMemoryOptions
from peftcli.merging.methods import REGISTRY as MERGE_REGISTRY
from peftcli.merging.methods import get_merge_method
from peftcli.merging.options import MERGE_DTYPES
from peftcli.methods.base import ONE_PASS, PEFT_PREFIX
from peftcli.options import check_declared, option

if TYPE_CHECKING:
    import torch

_EMBEDDING = re.compile(r"(embed|^wte$|^emb)", re.IGNORECASE)
_NOT_WORDS = re.compile(r"(pos|type|^wpe$)", re.IGNORECASE)  # position and token-type embeddings
_WORDS = re.compile(r"(word|tok|^wte$)", re.IGNORECASE)
OTHER_BASE = "was it made for another base model?"
DIVERGED = "the values are not usable: take an earlier checkpoint, or retrain (e.g. with a lower learning rate)"


def resized_vocab_hint(theirs: int, ours: int) -> str:
    return (
        f"a vocabulary of {theirs} tokens against the base's {ours}: a resized vocabulary is the usual "
        "cause of shape mismatches; resize the base's embeddings to match"
    )


@dataclass(frozen=True)
class Problem:
    message: str
    hint: str | None = None

    @classmethod
    def of(cls, exc: PeftcliError, path: str, prefix: str = "") -> "Problem":
        """The problem an error describes; the line names ``path`` already, so the message need not."""
        message = exc.message
        if message.startswith(path + ": "):
            message = message[len(path) + 2 :]
        return cls(prefix + message, exc.hint)

    def to_json(self) -> dict:
        return {"message": self.message, "hint": self.hint}


@dataclass
class Result:
    """What check found for one input: the base, an adapter directory or a diff."""

    path: str
    kind: str  # "base" | "adapter" | "diff"
    problems: list[Problem] = field(default_factory=list)
    method: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    merge_input: Input | None = field(default=None, repr=False)  # what merging it would touch
    refusal: str | None = None  # why merge would refuse it although it fits (a method that does not fold)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "ok": self.ok,
            "method": self.method,
            **self.details,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(frozen=True)
class CheckReport:
    base: Result
    artifacts: list[Result]
    merge: MergeEstimate | None = None  # what merge would do, when everything fits
    merge_refusal: str | None = None  # or why it would refuse
    train_memory: dict[str, TrainMemory] | None = None  # with `train`: each run's predicted training memory

    @property
    def failed(self) -> list[Result]:
        return [a for a in self.artifacts if not a.ok]

    @property
    def ok(self) -> bool:
        return self.base.ok and not self.failed

    def failure(self) -> str:
        """What failed, in one line: the error ``peftcli check`` exits with."""
        n, failed = len(self.artifacts), len(self.failed)
        if self.base.ok:
            return f"{failed} of {count_artifacts(n)} {'does' if failed == 1 else 'do'} not fit {self.base.path}"
        text = f"the base {self.base.path} fails its checks"
        return text + (f", and {failed} of {count_artifacts(n)} {'does' if failed == 1 else 'do'} not fit it" if failed else "")

    def to_json(self) -> dict:
        return {
            "schema": "peftcli.check/1",
            "ok": self.ok,
            "base": self.base.to_json(),
            "artifacts": [a.to_json() for a in self.artifacts],
            "failed": len(self.failed),
            "total": len(self.artifacts),
            "merge": self.merge.to_json() if self.merge else None,
            "merge_refusal": self.merge_refusal,
            "train_memory": {k: v.to_json() for k, v in self.train_memory.items()} if self.train_memory is not None else None,
        }


@dataclass
class CheckOptions(TrainMemoryOptions):
    """The options of ``peftcli check`` (and of a recipe's check step); with ``train``, the
    options of the training run whose memory is predicted (``peftcli.training.memory``)."""

    content: bool = option(False, help="Also compare each diff's content hash with the base's bytes.")
    scan_base: bool = option(False, help="Also scan every base tensor for NaN/Inf (reads the whole base).")
    allow_pickle: bool = option(False, help="Allow a PyTorch .bin/.pt base (torch.load(weights_only=True)).")
    method: str = option(
        "linear", help="The merge to estimate (as peftcli merge --method).", choices=tuple(MERGE_REGISTRY), show_default=True
    )
    dtype: str | None = option(None, help="The merge's output dtype to estimate (as peftcli merge --dtype).", choices=MERGE_DTYPES)
    train: bool = option(False, help="Also predict the peak memory of training each RUN (peftcli train's options below).")

    def __post_init__(self) -> None:
        TrainMemoryOptions.__post_init__(self)
        if not self.train and self.changed():
            raise UsageError(f"`{self.changed()[0]}` applies to the training-memory prediction", "add `train`, or drop it")
        get_merge_method(self.method)  # an unknown one names the closest
        if self.dtype is not None and self.dtype not in MERGE_DTYPES:
            raise UsageError(f"unknown `dtype` {self.dtype!r}", "choose F32, BF16, F16 or F64")
        check_declared(self)


def count_artifacts(n: int) -> str:
    """``1 artifact``, ``2 artifacts``."""
    return f"{n} artifact" if n == 1 else f"{n} artifacts"


def check(base: str, artifacts: Iterable[str], opts: CheckOptions | None = None, **keywords) -> CheckReport:
    """Check ``base`` and whether each adapter directory, ``.diff`` or fine-tuned checkpoint fits it.

    ``opts`` (or its fields as ``keywords``: ``content=``, ``scan_base=``, ``allow_pickle=``,
    ``method=``, ``dtype=``); ``method`` and ``dtype`` are those of the merge to estimate
    (``peftcli merge --method/--dtype``).
    """
    if opts is None:
        opts = CheckOptions(**keywords)
    elif keywords:
        raise TypeError(f"check() takes options or keywords, not both: {sorted(keywords)}")
    content, scan_base, method, dtype = opts.content, opts.scan_base, opts.method, opts.dtype
    with open_checkpoint(base, allow_pickle=opts.allow_pickle) as ckpt:
        base_result = check_base(ckpt, scan_base)
        vocab = base_result.details.get("embedding_rows")
        results = [_check_one(path, ckpt, vocab, content) for path in artifacts]
        report = CheckReport(base_result, results)
        if report.ok and results:
            refusal = next((r.refusal for r in results if r.refusal), None)
            if refusal is None:  # what merge --method says of the number of inputs
                count = get_merge_method(method).count_problem(len(results))
                refusal = f"{count.message} ({count.hint})" if count is not None else None
            if refusal:
                report = CheckReport(base_result, results, merge_refusal=refusal)
            else:
                report = CheckReport(base_result, results, estimate(ckpt, [r.merge_input for r in results], method, dtype))
    if opts.train:
        report = dataclasses.replace(report, train_memory=_train_memory(base, list(artifacts), report, opts))
    return report


def _train_memory(base: str, artifacts: list[str], report: CheckReport, opts: CheckOptions) -> dict[str, TrainMemory]:
    """Each adapter run's predicted training memory (when every artifact fits the base)."""
    from peftcli.training.memory import predict

    runs = [p for p in artifacts if os.path.isfile(os.path.join(p, "adapter_config.json"))]
    if not runs:
        raise UsageError("`train` predicts the memory of training an adapter: give its RUN", "e.g. `peftcli check base/ runs/lora/ --train`")
    if not report.ok:
        return {}
    return {run: predict(base, run, opts) for run in runs}


def _check_one(path: str, ckpt: Checkpoint, vocab: int | None, content: bool) -> Result:
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")) and _has_weights(path):
        return check_checkpoint(path, ckpt)
    return check_adapter(path, ckpt, vocab) if os.path.isdir(path) else check_diff(path, ckpt, content)


def _has_weights(path: str) -> bool:
    from peftcli.checkpoint.reader import PICKLE_INDEX, PICKLE_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

    names = (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, PICKLE_INDEX, *PICKLE_SINGLE)
    return any(os.path.isfile(os.path.join(path, n)) for n in names) and not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS))


# -- the base ----------------------------------------------------------------------------------


def check_base(ckpt: Checkpoint, scan: bool) -> Result:
    result = Result(ckpt.path, "base", details={"tensors": len(ckpt.tensors), "params": ckpt.num_params})
    try:
        config = ckpt.config
    except PeftcliError as exc:
        result.problems.append(Problem.of(exc, ckpt.path))
        config = None
    vocab = (config or {}).get("vocab_size")
    embedding = input_embedding(ckpt)
    result.details.update(
        vocab_size=vocab,
        embedding=embedding,
        embedding_rows=ckpt.tensors[embedding].shape[0] if embedding else None,
    )
    if isinstance(vocab, int) and embedding:
        heads = [
            n for n in sorted(ckpt.tensors)
            if (n == "lm_head.weight" or n.endswith(".lm_head.weight")) and len(ckpt.tensors[n].shape) == 2
        ]
        for role, name in [("input embedding", embedding)] + [("output head", n) for n in heads]:
            rows = ckpt.tensors[name].shape[0]
            if rows != vocab:
                result.problems.append(
                    Problem(
                        f"config.json says vocab_size={vocab}, but the {role} {name} has {rows} rows",
                        "a resized vocabulary is the usual cause of shape mismatches: "
                        "save config.json with the embedding's vocab_size, or resize the embeddings",
                    )
                )
    if scan:
        for name in sorted(ckpt.tensors):
            if ckpt.tensors[name].dtype in SCANNED:
                try:
                    problem = nonfinite(name, ckpt.get(name), "the base checkpoint is damaged: use a good copy")
                except PeftcliError as exc:  # a dtype this torch cannot read
                    problem = Problem.of(exc, ckpt.path)
                if problem:
                    result.problems.append(problem)
    return result


def input_embedding(ckpt: Checkpoint) -> str | None:
    """The word embedding's tensor name ([vocab, hidden]), without trusting config.json's vocab_size."""
    found = []
    for name in sorted(ckpt.tensors):
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        last = module.rsplit(".", 1)[-1] if module else ""
        if module and len(ckpt.tensors[name].shape) == 2 and _EMBEDDING.search(last) and not _NOT_WORDS.search(last):
            found.append((not _WORDS.search(last), name))
    return min(found)[1] if found else None


# The dtypes that can hold NaN or Inf: floats, FP8 included. Integers and bool cannot, nor can
# F4 and F6 (the MX formats have no such encodings, and torch cannot read them).
SCANNED = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0")
SCAN_CHUNK = 1 << 20  # FP8 elements upcast at a time


def nonfinite(name: str, t: "torch.Tensor", hint: str) -> Problem | None:
    """A problem naming how many NaN and Inf values ``t`` holds (any dtype), or None."""
    import torch

    if not t.is_floating_point():  # integers and bool are always finite
        return None
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    else:  # FP8: torch has no isinf for every kind; an exact upcast, a chunk at a time
        nan = inf = 0
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), SCAN_CHUNK):
            part = flat[start : start + SCAN_CHUNK].float()
            nan, inf = nan + int(torch.isnan(part).sum()), inf + int(torch.isinf(part).sum())
    if not nan and not inf:
        return None
    counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    return Problem(f"{name}: {counts} among its {t.numel()} values", hint)


# -- adapters ----------------------------------------------------------------------------------


def check_adapter(path: str, ckpt: Checkpoint, vocab: int | None = None) -> Result:
    import torch

    from peftcli.artifacts.adapter_dir import read_adapter
    from peftcli.methods import method_for_adapter_config

    result = Result(path, "adapter")
    try:
        adapter = read_adapter(path)
    except PeftcliError as exc:
        result.problems.append(Problem.of(exc, path))
        return result
    result.details["tensors"] = len(adapter.tensors)
    values = _value_problems(adapter.tensors)  # read_adapter already refused non-float weights
    try:
        method = method_for_adapter_config(adapter.config, path)
        result.method = method.name
        cfg = method.config_from_adapter(adapter.config)
    except PeftcliError as exc:
        result.problems += [Problem.of(exc, path, "adapter_config.json: "), *values]
        return result
    heads = adapter.config.get("modules_to_save") or []
    head_keys = {k for k in adapter.tensors if any(k.startswith(f"{PEFT_PREFIX}{h}.") for h in heads)}
    result.details["heads"] = list(heads)
    if method.schedule != ONE_PASS:
        # Trained entries (LT-SFT, diff-pruning) are not a function of the config: check
        # them as merge reads them — base tensor names, index ranges, idx/val lengths.
        try:
            if method.folds:
                method.deltas(cfg, {k: t for k, t in adapter.tensors.items() if k not in head_keys}, ckpt)
        except PeftcliError as exc:
            result.problems.append(Problem.of(exc, path))
        result.problems += _head_problems(adapter, heads, ckpt, vocab)
        result.problems += values
        if result.ok and method.folds:
            _merge_input(result, adapter, method, cfg, head_keys, ckpt)
        elif result.ok:  # a lottery run: its result is a checkpoint, merged as a fine-tune
            result.refusal = f"{path}: a lottery run is not an adapter: its result is the checkpoint {os.path.join(path, 'ticket')}"
        return result
    try:
        created = method.init(ckpt, cfg, torch.Generator().manual_seed(0))
    except PeftcliError as exc:  # a refusal naming an option keeps its own hint
        hint = exc.hint if isinstance(exc, BadInputError) else OTHER_BASE
        result.problems += [Problem(f"its {method.name} config does not fit this base: {exc.message}", hint), *values]
        return result
    expected = {k: tuple(t.shape) for k, t in created.items()}
    del created
    derived = method.derived_keys(cfg)
    # PEFT's saved copy of a targeted module's base weight is no φ: the method compares it with the base.
    actual = {k: tuple(t.shape) for k, t in adapter.tensors.items() if k not in head_keys and not k.endswith(".base_layer.weight")}
    result.problems += _key_problems(actual, expected, set(derived), cfg, vocab, vocab_modules(ckpt, vocab))
    result.problems += _head_problems(adapter, heads, ckpt, vocab)
    result.problems += values
    if result.ok:
        _merge_input(result, adapter, method, cfg, head_keys, ckpt)
    return result


def _merge_input(result: Result, adapter, method, cfg, head_keys: set[str], ckpt: Checkpoint) -> None:
    """The base tensors merging the adapter changes (its ΔW's), or why merge refuses it."""
    if not method.folds:
        result.refusal = f"{result.path}: {method.name} adds computation that no weight change reproduces"
        return
    try:
        touches = set(method.deltas(cfg, {k: t for k, t in adapter.tensors.items() if k not in head_keys}, ckpt))
        touches |= set(replaced_modules(adapter.config, adapter.tensors, ckpt.tensors))  # as merge reads them
    except PeftcliError as exc:
        result.problems.append(Problem.of(exc, result.path))
        return
    from peftcli.merging.sources import MERGED_DTYPES

    unmergeable = sorted(n for n in touches if n in ckpt.tensors and ckpt.tensors[n].dtype not in MERGED_DTYPES)
    if unmergeable:  # as merge refuses it (sources.refuse_unmergeable)
        name = unmergeable[0]
        result.refusal = (
            f"{result.path} changes {name!r}, a {ckpt.tensors[name].dtype} tensor: peftcli merges only F16, BF16, F32 "
            "and F64 tensors exactly (dequantize the base first)"
        )
        return
    result.merge_input = Input("adapter", touches, [os.path.join(result.path, ADAPTER_WEIGHTS)])


def _value_problems(tensors: dict) -> list[Problem]:
    """NaN/Inf in the adapter's values (a sparse φ's ``W.idx`` are indices, not values)."""
    return [p for key in sorted(tensors) if not key.endswith(".idx") if (p := nonfinite(display(key), tensors[key], DIVERGED))]


def display(key: str) -> str:
    """An adapter key as a module path and parameter, without PEFT's constant prefix."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _drop_first(key: str) -> str | None:
    """``key`` without the first component of its module path (after PEFT's prefix), or None."""
    prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else ""
    rest = key[len(prefix) :]
    return prefix + rest.split(".", 1)[1] if "." in rest else None


def align(keys: Iterable[str], expected: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Adapter key -> expected key, exact or through one wrapper component; and the keys matching none."""
    expected = set(expected)
    unwrapped: dict[str, str] = {}  # an expected key without its first component -> that key
    for e in sorted(expected):
        short = _drop_first(e)
        if short is not None:
            unwrapped.setdefault(short, e)
    matched = {k: k for k in keys if k in expected}  # exact matches first: they cannot be taken by another
    taken = set(matched.values())
    unexpected = []
    for k in sorted(set(keys) - set(matched)):
        target = next((c for c in (_drop_first(k), unwrapped.get(k)) if c in expected and c not in taken), None)
        if target is None:
            unexpected.append(k)
        else:
            matched[k] = target
            taken.add(target)
    return matched, unexpected


def _key_problems(
    actual: dict[str, tuple], expected: dict[str, tuple], derived: set[str], cfg: Any, vocab: int | None,
    vocab_mods: frozenset[str] = frozenset(),
) -> list[Problem]:
    matched, unexpected = align(actual, expected)
    taken = set(matched.values())
    missing = sorted(set(expected) - taken)
    if derived and derived <= taken and not taken - derived:  # only what is computed from the rest: PEFT's form
        missing = [k for k in missing if k in derived]
    problems = [
        shape_problem(k, actual[k], expected[e], cfg, vocab, vocab_mods, expected_key=e)
        for k, e in sorted(matched.items()) if actual[k] != expected[e]
    ]
    hint = f"{OTHER_BASE} Or was adapter_config.json edited?"
    problems += [Problem(f"{display(k)} is missing: the adapter config creates it on this base", hint) for k in missing]
    problems += [Problem(f"{display(k)} is unexpected: the adapter config creates no such tensor on this base", hint) for k in unexpected]
    return problems


def vocab_modules(ckpt: Checkpoint, vocab: int | None) -> frozenset[str]:
    """The base's modules with a vocabulary axis: the input embedding and output heads whose
    weight has ``vocab`` rows (a tensor of an adapter on them may be sized by the vocabulary)."""
    if not vocab:
        return frozenset()
    names = [input_embedding(ckpt)] + [n for n in ckpt.tensors if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
    return frozenset(
        n[: -len(".weight")] for n in names if n and len(ckpt.tensors[n].shape) == 2 and ckpt.tensors[n].shape[0] == vocab
    )


def _on_vocab_module(key: str, modules: frozenset[str]) -> bool:
    name = display(key)
    return any(name == m or name.startswith(m + ".") for m in modules)


def shape_problem(
    key: str, got: tuple, want: tuple, cfg: Any, vocab: int | None, vocab_mods: frozenset[str] = frozenset(),
    expected_key: str | None = None,
) -> Problem:
    """Why ``key`` has shape ``got`` where the config on this base gives ``want`` (for
    ``expected_key``, the key as the config creates it on this base), as well as can be told.
    A resized vocabulary is named only for a tensor of a module with a vocabulary axis
    (``vocab_modules``): elsewhere a dimension equal to the vocabulary's size (a prefix's
    key/value width, say) is a coincidence."""
    name = display(key)
    shapes = f"shape {list(got)}, expected {list(want)}"
    differ = [i for i in range(len(want)) if got[i] != want[i]] if len(got) == len(want) else []
    rank = getattr(cfg, "rank", None)
    if differ and rank is not None and all(want[i] == rank for i in differ) and len({got[i] for i in differ}) == 1:
        return Problem(
            f"{name}: rank {got[differ[0]]} in the tensors but r={rank} in adapter_config.json ({shapes})",
            "the config and the tensors disagree: fix 'r' in adapter_config.json",
        )
    resized = next((i for i in differ if want[i] == vocab), None) if vocab and _on_vocab_module(expected_key or key, vocab_mods) else None
    if resized is not None:
        return Problem(f"{name}: {shapes} on this base", resized_vocab_hint(got[resized], vocab))
    return Problem(f"{name}: {shapes} from the adapter config on this base", OTHER_BASE)


def _head_problems(adapter, heads: list, ckpt: Checkpoint, vocab: int | None) -> list[Problem]:
    """modules_to_save heads: present in the adapter, and shaped as the base's tensor of that name if any."""
    problems = []
    for head in heads:
        prefix = f"{PEFT_PREFIX}{head}."
        keys = sorted(k for k in adapter.tensors if k.startswith(prefix))  # never none: read_adapter checked
        for key in keys:
            base_name = _base_tensor(ckpt, key[len(PEFT_PREFIX) :])
            if base_name is None:  # a new head (e.g. a classifier): nothing in the base to compare with
                continue
            got, want = tuple(adapter.tensors[key].shape), tuple(ckpt.tensors[base_name].shape)
            if got != want:
                if vocab and len(got) == len(want) and want[0] == vocab and got[0] != vocab:
                    hint = resized_vocab_hint(got[0], vocab)
                else:
                    hint = OTHER_BASE
                problems.append(Problem(f"head {display(key)}: shape {list(got)}, the base's {base_name} is {list(want)}", hint))
    return problems


def _base_tensor(ckpt: Checkpoint, name: str) -> str | None:
    """The base tensor ``name`` names, exactly or through one wrapper component more or less."""
    if name in ckpt.tensors:
        return name
    short = name.split(".", 1)[1] if "." in name else None
    if short in ckpt.tensors:
        return short
    return next((t for t in sorted(ckpt.tensors) if t.endswith("." + name) and "." not in t[: -len(name) - 1]), None)


# -- diffs -------------------------------------------------------------------------------------


def check_diff(path: str, ckpt: Checkpoint, content: bool) -> Result:
    result = Result(path, "diff")
    try:
        diff = read_diff(path)
    except PeftcliError as exc:
        result.problems.append(Problem.of(exc, path))
        return result
    with diff:
        result.method = diff.method
        result.details.update(tensors=len(diff.names), density=diff.density)
        differences = diff.fingerprint.differences(ckpt)
        if differences:  # one problem, however many tensors differ; the details list them all
            result.details["differences"] = differences
            hint = "use the base checkpoint the diff was computed from"
            embedding = input_embedding(ckpt)
            if embedding and any(text.startswith(repr(embedding) + " is ") for text in differences):
                hint = "a resized vocabulary is the usual cause of shape mismatches: " + hint
            result.problems.append(Problem(f"made from another base: {summarize_differences(differences)}", hint))
        if content and not differences:
            if diff.fingerprint.content is None:
                result.problems.append(Problem("the fingerprint has no content hash to check", "check without `content`"))
            elif content_hash(ckpt, diff.names) != diff.fingerprint.content:
                result.problems.append(
                    Problem(
                        "the base's covered tensors hold other bytes than those the diff was made from",
                        "the base has the right shapes but other values: use the exact base checkpoint",
                    )
                )
        for name in diff.names:
            try:
                _, val = diff.get(name)
            except PeftcliError as exc:
                result.problems.append(Problem.of(exc, path))
                continue
            problem = nonfinite(name, val, "the diff is not usable: recompute it from finite checkpoints")
            if problem:
                result.problems.append(problem)
        if diff.task_head is not None:
            result.details["task_head"] = diff.task_head.to_json()
            for name in sorted(diff.task_head.tensors):
                problem = nonfinite(f"task head {name}", diff.get_head(name), "the diff is not usable: recompute it from finite checkpoints")
                if problem:
                    result.problems.append(problem)
        stored = {n: sum(diff.ckpt.tensors[k].nbytes for k in (n, n + IDX, n + VAL) if k in diff.ckpt.tensors) for n in diff.names}
        result.merge_input = Input("diff", set(diff.names), [path], stored)
    return result


# -- fine-tuned checkpoints --------------------------------------------------------------------


def check_checkpoint(path: str, ckpt: Checkpoint) -> Result:
    """A full fine-tune of the base, as merge takes one: the base's tensor names, dtypes and shapes."""
    result = Result(path, "checkpoint")
    try:
        ft = open_checkpoint(path)
    except PeftcliError as exc:
        result.problems.append(Problem.of(exc, path))
        return result
    with ft:
        result.details["tensors"] = len(ft.tensors)
        body, mine = ft, tensor_table(ckpt)
        if set(ft.tensors) != set(ckpt.tensors):
            from peftcli.heads import match_head_checkpoint

            try:
                headed = match_head_checkpoint(ckpt, ft)
            except PeftcliError as exc:  # a head model of this base, whose body or head does not fit
                result.problems.append(Problem.of(exc, path))
                return result
            if headed is not None:
                body, mine = headed.body, {n: t for n, t in mine.items() if n not in set(headed.dropped)}
                result.details["task_head"] = headed.head.to_json()
        differences = table_differences(mine, tensor_table(body), "the base", path)
        if differences:
            result.details["differences"] = differences
            result.problems.append(Problem(f"not a fine-tune of this base: {summarize_differences(differences)}", OTHER_BASE))
        floating = {n for n in mine if ckpt.tensors[n].dtype in FLOAT_DTYPES}
        result.merge_input = Input("checkpoint", floating, list(ft.files))
    return result
