"""The one training loop every method goes through (module level).

AdamW (no weight decay on biases and norms), warmup then linear/cosine/constant decay,
gradient accumulation, clipping, ``--steps`` or ``--epochs``, everything seeded. Evaluation
every ``eval_every`` steps keeps the best adapter by validation loss in ``<run>/best`` and
stops after ``patience`` evaluations without improvement. Checkpoints every ``save_every``
steps hold optimizer, scheduler, RNG and data position, so ``resume`` continues bit-exactly
on CPU. Ctrl-C saves a checkpoint and raises ``Interrupted`` (exit code 3). Every run also
ends with a checkpoint of its last step, so ``resume`` with ``steps`` N continues a finished
run to step N (the lr schedule from there on is an N-step run's: ``_continued``).

The training loss shown (progress, ``metrics.jsonl``'s ``loss``, the summary's ``final_loss``)
is one quantity: the mean of the last ``log_every`` steps' losses (``window_loss``).

On CPU compute stays fp32 whatever the checkpoint dtype (these CPUs lack bf16 units);
on CUDA the forward runs under bf16 autocast with fused AdamW.
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
from typing import Callable

import torch

from peftcli.errors import BadInputError, Interrupted, UsageError
from peftcli.methods.base import ONE_PASS, PHASES, ROUNDS
from peftcli.threads import torch_threads
from peftcli.train import distributed
from peftcli.train import state as ckpt_state
from peftcli.train.batching import collate, encode, epoch_order, load_tokenizer
from peftcli.train.config import SCHEDULES, TrainConfig, check_threads, check_total_steps  # noqa: F401 (re-exported)
from peftcli.train.data import load_dataset

ARGS_FILE = "train_args.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available", "use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def _param_groups(named: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    # Biases and norm scales are 1-D: decaying them towards 0 only hurts (as in BERT, GPT-2 recipes).
    decay = [p for n, p in named.items() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in named.items() if not (p.ndim >= 2 and "norm" not in n.lower())]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _head_modules(missing_keys: list[str]) -> list[str]:
    """Top modules of parameters transformers had to initialise (the new task head)."""
    heads: list[str] = []
    for key in missing_keys:
        module = key.rsplit(".", 1)[0]
        if not any(module == h or module.startswith(h + ".") for h in heads):
            heads.append(module)
    return heads


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


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj: dict) -> None:
    from peftcli.checkpoint.atomic import atomic_output, open_new_file

    with atomic_output(path, directory=False, force=True) as tmp:
        with open_new_file(tmp) as f:
            f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def resolve_config(run: str, cfg: TrainConfig | None, resume: bool) -> TrainConfig:
    """The run's configuration: the one saved in the run when resuming, else ``cfg``."""
    args_path = os.path.join(run, ARGS_FILE)
    if resume:
        if not os.path.isfile(args_path):
            raise UsageError(f"{run}: nothing to resume (no {ARGS_FILE})", "start a run with --data first")
        return TrainConfig(**_read_json(args_path))
    if cfg is None or cfg.data is None:
        raise UsageError("--data is required", "e.g. peftcli train runs/lora/ --data train.jsonl")
    return cfg


@dataclasses.dataclass
class TrainHooks:
    """What multi-phase methods add to one run of the loop (diff-pruning's L1, lottery masks)."""

    start: Callable[..., None] | None = None  # (adapted, resumed) once the model is built
    extra_loss: Callable[..., torch.Tensor] | None = None  # (adapted) -> a term added to each micro-batch loss
    after_step: Callable[..., None] | None = None  # (adapted, step) after each optimizer step


def train(
    run: str,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    progress=None,
    return_model: bool = False,
    steps: int | None = None,
):
    """Train the run in directory ``run``; returns the final summary (and the model if asked).

    Methods that train in phases or rounds (LT-SFT, diff-pruning: ``phased``; lottery tickets:
    ``lottery``) drive this loop themselves; every other run is one pass of it. ``steps``
    (with ``resume``): continue the run, finished or not, until it has that many steps.
    """
    method = None if (cfg is not None and cfg.full) else multi_phase_method(run)
    if steps is not None and resume and method is not None:
        raise UsageError(
            f"cannot continue {run} to {steps} steps: a {method.name} run trains in phases or rounds",
            "train it again with --force and the --steps you want",
        )
    with torch_threads(_requested_threads(run, cfg, resume)), distributed.timeouts_as_errors():
        if method is not None:
            kwargs = dict(resume=resume, force=force, log=log or (lambda line: None), progress=progress, return_model=return_model)
            if method.schedule == PHASES:
                from peftcli.train import phased

                return phased.train(run, cfg, **kwargs)
            if method.schedule == ROUNDS:
                from peftcli.train import lottery

                return lottery.train(run, cfg, **kwargs)
        return train_adapter(run, cfg, resume=resume, force=force, log=log, progress=progress, return_model=return_model, continue_to=steps if resume else None)


