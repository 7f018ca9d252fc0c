"""``peftcli train RUN``: train the adapter in RUN with the built-in loop."""

from __future__ import annotations

import os
import sys
import time

import click

from peftcli.cli.output import quiet_option, emit_json, json_option, stderr_console, stdout_console, styled
from peftcli.errors import UsageError
from peftcli.cli.options import INT, click_options
from peftcli.options import from_options
from peftcli.training.config import TrainConfig


class Progress:
    """A rich progress bar on a terminal; plain lines every ``every`` steps otherwise."""

    def __init__(self, every: int):
        self.every = every
        self.tty = styled(sys.stderr)

    def start(self, total: int, done: int) -> None:
        self.total, self.t0, self.done0 = total, time.perf_counter(), done
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=stderr_console(), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        # ``loss`` is the mean over the last log_every steps, as in metrics.jsonl (one_pass.window_loss)
        info = f"loss {loss:.4f} (mean of steps {max(1, step - self.every + 1)}-{step}) lr {lr:.2e} {tok_s:,.0f} tok/s"
        if self.tty:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.done0) / max(1e-9, time.perf_counter() - self.t0)
            eta = (self.total - step) / rate if rate > 0 else 0.0
            click.echo(f"step {step}/{self.total} {info} eta {eta:.0f}s", err=True)

    def finish(self) -> None:
        if self.tty:
            self.bar.stop()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _defaults_epilog() -> str:
    """The learning rates each method trains with when --lr and --head-lr are left out."""
    from peftcli.methods import METHODS
    from peftcli.training.defaults import FULL_FINE_TUNING

    rows = [(name, m.train_defaults) for name, m in METHODS.items()] + [("--full", FULL_FINE_TUNING)]
    lines = [
        f"  {name:<13} {d.lr:<7g} {d.lr_for('lm'):<7g} {d.head_lr if d.head_lr is not None else 'lr'!s:<6} {d.warmup_ratio:<7.0%} {d.schedule}"
        for name, d in rows
    ]
    return "\b\nDefaults by method (flags override them; a new classification head trains at 'head'):\n" \
        + f"  {'method':<13} {'lr':<7} {'lm/sft':<7} {'head':<6} {'warmup':<7} decay\n" + "\n".join(lines)


@click.command(epilog=_defaults_epilog())
@click.argument("run", type=click.Path())
@click.option(
    "--resume", is_flag=True,
    help="Continue from the newest checkpoint in RUN (same options as before); with --steps N, train a run (even a finished one) "
    "on until step N, the lr schedule being that of an N-step run from there on.",
)
@click.option("--force", is_flag=True, help="Train a run that was already trained again, from its current φ.")
@quiet_option
@click.option("--nproc", type=INT, default=None, help="Train data-parallel in N local workers (torch.distributed, gloo on CPU).")
@json_option
@click_options(TrainConfig)
def train(run, resume, force, quiet, nproc, as_json, **options):
    """Train the adapter directory RUN (made by `peftcli inject`) on --data.

    Only φ (and a new classification head) is trained; the base model stays frozen. RUN
    receives the trained adapter, metrics.jsonl, checkpoints/ and best/ (with --eval).

    \b
    Examples:
      peftcli train runs/lora/ --model model/ --data train.jsonl --eval dev.jsonl --steps 500 --batch-size 16
      peftcli train runs/lora/ --model model/ --data ../shared/data/sst2/train.tsv --task classify --eval-every 100 --patience 3
      peftcli train runs/lora/ --resume
      peftcli train runs/lora/ --model model/ --data train.jsonl --nproc 2
    """
    if nproc is not None:
        from peftcli.training.distributed import launch

        cores = os.cpu_count() or 1
        if nproc > cores:  # each worker holds a whole model and computes on a core of its own
            raise UsageError(f"--nproc {nproc} is more than this machine's {cores} cores", f"give --nproc {cores} or fewer")

        # Every worker runs this same command without --nproc; torchrun sets RANK/WORLD_SIZE.
        argv = _without_nproc(sys.argv[1:])
        raise SystemExit(launch(nproc, argv))
    from peftcli.training.loop import train as run_training

    cfg = None if resume else from_options(TrainConfig, options)
    given = [k for k, v in options.items() if v is not None and k not in ("steps", "shard")]
    if resume and given:
        raise click.UsageError(f"--resume takes its options from the run (but --steps and --shard); drop --{given[0].replace('_', '-')}")
    log_every = options.get("log_every") or _saved_log_every(run, resume)
    progress = None if quiet else Progress(log_every)
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    steps = options.get("steps") if resume else None
    # How this invocation runs, not an option of the run: a run resumes sharded or not.
    shard = bool(options.get("shard")) if resume else None
    summary = run_training(run, cfg, resume=resume, force=force, log=log, progress=progress, steps=steps, shard=shard)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    if as_json:
        emit_json({"schema": "peftcli.train/1", **summary})
        return
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    best = summary["best"]
    rows = [
        ("run", summary["run"]), ("task", summary["task"]), ("steps", str(summary["steps"]) + (" (stopped early)" if summary["stopped_early"] else "")),
        ("final loss", _final_loss(summary)),
        ("best eval loss", f"{best['eval_loss']:.4f} at step {best['step']}" if best["eval_loss"] is not None else "-"),
        ("best eval accuracy", f"{best['eval_accuracy']:.4f}" if best.get("eval_accuracy") is not None else "-"),
        ("trainable params", f"{summary['trainable_params']:,}"), ("wall time", _wall(summary)),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB ({summary['device']})"),
    ]
    for k, v in rows:
        grid.add_row(k, v)
    stdout_console().print(grid)


def _saved_log_every(run: str, resume: bool) -> int:
    """A resumed run's --log-every (its progress lines average what its metrics lines do)."""
    import json

    if resume:
        try:
            with open(os.path.join(run, "train_args.json"), encoding="utf-8") as f:
                value = json.load(f).get("log_every")
            if isinstance(value, int) and value > 0:
                return value
        except (OSError, ValueError, AttributeError):
            pass  # the loop reports a missing or broken train_args.json in one line
    return 10


def _final_loss(summary: dict) -> str:
    if summary["final_loss"] is None:
        return "-"
    n, steps = summary.get("final_loss_steps") or 1, summary["steps"]
    return f"{summary['final_loss']:.4f} (mean of steps {steps - n + 1}-{steps})"


def _wall(summary: dict) -> str:
    """The whole run's wall time, and for runs in phases or rounds how it splits."""
    split = summary.get("wall_seconds_by_phase")
    text = f"{summary['wall_seconds']:.1f} s"
    return text + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in split.items()) + ")" if split else "")
