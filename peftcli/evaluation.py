"""Module level: the validation loss (and accuracy, and greedy answers) of a model on a data file.

MODEL is a base checkpoint, an adapter directory (a training run, or its ``best/``) or a
standalone checkpoint (``peftcli merge`` output, a ``train --full`` run). The task comes from
the data's columns, as in training, and the numbers are those the training loop reports
(``peftcli.training.loop.evaluate``, same batching and padding), so evaluating a run on its
``--eval`` data gives its final validation loss.

Classification needs a head. An adapter run brings the head it trained; a merged checkpoint
of such a run has it in its weights; ``head`` takes it from another run (a merge of several
task vectors, evaluated per task); a model with none gets a new head drawn from ``seed``,
which with the default 0 is the head ``peftcli train`` starts from. Its numbers are a
baseline, not a result: the document says ``head: "new"``, ``baseline: true`` and the
``head_seed``, the text leads with "baseline with a new, untrained head", and
``min_agreement`` is refused (a random head can predict one class for every input, so two
different models would agree). Every classification result names the head it used.
``compare`` reports how often another model's predictions agree (classification: per
example; language modelling: per token) and their largest logit gap. ``threads`` bounds
torch's CPU threads as ``peftcli train --threads`` does (``peftcli.threads``).

On ``sft`` data the model also answers: each prompt is completed greedily and scored against
its reference (exact match, token F1, accuracy over a label list; ``peftcli.generation``).

Options are declared once in ``EvalOptions`` (the ``evaluate`` flags and recipe keys); this
module imports no torch at import time. On the command line: ``peftcli evaluate MODEL --data FILE``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from peftcli.errors import BadInputError, UsageError
from peftcli.generation import check_predictions_path, generate_and_score, parse_labels, prepare, write_predictions
from peftcli.options import option
from peftcli.threads import HELP as THREADS_HELP
from peftcli.threads import check_threads
from peftcli.training.data import COLUMNS_HELP, TASKS, parse_columns

SCHEMA = "peftcli.evaluate/1"


@dataclass
class EvalOptions:
    data: str | None = option(None, metavar="FILE", help="evaluation data: .jsonl, .csv or .tsv (required)")
    base: str | None = option(None, metavar="DIR", help="base model of an adapter MODEL (default: the one the adapter records)")
    head: str | None = option(None, metavar="RUN", help="use the classification head trained in RUN (an adapter directory)")
    compare: str | None = option(None, metavar="OTHER", help="also report how often the model OTHER predicts what MODEL predicts")
    min_agreement: float | None = option(None, metavar="F", help="fail (exit 1) when the agreement with --compare is below F")
    task: str | None = option(None, metavar="lm|sft|classify", help="override the task detected from the data's columns")
    columns: str | None = option(None, metavar="ROLE=COLUMN,...", help=COLUMNS_HELP)
    batch_size: int = option(32, help="examples per batch (default 32)")
    max_length: int = option(128, help="truncate examples to this many tokens (default 128)")
    limit: int | None = option(None, help="use only the first N examples")
    seed: int = option(0, help="seed of a new classification head, for a model without one (default 0: the head train starts from)")
    device: str = option("auto", metavar="auto|cpu|cuda", help="where to run (default auto: CUDA when present)")
    threads: int | None = option(None, help=THREADS_HELP)
    max_new_tokens: int = option(
        32, min=0, max=1_000_000, help="sft data: complete each prompt greedily with up to N tokens and score the answers (default 32; 0: loss only)",
    )
    labels: str | None = option(None, metavar="L1,L2,...", help="sft data: the answers are these labels; also report classification accuracy by generation")
    predictions: str | None = option(None, metavar="FILE", path=True, help="sft data: write each prompt, reference and completion as JSON lines to FILE")
    force: bool = option(False, help="replace --predictions FILE if it exists")
    chat_template: str | None = option(
        None, metavar="FILE", path=True, help="render messages rows with this Jinja chat template (default: the run's, else the tokenizer's)",
    )

    def __post_init__(self) -> None:
        if self.data is None:
            raise UsageError("`data` is required", "e.g. `data` dev.jsonl")
        if self.task is not None and self.task not in TASKS:
            raise UsageError(f"unknown `task` {self.task!r}", "choose lm, sft or classify")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"unknown `device` {self.device!r}", "choose auto, cpu or cuda")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise UsageError(f"`{name}` must be positive", f"e.g. `{name}` {getattr(EvalOptions, name)}")
        if self.limit is not None and self.limit <= 0:
            raise UsageError("`limit` must be positive", "e.g. `limit` 100, or leave it out to use every example")
        check_threads(self.threads)
        parse_columns(self.columns)
        parse_labels(self.labels)
        if self.min_agreement is not None:
            if self.compare is None:
                raise UsageError("`min_agreement` needs `compare` OTHER", "add `compare` with the model to agree with")
            if not 0.0 <= self.min_agreement <= 1.0:
                raise UsageError(
                    f"`min_agreement` must be between 0 and 1, got {self.min_agreement}",
                    "it is a fraction of examples: `min_agreement` 0.95 needs 95% agreement",
                )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise BadInputError(f"{path}: not readable JSON: {exc.strerror or exc}", "check that the file is readable") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 4300-digit integer, deep nesting
        raise BadInputError(f"{path}: not readable JSON: {exc}", "the file is corrupt or truncated; replace it with an intact copy") from None
    if not isinstance(doc, dict):
        raise BadInputError(f"{path}: expected a JSON object", "the file is corrupt; replace it with an intact copy")
    return doc


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _run_labels(adapter_dir: str) -> list[str] | None:
    """The label order a run trained with (``best/`` keeps none of its own: the run's)."""
    from peftcli.training.common import LABELS_FILE

    for d in (adapter_dir, os.path.dirname(os.path.normpath(adapter_dir))):
        p = os.path.join(d, LABELS_FILE)
        if os.path.isfile(p):
            labels = _read_json(p).get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise BadInputError(f"{p}: no list of labels", "was it written by peftcli train?")
            return labels
    return None


def _checkpoint_labels(model_dir: str) -> list[str] | None:
    """Labels of a classifier checkpoint (a merged head model, a full fine-tune), from config.json."""
    p = os.path.join(model_dir, "config.json")
    if not os.path.isfile(p):
        return None
    cfg = _read_json(p)
    archs = cfg.get("architectures") or []
    id2label = cfg.get("id2label")
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs) or not isinstance(id2label, dict):
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        return None  # not transformers' "0", "1", ... keys: fall back on the data's labels