def _requested_threads(run: str, cfg: TrainConfig | None, resume: bool) -> int | None:
    """``--threads`` of this run: as given, or as saved in the run when resuming."""
    if cfg is not None:
        return cfg.threads
    args_path = os.path.join(run, ARGS_FILE)
    if resume and os.path.isfile(args_path):
        try:
            return check_threads(_read_json(args_path).get("threads"))  # a file may say 100000
        except (OSError, ValueError):
            return None  # resolve_config reports a broken file in one line
    return None


def with_model_dir(cfg: TrainConfig, adapter) -> TrainConfig:
    """``cfg`` with its base model directory: ``--model``, else the one the adapter records."""
    model_dir = cfg.model or (adapter.config.get("base_model_name_or_path") if adapter is not None else None)
    if not model_dir or not os.path.isdir(model_dir):
        raise UsageError(f"base model directory {model_dir!r} not found", "pass --model DIR")
    return dataclasses.replace(cfg, model=model_dir)


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
    from peftcli.train.batching import IGNORE

    return sum(1 for label in item.get("labels", [])[1:] if label != IGNORE)


def multi_phase_method(run: str):
    """The method of ``run`` if it trains in phases or rounds (LT-SFT, diff-pruning, lottery), else None."""
    config_path = os.path.join(run, "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    from peftcli.methods import method_for_adapter_config

    try:
        method = method_for_adapter_config(_read_json(config_path), run)
    except (ValueError, BadInputError):
        return None  # train_adapter's reader reports a broken config in one line
    return None if method.schedule == ONE_PASS else method


def train_adapter(
    run: str,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    progress=None,
    return_model: bool = False,
    hooks: TrainHooks | None = None,
    finished_ok: bool = False,
    pass_lr: str | None = None,
    continue_to: int | None = None,
):
    """One pass of the loop over the adapter (or, with ``cfg.full``, the whole model) in ``run``.

    ``finished_ok``: resuming a pass whose newest checkpoint is its end is not an error but
    the pass's result (a multi-pass run killed between a pass and the work after it).
    ``pass_lr``: for one pass of a multi-pass run, the option that set ``cfg.lr`` (``--lr``,
    or ``--phase1-lr`` for the full fine-tuning passes), named if training diverges; such a
    pass writes no final checkpoint (its directory is deleted or kept as a result).
    ``continue_to`` (with ``resume``): train until step N instead of the saved total; see
    ``_continued``.
    """
    from peftcli.artifacts.adapter_dir import read_adapter
    from peftcli.attach import attach_adapter, load_base_model

    cfg = resolve_config(run, cfg, resume)
    if cfg.full:
        _prepare_full_run(run, cfg, resume, force)
    elif not os.path.isfile(os.path.join(run, "adapter_config.json")):
        raise BadInputError(f"{run}: not an adapter directory", "create one with peftcli inject METHOD MODEL -o RUN, or pass --full")
    if not resume and os.path.exists(os.path.join(run, ARGS_FILE)) and not force:
        raise UsageError(f"{run} has already been trained", "pass --resume to continue it or --force to train it again")
    log = log or (lambda line: None)
    checkpoint = ckpt_state.latest_checkpoint(run) if resume else None
    if resume and checkpoint is None:
        raise UsageError(f"{run}: no checkpoint to resume from", "train with --save-every N to write checkpoints")
    if continue_to is not None:
        cfg = _continued(run, cfg, checkpoint, continue_to)

    adapter = None if cfg.full else read_adapter(checkpoint or run)
    cfg = with_model_dir(cfg, adapter)
    model_dir = cfg.model
    _check_inputs(model_dir, adapter, run)

    data = load_dataset(cfg.data, cfg.task, cfg.limit, cfg.columns)
    if resume and os.path.isfile(os.path.join(run, LABELS_FILE)):
        labels = _read_json(os.path.join(run, LABELS_FILE))["labels"]
    else:
        labels = data.labels
    eval_data = load_dataset(cfg.eval_data, data.task, columns=cfg.columns) if cfg.eval_data else None
    tokenizer = load_tokenizer(model_dir)
    train_items = encode(data, tokenizer, cfg.max_length, labels)
    if data.task != "classify" and not any(_predicted_tokens(it) for it in train_items):
        raise BadInputError(f"{cfg.data}: no example has a token to predict (every text is empty?)", "check the data file")
    eval_items = encode(eval_data, tokenizer, cfg.max_length, labels) if eval_data else None

    torch.manual_seed(cfg.train_seed)  # a new classification head is initialised from this
    device = _resolve_device(cfg.device)
    world = distributed.setup(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    # Full fine-tuning resumes from the weights of its newest checkpoint, adapters from the base.
    weights_dir = checkpoint if (cfg.full and checkpoint) else model_dir
    if data.task == "classify":
        model, info = load_base_model(
            weights_dir, "AutoModelForSequenceClassification", num_labels=len(labels), with_info=True,
            id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model, info = load_base_model(weights_dir, "AutoModelForCausalLM", with_info=True)
    if cfg.full:
        from peftcli.train.full import FullModel

        adapted = FullModel(model, model_dir)
    else:
        adapted = attach_adapter(model, adapter)
    if not cfg.full and data.task == "classify" and not adapter.config.get("modules_to_save"):
        heads = _head_modules(info.get("missing_keys", []))
        if not heads:
            raise BadInputError(
                f"{model_dir}: cannot find the classification head to train",
                "its checkpoint already holds a task head of its own; pass the pretrained model without one",
            )
        adapted.add_head(heads, "SEQ_CLS")
    adapted.to(device)
    # DDP averages φ's gradients across workers; every worker then applies the same update.
    # A sparse φ (LT-SFT, diff-pruning) gets its gradients from hooks after backward, which
    # DDP's reducer cannot see: those are averaged by hand before the update.
    sync_by_hand = world.distributed and adapted.grad_carriers
    forward = torch.nn.parallel.DistributedDataParallel(adapted) if world.distributed and not sync_by_hand else adapted

    per_step = cfg.batch_size * cfg.grad_accum * world.size
    steps_per_epoch = max(1, len(train_items) // per_step)
    total = check_total_steps(cfg.steps or max(1, round((cfg.epochs or 1.0) * steps_per_epoch)))
    named = adapted.phi_parameters()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(named, cfg.weight_decay), lr=cfg.lr, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))

    if hooks is not None and hooks.start is not None:
        hooks.start(adapted, checkpoint is not None)
    step, epoch, offset = 0, 0, 0
    finished = False
    recent_losses: list[float] = []
    best = {"eval_loss": None, "step": None, "eval_accuracy": None}
    bad_evals = 0
    metrics_path = os.path.join(run, METRICS_FILE)
    if checkpoint is not None:
        st = ckpt_state.load_state(checkpoint)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if continue_to is not None:  # the next step's lr is the new schedule's, not the old one's
            lrs = [base * _schedule(cfg, total)(scheduler.last_epoch) for base in scheduler.base_lrs]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
        ckpt_state.set_rng_state(st["rng"])
        step, epoch, offset = st["step"], st["epoch"], st["offset"]
        best, bad_evals = st["best"], st["bad_evals"]
        recent_losses = list(st.get("recent_losses", []))
        finished = step >= total or (cfg.patience is not None and bad_evals >= cfg.patience)
        if finished and not finished_ok:
            if step < total:
                raise UsageError(
                    f"{run}: the run stopped early at step {step} ({bad_evals} evaluations without a better validation loss)",
                    "train it again with --force and a larger --patience",
                )
            raise UsageError(
                f"{run}: nothing to resume, the run already finished at step {step}",
                f"continue it with --resume --steps N (N above {step}), or train it again with --force",
            )
        if world.main:
            _truncate_metrics(metrics_path, step)
            if continue_to is not None:
                _write_json(os.path.join(run, ARGS_FILE), dataclasses.asdict(cfg))  # a later --resume goes on to N
    elif world.main:
        _write_json(os.path.join(run, ARGS_FILE), dataclasses.asdict(cfg))
        if labels:
            _write_json(os.path.join(run, LABELS_FILE), {"task": data.task, "labels": labels})
        if os.path.exists(metrics_path):
            os.unlink(metrics_path)
        for old in (ckpt_state.CHECKPOINTS, BEST_DIR):
            shutil.rmtree(os.path.join(run, old), ignore_errors=True)
    distributed.barrier(world)  # workers start once rank 0 has reset the run directory

    order = epoch_order(len(train_items), cfg.train_seed, epoch)
    left_pad = data.task == "classify" and is_decoder(model_dir)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    start_time, tokens, losses = time.perf_counter(), 0, (recent_losses if checkpoint is not None else [])
    stopped_early = finished and step < total  # a resumed pass that early stopping had ended

    def trainer_state() -> dict:
        return {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt_state.rng_state(),
            "step": step, "epoch": epoch, "offset": offset, "best": best, "bad_evals": bad_evals,
            "recent_losses": losses[-cfg.log_every :],  # so the first metrics line after a resume is the same
        }

    global_batch = cfg.batch_size * world.size
    if world.distributed and len(train_items) < global_batch:
        raise UsageError(
            f"{len(train_items)} training examples are fewer than one global batch ({cfg.batch_size} × {world.size} workers)",
            "lower --batch-size or --nproc",
        )

    def next_batch():
        nonlocal epoch, offset, order
        if offset + global_batch > len(order):  # drop the ragged tail: every micro-batch is full
            epoch, offset = epoch + 1, 0
            order = epoch_order(len(train_items), cfg.train_seed, epoch)
        start = offset + world.rank * cfg.batch_size  # this worker's slice of the global micro-batch
        idx = order[start : start + cfg.batch_size]
        offset += global_batch
        return collate([train_items[i] for i in idx], tokenizer.pad_token_id, left_pad)

    adapted.train()
    if not world.main:
        progress, log = None, (lambda line: None)
    with _StopFlag() as flag, _metrics_writer(metrics_path if world.main else None) as write_metric:
        if progress is not None:
            progress.start(total, step)
        while step < total and not finished:
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next_batch().items()}
                tokens += int(batch["attention_mask"].sum())
                with autocast:
                    loss = forward(**batch).loss / cfg.grad_accum
                step_loss += float(loss.detach())  # the task loss: comparable across methods
                if hooks is not None and hooks.extra_loss is not None:
                    loss = loss + hooks.extra_loss(adapted) / cfg.grad_accum
                loss.backward()
            if sync_by_hand:
                distributed.average_gradients(world, named.values())
            # The norm before clipping (an infinite max_norm scales by exactly 1: no clipping).
            grad_norm = torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            if _nonfinite(world, step_loss, grad_norm):  # before the step: φ stays the last finite one
                what = f"the loss is {step_loss:g}" if not math.isfinite(step_loss) else f"the gradient norm is {float(grad_norm):g}"
                raise diverged(run, cfg, step + 1, what, world, pass_lr)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if hooks is not None and hooks.after_step is not None:
                hooks.after_step(adapted, step)
            losses.append(step_loss)
            lr = scheduler.get_last_lr()[0]
            loss, loss_steps = window_loss(losses, cfg.log_every)
            if progress is not None:
                progress.update(step, loss, lr, tokens / max(1e-9, time.perf_counter() - start_time))
            if step % cfg.log_every == 0 or step == total:
                write_metric({"step": step, "epoch": epoch, "loss": loss, "loss_steps": loss_steps, "lr": lr})
            evaluate_now = eval_items is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total)
            if evaluate_now:
                result = evaluate(adapted, eval_items, tokenizer.pad_token_id, cfg.batch_size, device, data.task, left_pad)
                adapted.train()
                write_metric({"step": step, **result})
                log(f"step {step}: eval_loss {result['eval_loss']:.4f}" + (f", eval_accuracy {result['eval_accuracy']:.4f}" if "eval_accuracy" in result else ""))
                if best["eval_loss"] is None or result["eval_loss"] < best["eval_loss"]:
                    best = {"eval_loss": result["eval_loss"], "step": step, "eval_accuracy": result.get("eval_accuracy")}
                    bad_evals = 0
                    if world.main:
                        _save_best(run, adapted)
                else:
                    bad_evals += 1
                if cfg.patience is not None and bad_evals >= cfg.patience:
                    stopped_early = True
                    log(f"early stop at step {step}: no better validation loss in {cfg.patience} evaluations (best at step {best['step']})")
            if (cfg.save_every and step % cfg.save_every == 0) or flag.stop:
                # Every worker checks φ (the same on all of them): one raising alone would leave
                # the others waiting at the next collective until the timeout.
                _check_phi(run, cfg, step, named, world, pass_lr)
                if world.main:
                    ckpt_state.save_checkpoint(run, step, adapted, trainer_state(), keep=cfg.keep_checkpoints)
            if flag.stop:
                raise Interrupted(f"interrupted at step {step}; checkpoint saved", f"continue with peftcli train {run} --resume")
            if stopped_early:
                break
        if progress is not None:
            progress.finish()

    adapted.eval()
    _check_phi(run, cfg, step, named, world, pass_lr)  # on every worker, as above
    if world.main:
        adapted.save_into(run)
        # The final state, so that the run can be continued (--resume --steps N); written after
        # the result, so a kill between the two resumes from an earlier checkpoint, never
        # reads as finished with a stale result. A full fine-tune's state is the whole model
        # plus twice its size of optimizer moments: only where checkpoints were asked for.
        latest = ckpt_state.latest_checkpoint(run)
        wanted = not cfg.full or cfg.save_every is not None
        if pass_lr is None and wanted and (latest is None or ckpt_state.checkpoint_step(latest) != step):
            ckpt_state.save_checkpoint(run, step, adapted, trainer_state(), keep=cfg.keep_checkpoints)
    distributed.barrier(world)
    # The DDP wrapper's reducer holds the process group: free it first. Destroying the group
    # and then leaving the reducer to the frame's exit hung a gloo worker in a futex (seen
    # once in CI-like runs, after training had finished and the adapter was written).
    del forward
    if world.distributed:
        import gc

        gc.collect()
    distributed.teardown(world)
    wall = time.perf_counter() - start_time
    summary = {
        "run": run, "task": data.task, "steps": step, "stopped_early": stopped_early,
        "final_loss": window_loss(losses, cfg.log_every)[0] if losses else None,
        "final_loss_steps": window_loss(losses, cfg.log_every)[1] if losses else 0, "best": best,
        "trainable_params": adapted.num_trainable, "wall_seconds": wall,
        "peak_memory_bytes": _peak_memory(device), "device": str(device), "labels": labels,
    }
    return (summary, adapted) if return_model else summary


