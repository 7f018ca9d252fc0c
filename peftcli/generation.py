"""Module level: greedy completions of ``sft`` examples, scored against their references.

``peftcli evaluate`` on ``sft`` data (prompt/completion rows or chat ``messages``) also asks
the model to answer: each prompt is completed greedily (the argmax token, no sampling, no
repetition penalty, none of the checkpoint's ``generation_config`` but its end tokens), up to
``max_new_tokens`` tokens or an end token, and the text is compared with the reference.

- **Prompt and reference.** A prompt/completion row: the prompt tokenised as training
  tokenises it, the reference its completion. A conversation: the messages before its last
  assistant message, rendered with the chat template and the generation prompt; the
  reference is that last assistant message (earlier assistant turns are context, as given).
  A prompt longer than ``max_length`` keeps its last ``max_length`` tokens, the ones next to
  the answer; how many were cut is reported.
- **Scores** (SQuAD's definitions, Rajpurkar et al. 2016): both texts lower-cased, stripped of
  punctuation and of the articles a/an/the, whitespace collapsed. Exact match is 1 when the
  normalised texts are equal; token F1 is the harmonic mean of precision and recall of the
  normalised words (a bag of words, counted with multiplicity); both are averaged over
  examples.
- **Classification by generation.** With ``labels`` (``positive,negative``) every reference
  must be one of the labels, and a completion counts as that label only when its normalised
  text equals the label's: a completion that names no label is ``unmatched`` and wrong, never
  mapped to the nearest label.
- **Decoding.** Causal LMs whose adapter leaves the inputs alone (LoRA, IA³, adapters: φ lives
  in the layers) decode with the key/value cache; prompt and prefix tuning rewrite the inputs
  or the cache on every call, so they re-read the whole sequence each step, which gives the
  same tokens (a test holds the two loops equal) at a higher cost. So does a checkpoint that
  is not a causal LM (an encoder given sft data): its forward is what is decoded. Rows are left-padded in
  batches, with position ids that count real tokens only.

``predictions`` writes one JSON line per example (its line in the data, the prompt's text,
the reference, the completion and its scores), atomically.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

from peftcli.errors import BadInputError, UsageError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1; two empty answers agree (1.0), one empty answer scores 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_labels(text: str | None) -> list[str] | None:
    """``labels`` "positive,negative" as a list; distinct after normalisation, none empty."""
    if text is None:
        return None
    labels = [t.strip() for t in text.split(",")]
    if len(labels) < 2:
        raise UsageError(f"`labels` {text!r} must name at least two labels", "e.g. `labels` positive,negative")
    for label in labels:
        if not normalize_answer(label):
            raise UsageError(
                f"`labels`: {label!r} is empty once normalised (lower case, no punctuation, no articles a/an/the)",
                "give each label a word that survives normalisation",
            )
    seen: dict[str, str] = {}
    for label in labels:
        key = normalize_answer(label)
        if key in seen:
            raise UsageError(f"`labels` {seen[key]!r} and {label!r} are the same answer once normalised", "give labels that differ in their words")
        seen[key] = label
    return labels


@dataclass
class Prompt:
    ids: list[int]
    reference: str
    line: int
    truncated: bool


def prompts_of(dataset, tokenizer, max_length: int, chat_template: str | None, template_name: str = "the tokenizer's") -> list[Prompt]:
    """The prompt and the reference answer of every ``sft`` example of ``dataset``."""
    from peftcli.training.chat import render_chat

    prompts = []
    for ex in dataset.examples:
        where = f"{dataset.path}:{ex.line}"
        if ex.messages is not None:
            if chat_template is None:
                raise UsageError(f"{where}: messages rows need a chat template", "pass `chat_template` FILE")
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            ids = render_chat(tokenizer, ex.messages[:last], chat_template, template_name, where, generation=True) if last else []
            reference = ex.messages[last]["content"]
        else:
            ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
            reference = ex.completion
        if not ids:
            raise BadInputError(f"{where}: the prompt is empty, so there is nothing to complete", "give the example a prompt (or a user turn before the answer)")
        prompts.append(Prompt(ids=list(ids[-max_length:]), reference=reference, line=ex.line, truncated=len(ids) > max_length))
    return prompts


def stop_ids(tokenizer, model) -> set[int]:
    """The tokens that end a completion: the tokenizer's end of sequence and the end tokens of
    the checkpoint's generation config (chat models list their end-of-turn token there)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    inner = getattr(model, "model", model)  # an AdaptedModel wraps the transformers model
    for config in (getattr(inner, "generation_config", None), getattr(inner, "config", None)):
        eos = getattr(config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if isinstance(eos, int) else set())
    return ids