class _Loaded:
    """A model ready to evaluate, and what describes it."""

    def __init__(self, model, kind: str, model_dir: str, head: str | None, left_pad: bool):
        self.model, self.kind, self.model_dir, self.head, self.left_pad = model, kind, model_dir, head, left_pad


def _model_dir(path: str, opts: EvalOptions) -> str:
    """The checkpoint directory the model is built from: an adapter's base, else ``path`` itself."""
    if not os.path.isdir(path):
        raise BadInputError(f"{path}: not a model or adapter directory", "pass a checkpoint directory or a training run")
    if not _is_adapter(path):
        return path
    from peftcli.artifacts.adapter_dir import read_adapter

    from peftcli.checkpoint.gguf_model import is_gguf

    model_dir = opts.base or read_adapter(path).config.get("base_model_name_or_path")
    if not model_dir or not (os.path.isdir(model_dir) or is_gguf(model_dir)):
        raise UsageError(f"{path}: its base model {model_dir!r} is not there", "pass `base` DIR")
    return model_dir


def _load(path: str, opts: EvalOptions, task: str, labels: list[str] | None, pad_id: int) -> _Loaded:
    import torch

    from peftcli.artifacts.adapter_dir import read_adapter
    from peftcli.attach import _load_heads, attach_adapter, load_base_model
    from peftcli.training.common import head_modules, is_decoder

    model_dir = _model_dir(path, opts)
    adapter = read_adapter(path) if _is_adapter(path) else None
    kwargs = {}
    if task == "classify":
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    torch.manual_seed(opts.seed)  # a new head is drawn exactly as the training loop draws it
    model_class = "AutoModelForSequenceClassification" if task == "classify" else "AutoModelForCausalLM"
    base, info = load_base_model(model_dir, model_class, with_info=True, **kwargs)
    head = None
    if task == "classify":
        if base.config.pad_token_id is None:
            base.config.pad_token_id = pad_id
        head = "new" if head_modules(info.get("missing_keys", [])) else "checkpoint"
    model = base
    if adapter is not None:
        model = attach_adapter(base, adapter)
        if task == "classify" and adapter.config.get("modules_to_save"):
            head = "adapter"
    if opts.head is not None:
        if task != "classify":
            raise UsageError("`head` applies to classification data only", "drop `head`, or pass `data` with a label column")
        head_run = read_adapter(opts.head)
        if not head_run.config.get("modules_to_save"):
            raise BadInputError(f"{opts.head}: this run trained no classification head", "pass the run of a classification task")
        _load_heads(base, head_run)
        head = f"from {opts.head}"
    model.eval()
    # Padded as the training loop pads, so a run's final validation loss comes back exactly.
    left_pad = task == "classify" and adapter is not None and is_decoder(model_dir)
    return _Loaded(model, "adapter" if adapter is not None else "checkpoint", model_dir, head, left_pad)


