"""One pass of the training loop every method goes through (module level): prepare → step →
evaluate → save.

AdamW (no weight decay on biases and norms), warmup then linear/cosine/constant decay,
gradient accumulation, clipping, ``--steps`` or ``--epochs``, everything seeded. Evaluation
every ``eval_every`` steps keeps the best adapter by validation loss in ``<run>/best`` and
stops after ``patience`` evaluations without improvement. Checkpoints every ``save_every``
steps hold optimizer, scheduler, RNG and data position, so ``resume`` continues bit-exactly
on CPU. Ctrl-C saves a checkpoint and raises ``Interrupted`` (exit code 3). Every run also
ends with a checkpoint of its last step, so ``resume`` with ``steps`` N continues a finished
run to step N (the lr schedule from there on is an N-step run's: ``_continued``).

``prepare`` builds a ``Pass`` (data, model, optimizer: fixed for the pass); a ``PassState``
(step, data position, early-stopping state: what a checkpoint saves) starts fresh or from the
checkpoint resumed; ``train_step``, ``validate`` and ``save_checkpoint`` advance and record it;
``finish`` writes the result. Multi-pass runs (``phased``, ``lottery``) call ``train_adapter``
once per pass.

The training loss shown (progress, ``metrics.jsonl``'s ``loss``, the summary's ``final_loss``)
is one quantity: the mean of the last ``log_every`` steps' losses (``window_loss``).

The base's precision (``precision``): on CPU the base stays fp32 whatever the checkpoint
dtype (these CPUs lack bf16 units) unless ``base_dtype`` says otherwise; on CUDA it is the
checkpoint's dtype and the forward runs under bf16 (fp16 for an fp16 base) autocast with
fused AdamW. ``quantize`` holds the frozen linears in NF4; φ and AdamW's moments are fp32
always.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import warnings
from typing import Callable

import torch

from peftcli.errors import BadInputError, Interrupted, UsageError
from peftcli.training import distributed, precision, sharding
from peftcli.training import state as ckpt_state
from peftcli.training.batching import IGNORE, collate, encode, epoch_order, load_tokenizer
from peftcli.training.defaults import defaults_for, warmup_steps, with_defaults
from peftcli.training.common import (
    ARGS_FILE, BEST_DIR, LABELS_FILE, METRICS_FILE, TrainHooks, evaluate, head_modules, is_decoder, read_json,
    resolve_config, resolve_device, with_model_dir, write_json,
)
from peftcli.training.config import TrainConfig, check_total_steps
from peftcli.training.data import load_dataset
from peftcli.training.chat import resolve_template
from peftcli.training.packing import prepare_packing


@dataclasses.dataclass(eq=False)
class Pass:
    """What one pass of the loop trains, fixed once prepared: data, model, optimizer, schedule."""

    run: str
    cfg: TrainConfig
    task: str
    labels: list[str] | None
    pad_id: int
    train_items: list[dict]
    eval_items: list[dict] | None
    device: torch.device
    world: distributed.World
    adapted: torch.nn.Module
    forward: torch.nn.Module | None  # the model or its DDP wrapper (dropped before teardown)
    named: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int
    checkpoint: str | None  # the checkpoint this pass resumes from
    hooks: TrainHooks | None
    pass_lr: str | None
    left_pad: bool = False
    sync_by_hand: bool = False
    autocast: contextlib.AbstractContextManager = dataclasses.field(default_factory=contextlib.nullcontext)
    scaler: torch.amp.GradScaler | None = None  # an fp16 base: dynamic loss scaling
    packing_efficiency: float | None = None  # --packing: the fraction of the rows' token slots holding example tokens

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world.size


@dataclasses.dataclass
class PassState:
    """What changes from step to step; a checkpoint saves all of it but the counters of this process."""

    step: int = 0
    epoch: int = 0
    offset: int = 0  # position in this epoch's order
    best: dict = dataclasses.field(default_factory=lambda: {"eval_loss": None, "step": None, "eval_accuracy": None})
    bad_evals: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    finished: bool = False  # a resumed pass that had already ended
    stopped_early: bool = False
    order: list[int] = dataclasses.field(default_factory=list)
    tokens: int = 0
    start_time: float = 0.0
    skipped_steps: int = 0  # fp16: steps whose scaled gradients overflowed (no update; the scale halves)

    def trainer_state(self, p: Pass) -> dict:
        """What a checkpoint saves; sharded (``shard``), every worker must call it (it gathers)."""
        optimizer = sharding.full_optimizer_state(p.optimizer) if p.cfg.shard else p.optimizer.state_dict()
        state = {
            "optimizer": optimizer, "scheduler": p.scheduler.state_dict(), "rng": ckpt_state.rng_state(),
            "step": self.step, "epoch": self.epoch, "offset": self.offset, "best": self.best, "bad_evals": self.bad_evals,
            "recent_losses": self.losses[-p.cfg.log_every :],  # so the first metrics line after a resume is the same
        }
        if p.scaler is not None:  # the scale a resumed run goes on from (bit-exact resume)
            state["scaler"] = p.scaler.state_dict()
            state["skipped_steps"] = self.skipped_steps
        return state


def train_adapter(
    run: str, cfg: TrainConfig | None = None, *, resume: bool = False, force: bool = False, log: Callable[[str], None] | None = None,
    progress=None, return_model: bool = False, hooks: TrainHooks | None = None, finished_ok: bool = False,
    pass_lr: str | None = None, continue_to: int | None = None, shard: bool | None = None,
):
    """One pass of the loop over the adapter (or, with ``cfg.full``, the whole model) in ``run``.

    ``finished_ok``: resuming a pass whose newest checkpoint is its end is not an error but
    the pass's result (a multi-pass run killed between a pass and the work after it).
    ``pass_lr``: for one pass of a multi-pass run, the option that set ``cfg.lr`` (`` `lr` ``,
    or `` `phase1_lr` `` for the full fine-tuning passes), named if training diverges; such a
    pass writes no final checkpoint (its directory is deleted or kept as a result).
    ``continue_to`` (with ``resume``): train until step N instead of the saved total; see
    ``_continued``.
    """
    cfg, checkpoint = _check_run(run, cfg, resume, force, continue_to)
    if shard is not None and shard != cfg.shard:  # a resumed run is sharded as this invocation says
        cfg = dataclasses.replace(cfg, shard=shard)
    p = prepare(run, cfg, checkpoint, hooks, pass_lr)
    cfg = p.cfg  # completed with the method's defaults
    st = _restore(p, finished_ok, continue_to) if checkpoint is not None else _start_fresh(p)
    distributed.barrier(p.world)  # workers start once rank 0 has reset the run directory
    st.order = epoch_order(len(p.train_items), cfg.train_seed, st.epoch)
    st.start_time = time.perf_counter()
    st.stopped_early = st.finished and st.step < p.total  # a resumed pass that early stopping had ended
    if p.world.distributed and len(p.train_items) < p.global_batch:
        raise UsageError(
            f"{len(p.train_items)} training examples are fewer than one global batch ({cfg.batch_size} × {p.world.size} workers)",
            "lower `batch_size` or `nproc`",
        )
    p.adapted.train()
    if not p.world.main:
        progress, log = None, None
    if log is not None and checkpoint is None:
        head = f", head {cfg.head_lr:g}" if cfg.head_lr is not None and p.adapted.head_parameter_names() else ""
        head += f", lora_B {(cfg.lr or 0.0) * cfg.loraplus_ratio:g} (LoRA+)" if cfg.loraplus_ratio is not None else ""
        log(f"lr {cfg.lr:g}{head}, warmup {warmup_steps(cfg, p.total)} of {p.total} steps, {cfg.schedule} decay")
    if log is not None and p.packing_efficiency is not None:
        examples = sum(len(row["lengths"]) for row in p.train_items)
        log(f"packing: {examples} examples in {len(p.train_items)} rows of up to {cfg.max_length} tokens, {p.packing_efficiency:.1%} of them example tokens")
    run_steps(p, st, log or (lambda line: None), progress)
    summary = finish(p, st)
    return (summary, p.adapted) if return_model else summary


def train_full_pass(directory: str, cfg: TrainConfig, *, resume: bool, world, log, progress, hooks: TrainHooks | None) -> dict:
    """One full fine-tuning pass of a multi-pass run (LT-SFT's phase 1, a lottery round) in
    ``directory``: resumed from its checkpoints where it has some, else from scratch (the
    directory emptied by rank 0 first). Its end is its result, also when resumed there."""
    if resume and ckpt_state.latest_checkpoint(directory) is not None:
        return train_adapter(directory, None, resume=True, log=log, progress=progress, hooks=hooks, finished_ok=True, pass_lr="`phase1_lr`")
    if world.main:
        shutil.rmtree(directory, ignore_errors=True)
    distributed.barrier(world)
    return train_adapter(directory, cfg, force=True, log=log, progress=progress, hooks=hooks, pass_lr="`phase1_lr`")


# --- prepare ---------------------------------------------------------------------------


def _check_run(run: str, cfg: TrainConfig | None, resume: bool, force: bool, continue_to: int | None) -> tuple[TrainConfig, str | None]:
    """The pass's configuration and the checkpoint it resumes from; refusals before anything is read."""
    cfg = resolve_config(run, cfg, resume)
    if cfg.full:
        _prepare_full_run(run, cfg, resume, force)
    elif not os.path.isfile(os.path.join(run, "adapter_config.json")):
        raise BadInputError(f"{run}: not an adapter directory", "create one with `peftcli inject METHOD MODEL -o RUN`, or pass `full`")
    if not resume and os.path.exists(os.path.join(run, ARGS_FILE)) and not force:
        raise UsageError(f"{run} has already been trained", "pass `resume` to continue it or `force` to train it again")
    checkpoint = ckpt_state.latest_checkpoint(run) if resume else None
    if resume and checkpoint is None:
        raise UsageError(f"{run}: no checkpoint to resume from", "train with `save_every` N to write checkpoints")
    if continue_to is not None:
        cfg = _continued(run, cfg, checkpoint, continue_to)
    return cfg, checkpoint


def prepare(run: str, cfg: TrainConfig, checkpoint: str | None, hooks: TrainHooks | None, pass_lr: str | None) -> Pass:
    """Read the data, build the model on its device and its optimizer; run the hooks' ``start``."""
    from peftcli.artifacts.adapter_dir import read_adapter

    adapter = None if cfg.full else read_adapter(checkpoint or run)
    cfg = with_model_dir(cfg, adapter)
    sharding.check(cfg, adapter, int(os.environ.get("WORLD_SIZE", "1")))
    _check_inputs(cfg.model, adapter, run)
    task, labels, tokenizer, train_items, eval_items = _load_data(run, cfg, checkpoint is not None)
    cfg = with_defaults(cfg, defaults_for(cfg, adapter.config if adapter is not None else None), task)

    torch.manual_seed(cfg.train_seed)  # a new classification head is initialised from this
    device = resolve_device(cfg.device)
    dtype = precision.resolve(cfg, adapter, device)
    world = distributed.setup(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    adapted, deferred = _build_model(cfg, adapter, checkpoint, task, labels, tokenizer.pad_token_id, dtype)
    precision.prepare_base(adapted, cfg, dtype, cfg.model, deferred)
    if cfg.shard:  # FSDP2 moves each worker's shards to its device
        sharding.shard(adapted, device, world.size)
    else:
        adapted.to(device)
    packing_efficiency = None
    if cfg.packing:  # the rows replace the examples: epochs, order and resume count rows
        train_items, packing_efficiency = prepare_packing(task, adapted, train_items, cfg.max_length, device, tokenizer.pad_token_id)
    # DDP averages φ's gradients across workers; every worker then applies the same update.
    # A sparse φ (LT-SFT, diff-pruning) gets its gradients from hooks after backward, which
    # DDP's reducer cannot see: those are averaged by hand before the update.
    sync_by_hand = world.distributed and adapted.grad_carriers
    ddp = world.distributed and not sync_by_hand and not cfg.shard  # FSDP2 averages the sharded gradients itself
    forward = torch.nn.parallel.DistributedDataParallel(adapted) if ddp else adapted

    per_step = cfg.batch_size * cfg.grad_accum * world.size
    steps_per_epoch = max(1, len(train_items) // per_step)
    total = check_total_steps(cfg.steps or max(1, round((cfg.epochs or 1.0) * steps_per_epoch)))
    named = adapted.phi_parameters()
    b_lr = (cfg.lr or 0.0) * cfg.loraplus_ratio if cfg.loraplus_ratio is not None else None  # lr: set by with_defaults
    groups = _param_groups(named, cfg.weight_decay, adapted.head_parameter_names(), cfg.head_lr if cfg.head_lr != cfg.lr else None, b_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    if hooks is not None and hooks.start is not None:
        hooks.start(adapted, checkpoint is not None)
    return Pass(
        run=run, cfg=cfg, task=task, labels=labels, pad_id=tokenizer.pad_token_id, train_items=train_items,
        eval_items=eval_items, device=device, world=world, adapted=adapted, forward=forward, named=named,
        optimizer=optimizer, scheduler=scheduler, total=total, checkpoint=checkpoint, hooks=hooks, pass_lr=pass_lr,
        left_pad=task == "classify" and is_decoder(cfg.model), sync_by_hand=sync_by_hand,
        autocast=torch.autocast("cuda", dtype=precision.autocast_dtype(dtype)) if device.type == "cuda" else contextlib.nullcontext(),
        scaler=precision.loss_scaler(dtype, device), packing_efficiency=packing_efficiency,
    )


def _load_data(run: str, cfg: TrainConfig, resume: bool):
    """The task, its labels (a resumed run's saved order), the tokenizer and the encoded examples."""
    data = load_dataset(cfg.data, cfg.task, cfg.limit, cfg.columns)
    if resume and os.path.isfile(os.path.join(run, LABELS_FILE)):
        labels = read_json(os.path.join(run, LABELS_FILE))["labels"]
    else:
        labels = data.labels
    eval_data = load_dataset(cfg.eval_data, data.task, columns=cfg.columns) if cfg.eval_data else None
    tokenizer = load_tokenizer(cfg.model)
    template, name = resolve_template(data.chat, cfg.chat_template, tokenizer, cfg.model), cfg.chat_template or "the tokenizer's"
    train_items = encode(data, tokenizer, cfg.max_length, labels, template, name)
    if data.task != "classify" and not any(_predicted_tokens(it) for it in train_items):
        raise BadInputError(f"{cfg.data}: no example has a token to predict (every text is empty?)", "check the data file")
    eval_items = encode(eval_data, tokenizer, cfg.max_length, labels, template, name) if eval_data else None
    return data.task, labels, tokenizer, train_items, eval_items


def _build_model(
    cfg: TrainConfig, adapter, checkpoint: str | None, task: str, labels: list[str] | None, pad_id: int, dtype: torch.dtype = torch.float32
):
    """The base (in ``dtype``) with the adapter attached (a new task head trained with it), or
    the whole model; and the weights left in the checkpoint until quantised (or None)."""
    from peftcli.attach import attach_adapter, load_base_model

    # Full fine-tuning resumes from the weights of its newest checkpoint, adapters from the base.
    weights_dir = checkpoint if (cfg.full and checkpoint) else cfg.model
    deferred = None
    if task == "classify":
        model, info = load_base_model(
            weights_dir, "AutoModelForSequenceClassification", dtype=dtype, num_labels=len(labels), with_info=True,
            id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id
    else:
        loaded = _load_deferred(cfg, adapter, task, weights_dir, dtype)
        model, info, deferred = loaded or (*load_base_model(weights_dir, "AutoModelForCausalLM", dtype=dtype, with_info=True), None)
    if cfg.full:
        from peftcli.training.full import FullModel

        return FullModel(model, cfg.model), None
    adapted = attach_adapter(model, adapter)
    if task == "classify" and not adapter.config.get("modules_to_save"):
        heads = head_modules(info.get("missing_keys", []))
        if not heads:
            raise BadInputError(
                f"{cfg.model}: cannot find the classification head to train",
                "its checkpoint already holds a task head of its own; pass the pretrained model without one",
            )
        adapted.add_head(heads, "SEQ_CLS")
    return adapted, deferred


def _load_deferred(cfg: TrainConfig, adapter, task: str, weights_dir: str, dtype: torch.dtype):
    """With ``quantize``, the base with its linear weights left in the checkpoint until
    quantised (``peftcli.quantize.on_load``); None where it loads whole."""
    from peftcli.checkpoint.gguf_model import is_gguf
    from peftcli.quantize import on_load

    if cfg.quantize is None or is_gguf(weights_dir) or not on_load.eligible(adapter, task, cfg.full):
        return None
    return on_load.load_deferred(weights_dir, dtype)


def _restore(p: Pass, finished_ok: bool, continue_to: int | None) -> PassState:
    """The state saved in the checkpoint the pass resumes from: optimizer, schedule, RNG, data position."""
    saved = ckpt_state.load_state(p.checkpoint)
    p.optimizer.load_state_dict(sharding.sharded_optimizer_state(p.optimizer, saved["optimizer"]) if p.cfg.shard else saved["optimizer"])
    p.scheduler.load_state_dict(saved["scheduler"])
    if continue_to is not None:  # the next step's lr is the new schedule's, not the old one's
        lrs = [base * _schedule(p.cfg, p.total)(p.scheduler.last_epoch) for base in p.scheduler.base_lrs]
        for group, lr in zip(p.optimizer.param_groups, lrs):
            group["lr"] = lr
        p.scheduler._last_lr = lrs
    ckpt_state.set_rng_state(saved["rng"])
    if p.scaler is not None and "scaler" in saved:
        p.scaler.load_state_dict(saved["scaler"])
    st = PassState(
        step=saved["step"], epoch=saved["epoch"], offset=saved["offset"], best=saved["best"], bad_evals=saved["bad_evals"],
        losses=list(saved.get("recent_losses", [])), skipped_steps=saved.get("skipped_steps", 0),
    )
    st.finished = st.step >= p.total or (p.cfg.patience is not None and st.bad_evals >= p.cfg.patience)
    if st.finished and not finished_ok:
        if st.step < p.total:
            raise UsageError(
                f"{p.run}: the run stopped early at step {st.step} ({st.bad_evals} evaluations without a better validation loss)",
                "train it again with `force` and a larger `patience`",
            )
        raise UsageError(
            f"{p.run}: nothing to resume, the run already finished at step {st.step}",
            f"continue it with `resume` `steps` N (N above {st.step}), or train it again with `force`",
        )
    if p.world.main:
        _truncate_metrics(os.path.join(p.run, METRICS_FILE), st.step)
        if continue_to is not None:
            write_json(os.path.join(p.run, ARGS_FILE), dataclasses.asdict(p.cfg))  # a later --resume goes on to N
    return st


def _start_fresh(p: Pass) -> PassState:
    """A new pass: rank 0 records its options and labels and forgets what a previous training left."""
    if p.world.main:
        write_json(os.path.join(p.run, ARGS_FILE), dataclasses.asdict(p.cfg))
        if p.labels:
            write_json(os.path.join(p.run, LABELS_FILE), {"task": p.task, "labels": p.labels})
        metrics_path = os.path.join(p.run, METRICS_FILE)
        if os.path.exists(metrics_path):
            os.unlink(metrics_path)
        for old in (ckpt_state.CHECKPOINTS, BEST_DIR):
            shutil.rmtree(os.path.join(p.run, old), ignore_errors=True)
    return PassState()


# --- step → evaluate → save --------------------------------------------------------------


# One string, so that the command to copy is one span (an f-string would split it around RUN).
_RESUME_HINT = "continue with `peftcli train {run} --resume`"


def run_steps(p: Pass, st: PassState, log: Callable[[str], None], progress) -> None:
    """Step until the total, an early stop or Ctrl-C (which saves a checkpoint, then raises)."""
    cfg = p.cfg
    with _StopFlag() as flag, _metrics_writer(os.path.join(p.run, METRICS_FILE) if p.world.main else None) as write_metric:
        if progress is not None:
            progress.start(p.total, st.step)
        while st.step < p.total and not st.finished:
            step_loss = train_step(p, st)
            _record_step(p, st, step_loss, write_metric, progress)
            if p.eval_items is not None and ((cfg.eval_every and st.step % cfg.eval_every == 0) or st.step == p.total):
                validate(p, st, write_metric, log)
            stop = distributed.any_worker(p.world, flag.stop, p.device)  # a signal seen by one worker stops all alike
            if (cfg.save_every and st.step % cfg.save_every == 0) or stop:
                save_checkpoint(p, st)
            if stop:
                raise Interrupted(f"interrupted at step {st.step}; checkpoint saved", _RESUME_HINT.format(run=p.run))
            if st.stopped_early:
                break
        if progress is not None:
            progress.finish()


def next_batch(p: Pass, st: PassState) -> dict[str, torch.Tensor]:
    """This worker's next micro-batch, in the seeded order of the current epoch."""
    if st.offset + p.global_batch > len(st.order):  # drop the ragged tail: every micro-batch is full
        st.epoch, st.offset = st.epoch + 1, 0
        st.order = epoch_order(len(p.train_items), p.cfg.train_seed, st.epoch)
    start = st.offset + p.world.rank * p.cfg.batch_size  # this worker's slice of the global micro-batch
    idx = st.order[start : start + p.cfg.batch_size]
    st.offset += p.global_batch
    items = [p.train_items[i] for i in idx]
    st.tokens += sum(len(it["input_ids"]) for it in items)  # example tokens, without padding
    return collate(items, p.pad_id, p.left_pad)


def train_step(p: Pass, st: PassState) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns its task loss."""
    cfg = p.cfg
    step_loss = 0.0
    for _ in range(cfg.grad_accum):
        batch = {k: v.to(p.device) for k, v in next_batch(p, st).items()}
        with p.autocast:
            loss = p.forward(**batch).loss / cfg.grad_accum
        step_loss += float(loss.detach())  # the task loss: comparable across methods
        if p.hooks is not None and p.hooks.extra_loss is not None:
            loss = loss + p.hooks.extra_loss(p.adapted) / cfg.grad_accum
        (p.scaler.scale(loss) if p.scaler is not None else loss).backward()
    if p.sync_by_hand:
        distributed.average_gradients(p.world, p.named.values())
    if p.scaler is not None:
        p.scaler.unscale_(p.optimizer)  # the true gradients, for the norm and the clipping
    # The norm before clipping (an infinite max_norm scales by exactly 1: no clipping).
    grad_norm = torch.nn.utils.clip_grad_norm_(list(p.named.values()), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    grad_norm = sharding.full(grad_norm)  # sharded: a replicated DTensor
    # With loss scaling an overflowing gradient is the scaler's to handle (the step is skipped
    # and the scale halves); the workers' gradients are already averaged, so all skip alike.
    checked_norm = grad_norm if p.scaler is None else torch.zeros(())
    if _nonfinite(p.world, step_loss, checked_norm):  # before the step: φ stays the last finite one
        what = f"the loss is {step_loss:g}" if not math.isfinite(step_loss) else f"the gradient norm is {float(grad_norm):g}"
        raise diverged(p.run, cfg, st.step + 1, what, p.world, p.pass_lr)
    if p.scaler is not None:
        _scaled_step(p, st, p.scaler, bool(torch.isfinite(grad_norm)))
    else:
        p.optimizer.step()
    with warnings.catch_warnings():  # after a skipped first step torch warns the schedule ran first: it is meant to
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    if p.hooks is not None and p.hooks.after_step is not None:
        p.hooks.after_step(p.adapted, st.step)
    return step_loss


def _record_step(p: Pass, st: PassState, step_loss: float, write_metric, progress) -> None:
    """The step's loss into the window; the progress line, and a metrics line every ``log_every``."""
    st.losses.append(step_loss)
    lr = p.scheduler.get_last_lr()[0]
    loss, loss_steps = window_loss(st.losses, p.cfg.log_every)
    if progress is not None:
        progress.update(st.step, loss, lr, st.tokens / max(1e-9, time.perf_counter() - st.start_time))
    if st.step % p.cfg.log_every == 0 or st.step == p.total:
        write_metric({"step": st.step, "epoch": st.epoch, "loss": loss, "loss_steps": loss_steps, "lr": lr})


def validate(p: Pass, st: PassState, write_metric, log: Callable[[str], None]) -> None:
    """Evaluate on the validation data; keep the best adapter, count towards early stopping."""
    result = evaluate(p.adapted, p.eval_items, p.pad_id, p.cfg.batch_size, p.device, p.task, p.left_pad)
    p.adapted.train()
    write_metric({"step": st.step, **result})
    log(f"step {st.step}: eval_loss {result['eval_loss']:.4f}" + (f", eval_accuracy {result['eval_accuracy']:.4f}" if "eval_accuracy" in result else ""))
    better = st.best["eval_loss"] is None or result["eval_loss"] < st.best["eval_loss"]
    if distributed.rank0_says(p.world, better, p.device):  # all workers take the same branch: it may gather φ
        st.best = {"eval_loss": result["eval_loss"], "step": st.step, "eval_accuracy": result.get("eval_accuracy")}
        st.bad_evals = 0
        phi = p.adapted.phi_state_dict() if p.cfg.shard else None  # gathered by every worker
        if p.world.main:
            _save_best(p.run, p.adapted, phi)
    else:
        st.bad_evals += 1
    if p.cfg.patience is not None and st.bad_evals >= p.cfg.patience:
        st.stopped_early = True
        log(f"early stop at step {st.step}: no better validation loss in {p.cfg.patience} evaluations (best at step {st.best['step']})")


def save_checkpoint(p: Pass, st: PassState) -> None:
    """A resumable checkpoint of this step (rank 0 writes it)."""
    # Every worker checks φ (the same on all of them): one raising alone would leave the
    # others waiting at the next collective until the timeout.
    _check_phi(p, st.step)
    phi, state = _gathered(p, st)
    if p.world.main:
        ckpt_state.save_checkpoint(p.run, st.step, p.adapted, state or st.trainer_state(p), keep=p.cfg.keep_checkpoints, phi=phi)


def finish(p: Pass, st: PassState) -> dict:
    """Write the result (and the final checkpoint), leave the process group; the pass's summary."""
    p.adapted.eval()
    _check_phi(p, st.step)  # on every worker, as above
    phi, state = _gathered(p, st)
    if p.world.main:
        p.adapted.save_into(p.run, phi=phi) if phi is not None else p.adapted.save_into(p.run)
        # The final state, so that the run can be continued (--resume --steps N); written after
        # the result, so a kill between the two resumes from an earlier checkpoint, never
        # reads as finished with a stale result. A full fine-tune's state is the whole model
        # plus twice its size of optimizer moments: only where checkpoints were asked for.
        latest = ckpt_state.latest_checkpoint(p.run)
        wanted = not p.cfg.full or p.cfg.save_every is not None
        if p.pass_lr is None and wanted and (latest is None or ckpt_state.checkpoint_step(latest) != st.step):
            ckpt_state.save_checkpoint(p.run, st.step, p.adapted, state or st.trainer_state(p), keep=p.cfg.keep_checkpoints, phi=phi)
    distributed.barrier(p.world)
    # The DDP wrapper's reducer holds the process group: free it first. Destroying the group
    # and then leaving the reducer to the frame's exit hung a gloo worker in a futex (seen
    # once in CI-like runs, after training had finished and the adapter was written).
    p.forward = None
    if p.world.distributed:
        import gc

        gc.collect()
    distributed.teardown(p.world)
    wall = time.perf_counter() - st.start_time
    final_loss, final_loss_steps = window_loss(st.losses, p.cfg.log_every) if st.losses else (None, 0)
    summary = {
        "run": p.run, "task": p.task, "steps": st.step, "stopped_early": st.stopped_early,
        "final_loss": final_loss, "final_loss_steps": final_loss_steps, "best": st.best,
        "trainable_params": p.adapted.num_trainable, "wall_seconds": wall,
        "peak_memory_bytes": _peak_memory(p.device), "device": str(p.device), "labels": p.labels,
    }
    if p.packing_efficiency is not None:
        summary["packing_efficiency"] = p.packing_efficiency
    if p.scaler is not None:
        summary["loss_scale"] = {"final": p.scaler.get_scale(), "skipped_steps": st.skipped_steps}
    if p.cfg.shard:
        held, total = sharding.held_bytes(p.adapted)
        summary["shard"] = {"workers": p.world.size, "held_bytes_per_worker": held, "model_bytes": total}
    return summary


# --- the pieces ---------------------------------------------------------------------------


def window_loss(losses: list[float], log_every: int) -> tuple[float, int]:
    """The training loss shown everywhere (progress line, ``metrics.jsonl``'s ``loss``, the
    summary's ``final_loss``): the mean of the last ``log_every`` steps' losses, and how many
    steps that is (fewer at the start). One step's loss is the task loss the optimizer
    minimised, its micro-batches averaged; one batch alone is too noisy to read a trend from."""
    window = losses[-log_every:]
    return sum(window) / len(window), len(window)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def _param_groups(
    named: dict[str, torch.nn.Parameter], weight_decay: float, head: set[str], head_lr: float | None, b_lr: float | None = None
) -> list[dict]:
    """AdamW's groups: φ, then a new task head at its own rate (when it has one that differs,
    so that a run from before ``head_lr`` resumes into the groups it saved), then LoRA+'s
    (``b_lr``): the parameters PEFT's ``create_loraplus_optimizer`` trains at lr·ratio."""
    split = {"body": named}
    if head_lr is not None and head:
        split = {"body": {n: p for n, p in named.items() if n not in head}, "head": {n: p for n, p in named.items() if n in head}}
    if b_lr is not None:
        body = split["body"]
        # In φ's own order, never a set's: the optimizer's state is saved by position, and a
        # set's order changes from one process to the next (a resume would swap moments).
        faster = [n for n, p in body.items() if n not in head and loraplus_b(n, p)]
        split = {**split, "body": {n: p for n, p in body.items() if n not in faster}, "b": {n: body[n] for n in faster}}
    groups = []
    for part, params in split.items():
        # Biases and norm scales are 1-D: decaying them towards 0 only hurts (as in BERT, GPT-2 recipes).
        decay = [p for n, p in params.items() if p.ndim >= 2 and "norm" not in n.lower()]
        no_decay = [p for n, p in params.items() if not (p.ndim >= 2 and "norm" not in n.lower())]
        extra = {"lr": head_lr} if part == "head" else {"lr": b_lr} if part == "b" else {}
        groups += [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def loraplus_b(name: str, param: torch.nn.Parameter) -> bool:
    """Whether LoRA+ trains φ's parameter ``name`` at lr·ratio: PEFT's rule, ``"lora_B" in name or
    param.ndim == 1`` (lora_B, its bias, DoRA's magnitude); the rest (lora_A) at lr. A task head
    keeps its own groups (``head_lr``), where PEFT would put a saved head's bias at lr·ratio."""
    return "lora_B" in name or param.ndim == 1


class _StopFlag:
    """SIGINT sets a flag checked between steps, so the checkpoint saved is a consistent one."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.stop:  # a second Ctrl-C aborts at once
                raise KeyboardInterrupt
            self.stop = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _check_inputs(model_dir: str, adapter, run: str) -> None:
    """Refuse a corrupt base checkpoint or a non-finite φ in one line, before anything is written.

    transformers would load the base itself (with its own exceptions) and a NaN φ would
    train to a NaN loss and exit 0.
    """
    from peftcli.checkpoint.reader import open_checkpoint

    with open_checkpoint(model_dir):
        pass  # validates the header(s): offsets, dtypes, duplicate names, truncation
    if adapter is None:
        return
    for key, t in adapter.tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadInputError(f"{run}: adapter tensor {key!r} holds NaN or Inf", "retrain it, or start again from peftcli inject")


def _predicted_tokens(item: dict) -> int:
    return sum(1 for label in item.get("labels", [])[1:] if label != IGNORE)


def _continued(run: str, cfg: TrainConfig, checkpoint: str, steps: int) -> TrainConfig:
    """``cfg`` going on to ``steps`` steps from ``checkpoint`` (``--resume --steps N``).

    The learning-rate schedule is that of a run of ``steps`` steps from the resume point on
    (a linear decay that had reached 0 at step 4 of 4 goes on at half the peak at step 5 of
    8): the steps done keep the schedule they had, so the result is not bit-identical to a
    run trained for ``steps`` from the start. Data order, optimizer and RNG continue exactly.
    """
    done = ckpt_state.checkpoint_step(checkpoint)
    if steps <= done:
        raise UsageError(f"{run} already has {done} steps (`steps` {steps})", f"pass `steps` above {done} to train it further")
    return dataclasses.replace(cfg, steps=steps, epochs=None)  # validates steps as a new run's --steps


def _scaled_step(p: Pass, st: PassState, scaler: torch.amp.GradScaler, finite: bool) -> None:
    """The optimizer step under loss scaling: skipped when the scaled gradients overflowed,
    and the run refused as diverged once the scale has fallen below ``MIN_SCALE``."""
    scaler.step(p.optimizer)  # skips the update when unscale_ found Inf/NaN
    scaler.update()
    if finite:
        return
    st.skipped_steps += 1
    if scaler.get_scale() < precision.MIN_SCALE:
        raise diverged(p.run, p.cfg, st.step + 1, f"the gradients overflow fp16 even at loss scale {scaler.get_scale():g}", p.world, p.pass_lr)


def _nonfinite(world, loss: float, grad_norm: torch.Tensor) -> bool:
    """Whether this step's loss or gradient norm is NaN or Inf on any worker (the workers
    agree, so that all of them stop at the same step instead of one waiting for the others)."""
    bad = not (math.isfinite(loss) and bool(torch.isfinite(grad_norm)))
    if world.distributed:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if bad else 0.0], device=grad_norm.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    return bad


def _check_phi(p: Pass, step: int) -> None:
    """φ is finite before it is written (a checkpoint or the result): a step can overflow φ
    itself even when the loss and gradients before it were finite."""
    with torch.no_grad():
        bad = next((n for n, t in p.named.items() if not bool(torch.isfinite(sharding.local(t)).all())), None)
    if p.cfg.shard and p.world.distributed:  # each worker sees its shards: they agree before one raises
        import torch.distributed as dist

        flag = torch.tensor([1.0 if bad is not None else 0.0], device=p.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bad or ("a shard of φ on another worker" if flag.item() else None)
    if bad is not None:
        raise diverged(p.run, p.cfg, step, f"{bad} holds NaN or Inf after it", p.world, p.pass_lr)


def diverged(run: str, cfg: TrainConfig, step: int, what: str, world, pass_lr: str | None = None) -> BadInputError:
    """The one-line error for a run (or, with ``pass_lr`` naming its learning rate's option, one
    pass of a multi-pass run) that diverged at ``step``. Nothing of that step is written: the
    newest checkpoint (if any) is the last good state and stays; a single-pass run without one
    loses its train_args.json, so that it reads as not trained (what its files still are). A
    multi-pass run keeps its state files: they are its own to resume or restart (--force)."""
    good = ckpt_state.latest_checkpoint(run)
    if good is None and pass_lr is None and world.main:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(run, ARGS_FILE))
    lr_option = pass_lr or "`lr`"
    clip = "a smaller `max_grad_norm`" if cfg.max_grad_norm > 0 else "`max_grad_norm` 1.0 (clipping was off)"
    force = " and `force` (which starts over)" if good is not None or pass_lr is not None else ""
    if good is not None:
        kept = f"the last good checkpoint is {good}"
    else:
        kept = "no checkpoint was written" + ("" if cfg.full else f" and {run} keeps the adapter it started from")
    return BadInputError(
        f"training diverged at step {step}: {what} ({lr_option} {cfg.lr:g}); no {'model' if cfg.full else 'adapter'} was written",
        f"train again with a lower {lr_option} or {clip}{force}; {kept}",
    )


def _prepare_full_run(run: str, cfg: TrainConfig, resume: bool, force: bool) -> None:
    """RUN of a full fine-tune is a new directory that becomes a checkpoint (never the base)."""
    from peftcli.checkpoint.atomic import check_output_path

    if resume or int(os.environ.get("RANK", "0")) != 0:
        return  # under --nproc rank 0 prepares RUN (the others would race with its first writes)
    if os.path.isdir(run) and os.listdir(run) and not os.path.isfile(os.path.join(run, ARGS_FILE)):
        check_output_path(run, [cfg.model], force=False)  # names the input if RUN is (inside) the base
        raise UsageError(f"{run} exists and is not a training run", "choose a new RUN directory for `full`")
    check_output_path(os.path.join(run, "model.safetensors"), [cfg.model], force=True)
    os.makedirs(run, exist_ok=True)


def _save_best(run: str, adapted, phi: dict | None = None) -> None:
    from peftcli.checkpoint.atomic import atomic_output

    with atomic_output(os.path.join(run, BEST_DIR), directory=True, force=True) as tmp:
        adapted.save_into(tmp, phi=phi) if phi is not None else adapted.save_into(tmp)


def _gathered(p: Pass, st: PassState) -> tuple[dict | None, dict | None]:
    """φ and the trainer state gathered whole by every worker of a sharded run (rank 0 then
    writes them); (None, None) otherwise, where rank 0 reads them itself."""
    if not p.cfg.shard:
        return None, None
    return p.adapted.phi_state_dict(), st.trainer_state(p)


class _metrics_writer:
    """Appends one JSON line per record to metrics.jsonl, flushed as it goes."""

    def __init__(self, path: str | None):
        self.path = path  # None: a worker that does not write (rank > 0)
        self.f = None

    def __enter__(self):
        if self.path is not None:
            self.f = open(self.path, "a", encoding="utf-8")
        return self.write

    def write(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record, sort_keys=True) + "\n")
            self.f.flush()

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, forget the metrics logged after the checkpoint (they will be logged again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()


def peak_rss() -> int:
    """This process's peak resident memory, in bytes: Linux's VmHWM, which a new program
    starts afresh (``ru_maxrss`` keeps the high-water mark of the process that forked and
    exec'd it, so a run started from a large parent, a test runner or a notebook, would
    report the parent's); ``ru_maxrss`` where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
