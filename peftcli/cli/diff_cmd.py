"""``peftcli diff BASE FINETUNED -o task.diff``: the task vector φ = θ_ft − θ₀ as a sparse diff.

A thin layer over ``peftcli.diffing.diff``; the format is ``peftcli.artifacts.sparse_diff``.
``render_description`` renders what ``describe`` reports for ``peftcli inspect task.diff``.
"""

from __future__ import annotations

import sys

import click

from peftcli.cli.output import emit_json, json_option, stderr_console, stdout_console
from peftcli.cli.render import render_report
from peftcli.diffing import DiffOptions  # imports no torch: that happens inside the command
from peftcli.cli.options import click_options
from peftcli.options import from_options


class _ProgressBars:
    """A rich progress bar per phase on stderr; used only when stderr is a terminal."""

    def __init__(self):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=True,
        )
        self._tasks: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        task = self._tasks.get(phase)
        if task is None:
            task = self._tasks[phase] = self._progress.add_task(phase, total=max(total, 1))
        self._progress.update(task, completed=done)

    def __enter__(self) -> "_ProgressBars":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@click.command()
@click.argument("base", type=click.Path())
@click.argument("finetuned", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The .diff file to write.")
@click_options(DiffOptions)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin/.pt checkpoints (torch.load(weights_only=True)).")
@json_option
def diff(base, finetuned, out, force, allow_pickle, as_json, **options):
    """Write φ = FINETUNED − BASE as a sparse diff (.diff).

    Keeps the entries of largest |φ| over all tensors together (a global top-K; K is exact,
    ties go to the earlier tensor by name, then the lower index), the same fraction of each
    tensor (--per-tensor), or every entry (--dense). Exactly one of --density, --top-k and
    --dense. Covers every floating-point tensor; 1-D ones (biases, norms) are stored whole and
    left out of the density unless --sparse-small. Reads one tensor at a time: memory is
    O(largest tensor), whatever the model's size.

    \b
    Examples:
      peftcli diff base/ finetuned/ -o task.diff --density 0.01
      peftcli diff base/ finetuned/ -o task.diff --top-k 1000000 --per-tensor
      peftcli diff base/ finetuned/ -o full.diff --dense
    """
    from peftcli.diffing import diff as compute_diff

    cfg = from_options(DiffOptions, options)
    if sys.stderr.isatty():
        with _ProgressBars() as bars:
            report = compute_diff(base, finetuned, out, cfg, force=force, allow_pickle=allow_pickle, progress=bars)
    else:
        report = compute_diff(base, finetuned, out, cfg, force=force, allow_pickle=allow_pickle)
    if as_json:
        emit_json(report.to_json())
    else:
        render_report(report.to_json(), stdout_console())