def _predictions(loaded: _Loaded, items: list[dict], pad_id: int, batch_size: int, device, task: str):
    """Argmax and logits per example (classification) or per real token (language modelling)."""
    import torch

    from peftcli.training.batching import collate

    preds, logits = [], []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[i : i + batch_size], pad_id, loaded.left_pad).items()}
            batch.pop("labels", None)
            out = loaded.model(**batch).logits.float()
            if task != "classify":
                out = out[batch["attention_mask"].bool()]
            preds.append(out.argmax(-1).cpu())
            logits.append(out.cpu())
    return torch.cat(preds), torch.cat(logits)


def _refuse_untrained_assertion(model: str, loaded: _Loaded, opts: EvalOptions) -> None:
    """--min-agreement proves nothing about a new head: a random head can predict one class
    for every input, and then two different models agree on 100%."""
    if opts.min_agreement is not None and loaded.head == "new":
        raise UsageError(
            f"`min_agreement`: {model} has no trained classification head, only a new one drawn from seed {opts.seed}, "
            "so agreeing with it says nothing about the model",
            "compare trained classifiers (a classification run, or a merge of one), or pass `head` RUN",
        )


def evaluate(model: str, opts: EvalOptions) -> dict:
    """Evaluate ``model`` on ``opts.data``; returns the ``peftcli.evaluate/1`` document."""
    from peftcli.threads import torch_threads

    with torch_threads(opts.threads):
        return _evaluate(model, opts)


def _evaluate(model: str, opts: EvalOptions) -> dict:
    import dataclasses

    from peftcli.training.batching import encode, load_tokenizer
    from peftcli.training.common import evaluate as loop_evaluate
    from peftcli.training.common import is_decoder, resolve_device
    from peftcli.training.data import load_dataset

    data = load_dataset(opts.data, opts.task, opts.limit, opts.columns)
    if not data.examples:
        raise BadInputError(f"{opts.data}: no examples to evaluate on", "pass a data file with at least one example")
    task = data.task
    labels = None
    if task == "classify":
        labels = (
            (_run_labels(opts.head) if opts.head else None)
            or (_run_labels(model) if _is_adapter(model) else _checkpoint_labels(model))
            or data.labels
        )
    if task != "sft":
        for name in ("labels", "predictions"):
            if getattr(opts, name) is not None:
                raise UsageError(f"`{name}` applies to sft data (answers to complete) only", f"drop `{name}`, or pass sft data")
    inputs = [model, data.path]
    check_predictions_path(opts.predictions, inputs, opts.force)
    device = resolve_device(opts.device)
    model_dir = _model_dir(model, opts)
    tokenizer = load_tokenizer(model_dir)
    template, template_name = _chat_template(model, opts, data.chat, tokenizer, model_dir)
    items = encode(data, tokenizer, opts.max_length, labels, chat_template=template, template_name=template_name)
    pad_id = tokenizer.pad_token_id
    generating = task == "sft" and opts.max_new_tokens > 0
    prompts = prepare(data, tokenizer, opts, template, template_name) if generating else None

    loaded = _load(model, opts, task, labels, pad_id)
    _refuse_untrained_assertion(model, loaded, opts)
    loaded.model.to(device)
    result = loop_evaluate(loaded.model, items, pad_id, opts.batch_size, device, task, loaded.left_pad)
    baseline = loaded.head == "new"
    doc = {
        "schema": SCHEMA, "model": model, "kind": loaded.kind, "base": loaded.model_dir if loaded.kind == "adapter" else None,
        "data": opts.data, "task": task, "examples": len(items), "head": loaded.head,
        "head_seed": opts.seed if baseline else None, "baseline": baseline, "labels": labels, **result,
    }
    records = None
    if prompts is not None:
        doc["generation"], records, prompt_texts = generate_and_score(loaded.model, prompts, data, tokenizer, opts, device, is_decoder(loaded.model_dir))
    if opts.compare is not None:
        ours = _predictions(loaded, items, pad_id, opts.batch_size, device, task)
        del loaded  # one model in memory at a time
        other = _load(opts.compare, dataclasses.replace(opts, compare=None, min_agreement=None), task, labels, pad_id)
        _refuse_untrained_assertion(opts.compare, other, opts)
        other.model.to(device)
        theirs = _predictions(other, items, pad_id, opts.batch_size, device, task)
        agreement = float((ours[0] == theirs[0]).float().mean())
        gap = float((ours[1] - theirs[1]).abs().max())
        doc["compare"] = {
            "model": opts.compare, "head": other.head, "head_seed": opts.seed if other.head == "new" else None,
            "agreement": agreement, "max_logit_gap": gap,
        }
        if opts.min_agreement is not None and agreement < opts.min_agreement:
            raise BadInputError(
                f"{model} and {opts.compare} agree on {100 * agreement:.2f}% of the predictions, "
                f"below `min_agreement` {opts.min_agreement:g}",
                f"their largest logit gap is {gap:.3g}",
            )
    if opts.predictions is not None and records is not None:
        write_predictions(opts.predictions, records, prompt_texts, inputs, opts.force)
    return doc


