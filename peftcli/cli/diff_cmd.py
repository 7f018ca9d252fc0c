"""``peftcli diff BASE FINETUNED -o task.diff``: the task vector φ = θ_ft − θ₀ as a sparse diff.

A thin layer over ``peftcli.diff.diff``; the format is ``peftcli.artifacts.sparse_diff``.
``render_description`` renders what ``describe`` reports for ``peftcli inspect task.diff``.
"""

from __future__ import annotations

import sys

import click

from peftcli.cli.output import emit_json, json_option, stderr_console, stdout_console
from peftcli.diff import DiffOptions  # imports no torch: that happens inside the command
from peftcli.options import click_options, from_options


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
    from peftcli.diff import diff as compute_diff

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


def add_stored_rows(grid, doc: dict) -> None:
    """The kept / tensors / stored-whole rows every report of a written .diff shows."""
    grid.add_row("kept", f"{doc['k']:,} of {doc['n']:,} entries (density {doc['density']:.6g})")
    sparse = sum(t["stored"] == "sparse" for t in doc["tensors"])
    grid.add_row("tensors", f"{len(doc['tensors'])} covered: {sparse} sparse, {len(doc['tensors']) - sparse} dense")
    if doc["dense_tensors"]:
        grid.add_row("stored whole", f"{len(doc['dense_tensors'])} tensors, not counted in the density")


def render_report(doc: dict, console) -> None:
    from rich.table import Table

    from peftcli.cli.render import human_bytes

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("method", f"{doc['method']} ({doc['selection']}), values {doc['values']}")
    add_stored_rows(grid, doc)
    if doc["skipped"]:
        grid.add_row("not covered", f"{len(doc['skipped'])} non-floating-point tensors (equal in both)")
    if doc.get("task_head"):
        grid.add_row("task head", describe_head(doc["task_head"]))
    grid.add_row("wrote", f"{doc['output']} ({doc['bytes']:,} bytes, {human_bytes(doc['bytes'])})")
    console.print(grid)


def describe_head(head: dict) -> str:
    """One line for a diff's task head: class, labels, tensors (stored whole, outside the density)."""
    from rich.markup import escape

    labels = ", ".join(head["labels"][:6]) + (", …" if len(head["labels"]) > 6 else "")
    return escape(
        f"{head['architecture']}, {len(head['labels'])} labels ({labels}); "
        f"{', '.join(sorted(head['tensors']))} stored whole, outside the density"
    )


def render_description(desc: dict, console) -> None:
    """The ``inspect`` section for a sparse diff (``desc`` from ``sparse_diff.describe``)."""
    from rich.table import Table

    fp = desc["base_fingerprint"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("diff", f"method {desc['method']}, version {desc['version']}, density {desc['density']:.6g}")
    grid.add_row(
        "covers",
        f"{desc['num_tensors']} tensors, {desc['covered_params']:,} params ({len(desc['dense_tensors'])} stored whole)",
    )
    grid.add_row("base", f"{fp['num_tensors']} tensors, fingerprint {fp['hash'][:16]}…")
    if desc.get("task_head"):
        grid.add_row("task head", describe_head(desc["task_head"]))
    console.print()
    console.print(grid)
    table = Table(title="largest ‖φ‖", title_justify="left", show_edge=False, pad_edge=False)
    for col, justify in (
        ("tensor", "left"),
        ("stored", "left"),
        ("nonzero", "right"),
        ("density", "right"),
        ("‖φ‖", "right"),
    ):
        table.add_column(col, justify=justify)
    rows = {r["name"]: r for r in desc["tensors"]}
    for top in desc["largest"]:
        r = rows[top["name"]]
        table.add_row(r["name"], r["stored"], f"{r['nonzero']:,}", f"{r['density']:.4%}", f"{r['norm']:.4g}")
    console.print()
    console.print(table)
