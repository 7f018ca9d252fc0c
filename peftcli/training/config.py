"""The options of ``peftcli train``, declared once (CLI flags, recipes, ``train_args.json``).

Kept free of torch so that ``peftcli --help`` stays instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from peftcli.errors import UsageError
from peftcli.options import MAX_STEPS, check_declared, option
from peftcli.training.data import COLUMNS_HELP, TASKS, parse_columns

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    model: str | None = option(None, metavar="DIR", help="base model directory (default: the adapter's base_model_name_or_path)")
    data: str | None = option(None, metavar="FILE", help="training data: .jsonl, .csv or .tsv")
    eval_data: str | None = option(None, "--eval", metavar="FILE", help="validation data (same format)")
    task: str | None = option(None, metavar="lm|sft|classify", help="override the task detected from the data's columns")
    columns: str | None = option(None, metavar="ROLE=COLUMN,...", help=COLUMNS_HELP)
    steps: int | None = option(None, max=MAX_STEPS, help="optimizer steps to run (default: 1 epoch unless --epochs)")
    epochs: float | None = option(None, help="epochs to run instead of --steps")
    batch_size: int = option(8, help="examples per micro-batch (per worker) (default 8)")
    grad_accum: int = option(1, help="micro-batches per optimizer step (default 1)")
    lr: float | None = option(None, help="peak learning rate (default: the method's, e.g. 1e-3 for lora; see `peftcli inspect --budget METHOD`)")
    head_lr: float | None = option(
        None, help="peak learning rate of a new classification head (default: the method's, e.g. 2e-3 for lora)"
    )
    loraplus_ratio: float | None = option(
        None, help="LoRA+: train lora_B, and LoRA's 1-D parameters (DoRA magnitudes, lora_B biases), at this multiple of "
        "the learning rate, lora_A at the rate, as PEFT's create_loraplus_optimizer (lora runs only; the paper suggests 16)"
    )
    weight_decay: float = option(0.0, help="AdamW weight decay, never on biases or norms (default 0)")
    warmup_steps: int | None = option(None, max=MAX_STEPS, help="linear warmup steps (default: --warmup-ratio of the steps)")
    warmup_ratio: float | None = option(None, help="warm up over this share of the steps (default: the method's, 0.06)")
    schedule: str | None = option(None, metavar="linear|cosine|constant", help="decay after warmup (default: the method's, linear)")
    max_grad_norm: float = option(1.0, help="clip the gradient norm; 0 disables (default 1.0)")
    max_length: int = option(128, help="truncate examples to this many tokens (default 128)")
    train_seed: int = option(0, help="seed of data order, dropout and a new head (default 0)")
    eval_every: int | None = option(None, max=MAX_STEPS, help="evaluate every N steps (default: at the end only, when --eval is given)")
    patience: int | None = option(None, max=MAX_STEPS, help="stop after N evaluations without a better validation loss")
    save_every: int | None = option(None, max=MAX_STEPS, help="write a resumable checkpoint every N steps")
    keep_checkpoints: int = option(2, max=MAX_STEPS, help="how many of the newest checkpoints to keep (default 2)")
    log_every: int = option(10, max=MAX_STEPS, help="log a metrics line every N steps (default 10)")
    device: str = option("auto", metavar="auto|cpu|cuda", help="where to train (default auto: CUDA when present)")
    limit: int | None = option(None, help="use only the first N training examples")
    threads: int | None = option(
        None,
        help="CPU threads torch computes with, at most 4 per core (default: torch's, one per core; "
        "on a busy machine 1 can be much faster)",
    )
    full: bool = option(False, help="full fine-tuning of --model: every parameter trains, RUN becomes a checkpoint")
    phase1_steps: int | None = option(
        None, max=MAX_STEPS, help="lt-sft, diff-pruning, lottery: steps of each full fine-tuning phase/round (default: --steps)"
    )
    phase1_lr: float | None = option(
        None, help="lt-sft, diff-pruning, lottery: learning rate of the full fine-tuning (default: --lr if given, else full fine-tuning's)"
    )
    packing: bool = option(
        False, help="lm, sft: pack several examples into each row of up to --max-length tokens (attention and positions stay per "
        "example; the loss is the unpacked one's)"
    )
    chat_template: str | None = option(
        None, metavar="FILE", help="messages rows (chat sft): render them with this Jinja chat template instead of the tokenizer's"
    )
    # --- the base's precision (peftcli.training.precision) ---
    base_dtype: str | None = option(
        None, metavar="fp32|bf16|fp16",
        help="dtype the frozen base weights are held and computed in; φ and its optimizer state stay fp32 "
        "(default: fp32 on CPU, the checkpoint's own dtype on CUDA)",
    )
    quantize: str | None = option(
        None, metavar="nf4|int8", help="hold the frozen linear layers in 4-bit NF4 with double quantisation (QLoRA), or int8 rows "
        "with one scale each; the adapter stays plain fp32"
    )
    gradient_checkpointing: bool = option(
        False, help="recompute activations in the backward instead of keeping them: less memory, about a third more compute"
    )
    # --- several workers (peftcli.training.distributed, peftcli.training.sharding) ---
    shard: bool = option(
        False, help="with --nproc N: shard the model across the workers with FSDP2, each holding 1/N of the frozen base "
        "(adapters; not with --quantize)"
    )

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise UsageError(f"unknown `task` {self.task!r}", "choose lm, sft or classify")
        parse_columns(self.columns)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise UsageError(f"unknown `schedule` {self.schedule!r}", "choose linear, cosine or constant")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"unknown `device` {self.device!r}", "choose auto, cpu or cuda")
        for name in ("batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                flag = f"`{name}`"
                raise UsageError(f"{flag} must be positive", f"e.g. {flag} {getattr(TrainConfig, name)}, its default")
        for name in ("steps", "eval_every", "patience", "save_every", "limit", "phase1_steps", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = f"`{name}`"
                raise UsageError(f"{flag} must be positive", f"give {flag} a value of at least 1, or leave it out")
        if self.epochs is not None and self.epochs <= 0:
            raise UsageError("`epochs` must be positive", "e.g. `epochs` 1; fractions such as 0.5 work too")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give `steps` or `epochs`, not both", "drop one of them")
        if self.packing and self.task == "classify":
            raise UsageError("`packing` does not apply to `task` classify", "drop `packing`: it packs lm and sft examples")
        if self.phase1_lr is not None and self.phase1_lr <= 0:
            raise UsageError("`phase1_lr` must be positive", "e.g. `phase1_lr` 1e-4, or leave it out to use `lr`")
        for name in ("lr", "head_lr", "loraplus_ratio"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UsageError(f"`{name}` must be positive", f"e.g. `{name}` 1e-3, or leave it out for the method's default")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise UsageError("`warmup_ratio` must be in [0, 1)", "e.g. `warmup_ratio` 0.06, or leave it out for the method's default")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise UsageError("give `warmup_steps` or `warmup_ratio`, not both", "drop one of them")
        if self.weight_decay < 0 or (self.warmup_steps or 0) < 0 or self.max_grad_norm < 0:
            raise UsageError(
                "`weight_decay`, `warmup_steps` and `max_grad_norm` must be non-negative",
                "the defaults are `weight_decay` 0, `max_grad_norm` 1.0 and the method's warmup",
            )
        check_threads(self.threads)
        self._check_precision()
        check_declared(self)  # nan, inf and out-of-range values also from a run's train_args.json
        if self.loraplus_ratio is not None and self.full:
            raise UsageError("`loraplus_ratio` applies to lora runs", "drop `loraplus_ratio`: full fine-tuning has no lora_A and lora_B")
        if self.full and self.head_lr is not None and self.head_lr != self.lr:
            raise UsageError("`head_lr` applies to adapter runs", "full fine-tuning trains the head at `lr`: drop `head_lr`")
        if self.full and self.model is None:
            raise UsageError("`full` needs `model` DIR, the model to fine-tune", "add `model` with the model directory")
        if self.patience is not None and self.eval_data is None:
            raise UsageError("`patience` needs `eval_data`", "add `eval_data` FILE with validation data, or drop `patience`")

    def _check_precision(self) -> None:
        if self.base_dtype is not None and self.base_dtype not in BASE_DTYPES:
            raise UsageError(f"unknown `base_dtype` {self.base_dtype!r}", "choose fp32, bf16 or fp16")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise UsageError(f"unknown `quantize` {self.quantize!r}", "choose nf4 (4-bit NormalFloat, as QLoRA) or int8")
        if not isinstance(self.shard, bool):
            raise UsageError(f"`shard` {self.shard!r} is not true or false", "pass the flag or leave it out")
        if not isinstance(self.gradient_checkpointing, bool):
            raise UsageError(f"`gradient_checkpointing` {self.gradient_checkpointing!r} is not true or false", "pass the flag or leave it out")


BASE_DTYPES = ("fp32", "bf16", "fp16")
QUANTIZE = ("nf4", "int8")  # peftcli.quantize.SCHEMES (this module imports no torch)
THREADS_PER_CORE = 4  # more threads than this only wait on each other


def check_threads(threads: int | None) -> int | None:
    """``--threads`` (also as read back from a run's train_args.json), at most 4 per core."""
    if threads is None:
        return None
    cap = THREADS_PER_CORE * (os.cpu_count() or 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cap:
        raise UsageError(
            f"`threads` {threads!r} is not a thread count for this machine",
            f"give 1 to {cap}, {THREADS_PER_CORE} per core, or leave it out for torch's default",
        )
    return threads


def check_total_steps(total: int, what: str = "`epochs`") -> int:
    """A run's step count (from --epochs and the data) must be one that can finish."""
    if total > MAX_STEPS:
        raise UsageError(f"{what} makes {total:,} steps, more than the {MAX_STEPS:,} a run may have", "give fewer `epochs` or `steps`")
    return total
