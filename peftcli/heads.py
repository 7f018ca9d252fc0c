"""Tensor level: a checkpoint of the base's architecture with a task head, and that head.

A classifier fine-tuned from a pretrained model is a checkpoint of the head model
(``BertForSequenceClassification``): the base's tensors under the head class's
``base_model_prefix`` (``bert.encoder...`` for the base's ``encoder...``; a causal LM's body
keeps its names, and its ``lm_head`` has no place there), plus the head (``classifier.*``,
``score.*``). The correspondence comes from the head model built on the meta device from the
base's config.json: names and shapes, no weights. With it, ``diff``, ``check`` and ``merge``
compare the *body* with the base name by name and carry the head as it is (a new head has no
θ₀ to subtract).

A checkpoint is recognised as the base's architecture with a head when its tensors are exactly
those of such a head model: the class its config.json names (a transformers class for the
base's config), else ``AutoModelForSequenceClassification``, with the number of labels its
head weight has. The class named in config.json is not trusted otherwise: ``train --full``
used to write ``BertModel`` there for a classifier, and such checkpoints are recognised too.

``TaskHead`` describes a head wherever it travels (a ``.diff``'s ``task_head`` metadata, a
merge input): class, tensor names, dtypes and shapes, labels, and the two config fields a
classifier needs besides them (``problem_type``; ``pad_token_id``, with which a decoder
classifier finds an example's last token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from peftcli.checkpoint.fingerprint import is_dtype_shape, summarize_differences, table_differences
from peftcli.checkpoint.reader import Checkpoint
from peftcli.errors import BadInputError, UsageError

DEFAULT_CLASS = "AutoModelForSequenceClassification"
HEAD_DTYPES = ("F16", "BF16", "F32", "F64")
OTHER_BASE = "was it fine-tuned from another base model?"


@dataclass(frozen=True)
class TaskHead:
    """A trained task head: what a head model holds besides the base's body."""

    architecture: str  # the head model's class, e.g. BertForSequenceClassification
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name in the head model -> (dtype, shape)
    labels: list[str]  # label names in index order (config.json's id2label)
    problem_type: str | None = None
    pad_token_id: int | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def same_task(self, other: "TaskHead") -> bool:
        """Heads of one task (trained twice, say): they merge into one; other heads make separate models."""
        shapes = lambda h: {n: s for n, (_, s) in h.tensors.items()}  # noqa: E731 - dtypes may differ
        return (self.architecture, shapes(self), self.labels, self.problem_type) == (
            other.architecture, shapes(other), other.labels, other.problem_type,
        )

    def to_json(self) -> dict:
        return {
            "architecture": self.architecture,
            "tensors": {n: [d, list(s)] for n, (d, s) in sorted(self.tensors.items())},
            "labels": list(self.labels),
            "problem_type": self.problem_type,
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def from_json(cls, obj: object, where: str, hint: str) -> "TaskHead":
        """Validate a ``to_json`` document; every problem is a ``BadInputError`` naming ``where``."""
        fields = {"architecture", "tensors", "labels", "problem_type", "pad_token_id"}
        if not isinstance(obj, dict) or not {"architecture", "tensors", "labels"} <= set(obj) or set(obj) - fields:
            raise BadInputError(f"{where}: task_head must be an object with keys {sorted(fields)}", hint)
        arch, tensors, labels = obj["architecture"], obj["tensors"], obj["labels"]
        if not isinstance(arch, str) or not arch.isidentifier():
            raise BadInputError(f"{where}: task_head architecture {arch!r} is not a class name", hint)
        if not isinstance(tensors, dict) or not tensors:
            raise BadInputError(f"{where}: task_head tensors must be a non-empty object {{name: [dtype, shape]}}", hint)
        for name, entry in tensors.items():
            if not is_dtype_shape(entry) or entry[0] not in HEAD_DTYPES:
                raise BadInputError(f"{where}: task_head tensor {name!r} has an invalid entry {entry!r}", hint)
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise BadInputError(f"{where}: task_head labels must be a non-empty list of strings", hint)
        problem_type, pad = obj.get("problem_type"), obj.get("pad_token_id")
        if problem_type is not None and not isinstance(problem_type, str):
            raise BadInputError(f"{where}: task_head problem_type must be a string or null", hint)
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
            raise BadInputError(f"{where}: task_head pad_token_id must be a non-negative integer or null", hint)
        return cls(arch, {n: (e[0], tuple(e[1])) for n, e in tensors.items()}, list(labels), problem_type, pad)


@dataclass
class HeadModel:
    """The head model of a base: where each base tensor goes, and the head's own tensors."""

    architecture: str
    prefix: str  # the class's base_model_prefix
    rename: dict[str, str | None]  # base tensor -> name in the head model (None: it has no place there)
    head_shapes: dict[str, tuple[int, ...]]  # the head's tensors (those no base tensor becomes)
    config: object = field(repr=False)  # the transformers config it was built from

    @property
    def body(self) -> dict[str, str]:
        """Base tensor -> head-model name, for the tensors the head model keeps."""
        return {b: h for b, h in self.rename.items() if h is not None}


def _head_class(architecture: str | None, config):
    """The transformers class to build: ``architecture`` when it is one for this config, else None."""
    import transformers

    if architecture is None:
        return transformers.AutoModelForSequenceClassification
    cls = getattr(transformers, architecture, None) if architecture.isidentifier() else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        return None
    if not isinstance(config, cls.config_class) or not cls.base_model_prefix:
        return None
    return cls


def build_head_model(base: Checkpoint, num_labels: int, architecture: str | None = None) -> HeadModel | None:
    """The head model ``architecture`` (default: sequence classification) of ``base`` with
    ``num_labels`` labels, on the meta device; None when it is not one for the base's config."""
    import torch
    from transformers import AutoConfig

    if base.directory is None or base.config is None:
        return None
    try:
        config = AutoConfig.from_pretrained(base.directory, local_files_only=True, num_labels=num_labels)
    except (ValueError, KeyError, OSError):  # a model type transformers does not know: no head model to name
        return None
    cls = _head_class(architecture, config)
    if cls is None:
        return None
    try:
        with torch.device("meta"):  # names and shapes only
            model = cls.from_config(config) if architecture is None else cls(config)
    except ValueError:  # no sequence-classification class for this model type
        return None
    if model is None or getattr(model, "base_model", model) is model:  # the base class itself: no head
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = model.base_model_prefix
    rename = {}
    for name in base.tensors:
        rename[name] = name if name in expected else (f"{prefix}.{name}" if f"{prefix}.{name}" in expected else None)
    kept = {h for h in rename.values() if h is not None}
    heads = {n: s for n, s in expected.items() if n not in kept}
    if not heads:
        return None
    return HeadModel(type(model).__name__, prefix, rename, heads, config)


def label_names(config: dict | None, num_labels: int) -> list[str]:
    """Labels in index order from a config.json's ``id2label``; ``LABEL_i`` when it has none that fit."""
    id2label = (config or {}).get("id2label")
    if isinstance(id2label, dict) and len(id2label) == num_labels:
        try:
            labels = [id2label[str(i)] for i in range(num_labels)]
        except KeyError:
            labels = None
        if labels and all(isinstance(x, str) for x in labels):
            return labels
    return [f"LABEL_{i}" for i in range(num_labels)]


# -- a head-model checkpoint of the base ---------------------------------------------------------


@dataclass
class HeadCheckpoint:
    """A fine-tuned head model of the base, seen as the base's body (``body``) plus ``head``."""

    head: TaskHead
    body: Checkpoint  # the fine-tune's body tensors under the base's names (a view: same files)
    dropped: list[str]  # base tensors the head model has no place for (a causal LM's lm_head)
    checkpoint: Checkpoint  # the fine-tune itself, where the head tensors are read (head-model names)


def match_head_checkpoint(base: Checkpoint, ft: Checkpoint) -> HeadCheckpoint | None:
    """``ft`` as the base's architecture with a task head; None when it has no tensor beyond the base's
    names or does not look like a head model of it at all. One that looks like one (it holds the head, or
    its body under names of the head model's own, and most of that body) but does not fit raises, saying whether the
    body or the head differs."""
    extra = [n for n in ft.tensors if n not in base.tensors]
    if not extra or base.directory is None or base.config is None:
        return None
    ft_config = ft.config if ft.directory is not None else None
    named = ((ft_config or {}).get("architectures") or [None])[0]
    tried = []
    for architecture in dict.fromkeys([named if isinstance(named, str) else None, None]):
        model = _fitted_model(base, ft, architecture)
        if model is None:
            continue
        tried.append(model)
        problem = _problem(base, ft, model)
        if problem is None:
            return _head_checkpoint(base, ft, model, ft_config)
    looks = [m for m in tried if _looks_like(ft, m)]
    if looks:
        raise BadInputError(f"{ft.path}: {_problem(base, ft, looks[0])}", OTHER_BASE)
    return None


def _fitted_model(base: Checkpoint, ft: Checkpoint, architecture: str | None) -> HeadModel | None:
    """The head model with as many labels as ``ft``'s head weight has rows (2 when it has none)."""
    model = build_head_model(base, 2, architecture)
    if model is None:
        return None
    weight = next((n for n, s in sorted(model.head_shapes.items()) if n.endswith(".weight") and len(s) == 2 and s[0] == 2), None)
    rows = ft.tensors[weight].shape[0] if weight in ft.tensors and len(ft.tensors[weight].shape) == 2 else 2
    return model if rows == 2 or rows < 1 else build_head_model(base, rows, architecture)


def _looks_like(ft: Checkpoint, model: HeadModel) -> bool:
    """Whether ``ft`` is meant as ``model``'s checkpoint: it holds a head tensor, or a body under
    the model's own names (``bert.*``), and most of that body."""
    body = model.body
    renamed = any(b != h and h in ft.tensors for b, h in body.items())
    if not renamed and not any(n in ft.tensors for n in model.head_shapes):
        return False
    return sum(h in ft.tensors for h in body.values()) >= len(body) / 2


def _problem(base: Checkpoint, ft: Checkpoint, model: HeadModel) -> str | None:
    """What keeps ``ft`` from being ``model``'s checkpoint: the body first, then the head; None if nothing."""
    body = model.body
    want = {h: [base.tensors[b].dtype, list(base.tensors[b].shape)] for b, h in body.items()}
    have = {h: [ft.tensors[h].dtype, list(ft.tensors[h].shape)] for h in body.values() if h in ft.tensors}
    diffs = table_differences(want, have, "the base", str(ft.path))
    if diffs:
        return f"a {model.architecture} whose body differs from the base: {summarize_differences(diffs)}"
    head_want = {n: list(s) for n, s in model.head_shapes.items()}
    head_have = {n: list(t.shape) for n, t in ft.tensors.items() if n not in have}
    if head_want != head_have:
        wrong = [f"{n!r} {head_have[n]} (expected {head_want[n]})" for n in sorted(head_want) if n in head_have and head_have[n] != head_want[n]]
        wrong += [f"{n!r} unexpected" for n in sorted(set(head_have) - set(head_want))]
        wrong += [f"{n!r} missing" for n in sorted(set(head_want) - set(head_have))]
        return f"its body is the base's, but its head is not a {model.architecture}'s: " + "; ".join(wrong[:3])
    bad = sorted(n for n in head_have if ft.tensors[n].dtype not in HEAD_DTYPES)
    if bad:
        return f"its head tensor {bad[0]!r} is {ft.tensors[bad[0]].dtype}, not floating-point"
    return None


def _head_checkpoint(base: Checkpoint, ft: Checkpoint, model: HeadModel, ft_config: dict | None) -> HeadCheckpoint:
    body = model.body
    tensors = {b: ft.tensors[h]._replace(name=b) for b, h in body.items()}
    view = Checkpoint(
        ft.path, ft.storage, ft.files, tensors, ft.metadata, ft.directory, _maps=ft._maps,
        _loaded={b: ft._loaded[h] for b, h in body.items()} if ft.storage == "pickle" else {},
    )
    labels = label_names(ft_config, model.config.num_labels)
    cfg = ft_config or {}
    problem_type = cfg.get("problem_type") if isinstance(cfg.get("problem_type"), str) else None
    pad = cfg.get("pad_token_id") if isinstance(cfg.get("pad_token_id"), int) and not isinstance(cfg.get("pad_token_id"), bool) else None
    head = TaskHead(
        model.architecture, {n: (ft.tensors[n].dtype, ft.tensors[n].shape) for n in sorted(model.head_shapes)},
        labels, problem_type, pad,
    )
    dropped = sorted(b for b, h in model.rename.items() if h is None)
    return HeadCheckpoint(head, view, dropped, ft)


# -- the output: a head model of the base ----------------------------------------------------------


def head_model_for(base: Checkpoint, head: TaskHead) -> HeadModel:
    """The head model ``head`` belongs to, on this base; refuses a head that does not fit it."""
    if base.directory is None or base.config is None:
        raise UsageError("merging a task head needs a base model directory (with config.json)", "pass the base directory")
    model = build_head_model(base, head.num_labels, head.architecture)
    if model is None:
        raise BadInputError(
            f"the task head's class {head.architecture} is not a head model of this base",
            "merge heads trained on this base (a transformers head class for its config)",
        )
    want = {n: list(s) for n, s in model.head_shapes.items()}
    have = {n: list(s) for n, (_, s) in head.tensors.items()}
    if want != have:
        raise BadInputError(
            f"the task head {sorted(have)} does not fit {model.architecture} on this base, which has {sorted(want)} "
            f"of shapes {[want[n] for n in sorted(want)]}",
            OTHER_BASE,
        )
    return model


def head_config_json(base: Checkpoint, head: TaskHead) -> dict:
    """config.json of the base's head model ``head``: the base's config, the head's labels, its class."""
    from transformers import AutoConfig

    labels = head.labels
    config = AutoConfig.from_pretrained(
        base.directory, local_files_only=True, num_labels=head.num_labels,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    if head.problem_type is not None:
        config.problem_type = head.problem_type
    if head.pad_token_id is not None:
        config.pad_token_id = head.pad_token_id
    elif config.pad_token_id is None and base.config and base.config.get("eos_token_id") is not None:
        config.pad_token_id = base.config["eos_token_id"]  # decoder classifiers need it to find the last token
    data = json.loads(config.to_json_string())
    data["architectures"] = [head.architecture]
    return data


def with_labels(head: TaskHead, labels: list[str] | None) -> TaskHead:
    """``head`` with these label names, when they are as many as its labels."""
    return replace(head, labels=list(labels)) if labels and len(labels) == head.num_labels else head