def _chat_template(model: str, opts: EvalOptions, chat: bool, tokenizer, model_dir: str) -> tuple[str | None, str]:
    """The template messages rows are rendered with: `chat_template`'s, else the one the run
    was trained with (its ``train_args.json``), else the tokenizer's."""
    from peftcli.training.chat import resolve_template
    from peftcli.training.common import ARGS_FILE

    path = opts.chat_template
    if path is None and chat and _is_adapter(model):
        for d in (model, os.path.dirname(os.path.normpath(model))):  # a run, or its best/
            args = os.path.join(d, ARGS_FILE)
            if os.path.isfile(args):
                path = _read_json(args).get("chat_template")
                if path is not None and not os.path.isfile(path):
                    raise UsageError(
                        f"{model} was trained with the chat template {path}, which is not there",
                        "pass `chat_template` FILE with the same template",
                    )
                break
    return resolve_template(chat, path, tokenizer, model_dir), path or "the tokenizer's"


def _head_words(head: str | None, seed) -> str:
    """Which classification head gave the numbers, in words."""
    if head == "new":
        return f"a new, untrained head (seed {seed})"
    if head == "checkpoint":
        return "the checkpoint's own head"
    if head == "adapter":
        return "the adapter's trained head"
    if head and head.startswith("from "):
        return f"the head trained in {head[len('from '):]}"
    return f"head {head}"


def describe(doc: dict) -> str:
    """One line: the numbers of an evaluation document, and which head gave them.

    A new head's numbers lead with "baseline": they measure a random head on the model's
    features (the head training starts from), not anything trained for the task.
    """
    numbers = f"eval_loss {doc['eval_loss']:.4f}"
    if doc.get("eval_accuracy") is not None:
        numbers += f", accuracy {doc['eval_accuracy']:.4f}"
    numbers += f" on {doc['examples']} examples"
    head = doc.get("head")
    if head == "new":
        text = f"baseline with {_head_words(head, doc.get('head_seed'))}, not a trained model: {numbers}"
    elif head is not None:
        text = f"{numbers}, with {_head_words(head, None)}"
    else:
        text = numbers
    gen = doc.get("generation")
    if gen:
        text += f"; greedy answers: exact match {gen['exact_match']:.4f}, F1 {gen['f1']:.4f}"
        if gen.get("labels"):
            text += f", label accuracy {gen['label_accuracy']:.4f} ({gen['unmatched']} naming no label)"
        if gen["truncated_prompts"]:
            text += f" ({gen['truncated_prompts']} prompts cut to their last tokens)"
    if doc.get("compare"):
        c = doc["compare"]
        other = f" ({_head_words('new', c.get('head_seed'))})" if c.get("head") == "new" else ""
        text += f"; agrees with {c['model']}{other} on {100 * c['agreement']:.1f}% (max logit gap {c['max_logit_gap']:.2e})"
    return text