def window_loss(losses: list[float], log_every: int) -> tuple[float, int]:
    """The training loss shown everywhere (progress line, ``metrics.jsonl``'s ``loss``, the
    summary's ``final_loss``): the mean of the last ``log_every`` steps' losses, and how many
    steps that is (fewer at the start). One step's loss is the task loss the optimizer
    minimised, its micro-batches averaged; one batch alone is too noisy to read a trend from."""
    window = losses[-log_every:]
    return sum(window) / len(window), len(window)


def _continued(run: str, cfg: TrainConfig, checkpoint: str, steps: int) -> TrainConfig:
    """``cfg`` going on to ``steps`` steps from ``checkpoint`` (``--resume --steps N``).

    The learning-rate schedule is that of a run of ``steps`` steps from the resume point on
    (a linear decay that had reached 0 at step 4 of 4 goes on at half the peak at step 5 of
    8): the steps done keep the schedule they had, so the result is not bit-identical to a
    run trained for ``steps`` from the start. Data order, optimizer and RNG continue exactly.
    """
    done = ckpt_state.checkpoint_step(checkpoint)
    if steps <= done:
        raise UsageError(f"{run} already has {done} steps (--steps {steps})", f"pass --steps above {done} to train it further")
    return dataclasses.replace(cfg, steps=steps, epochs=None)  # validates steps as a new run's --steps


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


