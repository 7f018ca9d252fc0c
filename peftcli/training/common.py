"""What every training schedule shares (module level), and ``peftcli evaluate`` with them.

The run directory's file names and their JSON reading and atomic writing, the run's
configuration (the saved one when resuming) and base model directory, the device, the
classification head a new base needs, the hooks a multi-pass method adds to one pass of the
loop, and the validation pass (loss and accuracy) that the loop and ``peftcli evaluate`` both
report. It imports none of the schedules: ``one_pass``, ``phased``, ``lottery`` and the
dispatcher ``loop`` import it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import torch

from peftcli.errors import UsageError
from peftcli.training.batching import IGNORE, collate
from peftcli.training.config import TrainConfig

ARGS_FILE = "train_args.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically (sorted keys, indented, a final newline)."""
    from peftcli.checkpoint.atomic import atomic_output, open_new_file

    with atomic_output(path, directory=False, force=True) as tmp:
        with open_new_file(tmp) as f:
            f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA where there is one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` cuda but no CUDA device is available", "use `device` cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_config(run: str, cfg: TrainConfig | None, resume: bool) -> TrainConfig:
    """The run's configuration: the one saved in the run when resuming, else ``cfg``."""
    args_path = os.path.join(run, ARGS_FILE)
    if resume:
        if not os.path.isfile(args_path):
            raise UsageError(f"{run}: nothing to resume (no {ARGS_FILE})", "start a run with `data` first")
        saved = read_json(args_path)
        if isinstance(saved, dict) and "head_lr" not in saved and saved.get("lr") is not None:
            saved = {**saved, "head_lr": saved["lr"]}  # a run from before head_lr trained its head at lr
        return TrainConfig(**saved)
    if cfg is None or cfg.data is None:
        raise UsageError("`data` is required", "e.g. `peftcli train runs/lora/ --data train.jsonl`")
    return cfg


def with_model_dir(cfg: TrainConfig, adapter) -> TrainConfig:
    """``cfg`` with its base model directory (or llama GGUF file): ``--model``, else the one the adapter records."""
    from peftcli.checkpoint.gguf_model import is_gguf

    model_dir = cfg.model or (adapter.config.get("base_model_name_or_path") if adapter is not None else None)
    if not model_dir or not (os.path.isdir(model_dir) or (is_gguf(model_dir) and not cfg.full)):
        raise UsageError(f"base model directory {model_dir!r} not found", "pass `model` DIR")
    return dataclasses.replace(cfg, model=model_dir)


def head_modules(missing_keys: list[str]) -> list[str]:
    """Top modules of parameters transformers had to initialise (the new task head)."""
    heads: list[str] = []
    for key in missing_keys:
        module = key.rsplit(".", 1)[0]
        if not any(module == h or module.startswith(h + ".") for h in heads):
            heads.append(module)
    return heads


def is_decoder(model_dir: str) -> bool:
    """A causal LM checkpoint (its classifier scores the last position), from config.json."""
    from peftcli.checkpoint.gguf_model import is_gguf, model_config

    archs = (model_config(model_dir) if is_gguf(model_dir) else read_json(os.path.join(model_dir, "config.json"))).get("architectures") or []
    return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


@dataclasses.dataclass
class TrainHooks:
    """What multi-phase methods add to one run of the loop (diff-pruning's L1, lottery masks)."""

    start: Callable[..., None] | None = None  # (adapted, resumed) once the model is built
    extra_loss: Callable[..., torch.Tensor] | None = None  # (adapted) -> a term added to each micro-batch loss
    after_step: Callable[..., None] | None = None  # (adapted, step) after each optimizer step


def evaluate(adapted, items: list[dict], pad_id: int, batch_size: int, device, task: str, left_pad: bool = False) -> dict:
    """Validation loss and, for classification, accuracy.

    The loss is the mean over what the training loss averages: examples for classification,
    predicted tokens for ``lm``/``sft`` (a batch's loss is its mean over tokens, so weighting
    batches by examples would make the number depend on the batch size and on padding).
    """
    adapted.eval()
    total_loss, n, correct, examples = 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id, left_pad).items()}
            out = adapted(**batch)
            if task == "classify":
                weight = len(chunk)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            else:  # causal LM losses predict token t+1 from t: the first label never counts
                weight = int((batch["labels"][:, 1:] != IGNORE).sum())
            total_loss += float(out.loss) * weight if weight else 0.0
            n += weight
            examples += len(chunk)
    n = max(n, 1)
    result = {"eval_loss": total_loss / n}
    if task == "classify":
        result["eval_accuracy"] = correct / examples
    return result
