"""Tokenising examples into batches, padded per batch (never to a global maximum length).

- ``lm``: labels are the input ids, padding ignored (-100);
- ``sft``: prompt tokens are ignored too, so the loss is on the completion only; from
  ``messages`` rows, everything but the assistant turns is ignored (``peftcli.training.chat``);
- ``classify``: one label id per example.
"""

from __future__ import annotations

import os

import torch

from peftcli.errors import BadInputError, UsageError
from peftcli.training.chat import encode_messages
from peftcli.training.data import Dataset
from peftcli.training.packing import collate_packed, filler_id

IGNORE = -100  # transformers' ignore_index for cross-entropy


def load_tokenizer(model_dir: str):
    """The tokenizer of a model directory, or the one transformers builds from a GGUF's metadata."""
    from transformers import AutoTokenizer

    from peftcli.checkpoint.gguf_model import is_gguf

    if is_gguf(model_dir):
        return _gguf_tokenizer(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{model_dir}: no usable tokenizer: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}", "the model directory needs its tokenizer files") from None
    return _with_pad(tok)


def _with_pad(tok):
    if tok.pad_token_id is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _gguf_tokenizer(path: str):
    """transformers' tokenizer from the GGUF's ``tokenizer.*`` metadata (offline; needs ``gguf``)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True)
    except Exception as exc:  # transformers' GGUF converters raise anything from KeyError to NotImplementedError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, KeyError):  # a field its converter needs, e.g. the token scores
            first = f"its tokenizer metadata lacks {first}"
        raise BadInputError(
            f"{path}: transformers cannot build a tokenizer from this GGUF: {first}",
            "convert it with transformers (from_pretrained(dir, gguf_file=...), then save_pretrained) and pass that directory",
        ) from None
    return _with_pad(tok)


def encode(
    dataset: Dataset, tokenizer, max_length: int, label_mapping: list[str] | None = None, chat_template: str | None = None,
    template_name: str = "the tokenizer's",
) -> list[dict]:
    """One dict of token ids (and labels) per example, truncated to ``max_length``.
    ``chat_template``: the template messages rows are rendered with (``chat.resolve_template``)."""
    items = []
    label_ids = dataset.label_ids(label_mapping) if dataset.task == "classify" else None
    for i, ex in enumerate(dataset.examples):
        if ex.messages is not None:
            if chat_template is None:  # a caller without --chat-template (peftcli evaluate): the tokenizer's own
                chat_template = getattr(tokenizer, "chat_template", None)
            if not isinstance(chat_template, str) or not chat_template:
                raise UsageError(
                    f"{dataset.path}: messages rows need a chat template and the tokenizer has none", "peftcli train takes one: `peftcli train RUN --chat-template FILE`"
                )
            where = f"{dataset.path}:{ex.line}"
            chat_ids, chat_labels = encode_messages(ex.messages, tokenizer, chat_template, template_name, where, max_length)
            items.append({"input_ids": chat_ids, "labels": chat_labels})
        elif dataset.task == "sft":
            prompt = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
            completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]
            ids = (prompt + completion)[:max_length]
            labels = ([IGNORE] * len(prompt) + completion)[:max_length]
            items.append({"input_ids": ids, "labels": labels})
        else:
            ids = tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"]
            if not ids:
                ids = [tokenizer.pad_token_id]
            item = {"input_ids": ids}
            if dataset.task == "lm":
                item["labels"] = list(ids)
            else:
                item["label"] = label_ids[i]
            items.append(item)
    return items


def collate(items: list[dict], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Padded to the longest item of this batch.

    ``left``: for decoder classifiers, which score the last position. Given input ids they
    find the last real token themselves, but given embeddings (prompt tuning) they cannot,
    so real tokens go last; position ids then count real tokens only (GPT-2's absolute
    positions must not shift with the padding).
    """
    if "lengths" in items[0]:  # packed rows (--packing)
        return collate_packed(items, filler_id(pad_id))
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long) if "labels" in items[0] else None
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(length - n, length) if left else slice(0, n)
        ids[row, sl] = torch.tensor(it["input_ids"])
        mask[row, sl] = 1
        if labels is not None:
            labels[row, sl] = torch.tensor(it["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if left:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if labels is not None:
        batch["labels"] = labels
    if "label" in items[0]:
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a seeded permutation, reproducible on resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