def greedy_complete(model, prompts: list[list[int]], pad_id: int, stops: set[int], max_new_tokens: int, batch_size: int, device, cache: bool) -> list[list[int]]:
    """The greedy continuation of each prompt (its stop token excluded), batch by batch."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += _greedy_batch(model, prompts[i : i + batch_size], pad_id, stops, max_new_tokens, device, cache)
    return out


def _greedy_batch(model, prompts: list[list[int]], pad_id: int, stops: set[int], max_new_tokens: int, device, cache: bool) -> list[list[int]]:
    import torch

    from peftcli.methods.prompting.prefix_cache import cache_argument

    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):  # left-padded: every row's next token is at the end
        ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stops), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    past = None
    step_ids, step_positions = ids, positions
    # transformers 5 names the cache argument ``cache`` (``past_key_values`` before)
    argument = cache_argument(getattr(model, "model", model)) if cache else None
    if cache and argument is None:
        cache = False  # a model whose forward takes no cache re-reads the sequence
    with torch.no_grad():
        for _ in range(max_new_tokens):
            kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask, "position_ids": step_positions}
            if cache and argument is not None:
                kwargs.update({"use_cache": True, argument: past})
            result = model(**kwargs)
            token = result.logits[:, -1, :].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            new.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            next_position = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            ids = torch.cat([ids, token[:, None]], dim=1)
            if cache:
                past = result[argument] if argument in result else result.past_key_values
                step_ids, step_positions = token[:, None], next_position
            else:
                step_ids, step_positions = ids, positions
    generated = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    completions = []
    for row in generated:
        end = next((k for k, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:end])
    return completions


def score(predictions: list[str], prompts: list[Prompt], labels: list[str] | None, data_path: str) -> tuple[dict, list[dict]]:
    """The summary numbers and one record per example."""
    records: list[dict[str, Any]] = []
    for text, p in zip(predictions, prompts):
        records.append({"line": p.line, "reference": p.reference, "prediction": text, "exact_match": exact_match(text, p.reference), "f1": token_f1(text, p.reference)})
    n = len(records)
    summary: dict[str, Any] = {
        "examples": n,
        "exact_match": sum(r["exact_match"] for r in records) / n,
        "f1": sum(r["f1"] for r in records) / n,
        "truncated_prompts": sum(p.truncated for p in prompts),
    }
    if labels is not None:
        by_text = {normalize_answer(label): label for label in labels}
        check_references(prompts, labels, data_path)
        correct = unmatched = 0
        for r in records:
            gold = by_text[normalize_answer(r["reference"])]
            predicted = by_text.get(normalize_answer(r["prediction"]))
            r["label"] = predicted
            unmatched += predicted is None
            correct += predicted == gold
        summary.update(labels=labels, label_accuracy=correct / n, unmatched=unmatched)
    return summary, records


def check_references(prompts: list[Prompt], labels: list[str] | None, data_path: str) -> None:
    """With ``labels``, every reference must be one of them (checked before any generation)."""
    if labels is None:
        return
    known = {normalize_answer(label) for label in labels}
    for p in prompts:
        if normalize_answer(p.reference) not in known:
            raise BadInputError(
                f"{data_path}:{p.line}: the reference {p.reference[:60]!r} is none of `labels` ({', '.join(labels)})",
                "give every example one of the labels as its answer, or leave `labels` out",
            )


def check_predictions_path(path: str | None, inputs: list[str], force: bool) -> None:
    """Refuse ``predictions`` FILE before any work: an input, or an existing file without ``force``."""
    from peftcli.checkpoint.atomic import check_output_path

    if path is None:
        return
    if os.path.lexists(path) and not force:
        raise UsageError(f"`predictions` {path} already exists", "pass `force` to replace it, or choose another file")
    check_output_path(path, inputs, force)


def write_predictions(path: str, records: list[dict], prompts_text: list[str], inputs: list[str], force: bool) -> None:
    """One JSON line per example, written atomically (the file appears whole or not at all)."""
    from peftcli.checkpoint.atomic import atomic_output

    with atomic_output(path, directory=False, inputs=inputs, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record, prompt in zip(records, prompts_text):
                f.write(json.dumps({"line": record["line"], "prompt": prompt, **{k: v for k, v in record.items() if k != "line"}}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def prepare(dataset, tokenizer, opts, chat_template: str | None, template_name: str) -> list[Prompt]:
    """The prompts of ``dataset``, their references checked against ``labels``: everything that
    can be refused is refused here, before a model is loaded."""
    prompts = prompts_of(dataset, tokenizer, opts.max_length, chat_template, template_name)
    check_references(prompts, parse_labels(opts.labels), dataset.path)
    return prompts


def generate_and_score(loaded_model, prompts: list[Prompt], dataset, tokenizer, opts, device, causal: bool) -> tuple[dict, list[dict], list[str]]:
    """Complete every prompt (from ``prepare``) and score the completions (the ``generation``
    part of an evaluation document), with the records and prompt texts for ``predictions``.
    ``causal``: the checkpoint is a causal LM, whose key/value cache can be reused."""
    labels = parse_labels(opts.labels)
    cache = causal and not getattr(loaded_model, "rewrites_inputs", False)
    tokens = greedy_complete(
        loaded_model, [p.ids for p in prompts], tokenizer.pad_token_id, stop_ids(tokenizer, loaded_model),
        opts.max_new_tokens, opts.batch_size, device, cache,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    summary, records = score(texts, prompts, labels, dataset.path)
    summary.update(max_new_tokens=opts.max_new_tokens, cache=cache, stopped=sum(len(t) < opts.max_new_tokens for t in tokens))
    prompt_texts = [tokenizer.decode(p.ids, skip_special_tokens=False) for p in prompts]
    return summary, records, prompt_texts