def _check_phi(run: str, cfg: TrainConfig, step: int, named: dict, world, pass_lr: str | None) -> None:
    """φ is finite before it is written (a checkpoint or the result): a step can overflow φ
    itself even when the loss and gradients before it were finite."""
    with torch.no_grad():
        bad = next((n for n, p in named.items() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise diverged(run, cfg, step, f"{bad} holds NaN or Inf after it", world, pass_lr)


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
    lr_option = pass_lr or "--lr"
    clip = "a smaller --max-grad-norm" if cfg.max_grad_norm > 0 else "--max-grad-norm 1.0 (clipping was off)"
    force = " and --force (which starts over)" if good is not None or pass_lr is not None else ""
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
        raise UsageError(f"{run} exists and is not a training run", "choose a new RUN directory for --full")
    check_output_path(os.path.join(run, "model.safetensors"), [cfg.model], force=True)
    os.makedirs(run, exist_ok=True)


def is_decoder(model_dir: str) -> bool:
    """A causal LM checkpoint (its classifier scores the last position), from config.json."""
    archs = _read_json(os.path.join(model_dir, "config.json")).get("architectures") or []
    return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def evaluate(adapted, items: list[dict], pad_id: int, batch_size: int, device, task: str, left_pad: bool = False) -> dict:
    """Validation loss and, for classification, accuracy.

    The loss is the mean over what the training loss averages: examples for classification,
    predicted tokens for ``lm``/``sft`` (a batch's loss is its mean over tokens, so weighting
    batches by examples would make the number depend on the batch size and on padding).
    """
    from peftcli.train.batching import IGNORE

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


def _save_best(run: str, adapted) -> None:
    from peftcli.checkpoint.atomic import atomic_output

    with atomic_output(os.path.join(run, BEST_DIR), directory=True, force=True) as tmp:
        adapted.save_into(tmp)


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
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
