"""``peftcli merge BASE INPUT...``: fold adapters, diffs or fine-tunes into a standalone checkpoint."""

from __future__ import annotations

import sys

import click

from peftcli.cli.output import emit_json, json_option, stderr_console, styled
from peftcli.merge.methods import REGISTRY, option_classes, option_names
from peftcli.methods import foldable
from peftcli.options import FLOAT, SEED, click_options

MERGE_METHODS = tuple(REGISTRY)  # --method's choices (and check's): the registry's names
HEAD_MODES = ("each", "average")  # as peftcli.merge.heads.HEAD_MODES (no import: --help stays light)


FLOAT32_MAX = 3.4028234663852886e38  # merging computes in fp32: a larger weight, or sum of weights, is inf


def _floats(ctx, param, value):
    """λᵢ in ASCII, finite, and small enough that Σ|λᵢ| is finite in fp32."""
    if value is None:
        return None
    weights = [FLOAT.convert(v, param, ctx) for v in value.split(",")]  # '١', nan, inf: refused
    total = sum(abs(w) for w in weights)
    if total > FLOAT32_MAX:
        raise click.BadParameter(
            f"{value!r} sums to |λ| = {total:g}, beyond float32's 3.4e+38, where the merge computes: give smaller weights"
        )
    return weights


def method_options(values: dict) -> dict:
    """The merge methods' parameters among click's (or a recipe's) values, by name."""
    return {k: values.get(k) for k in option_names()}


@click.command()
@click.argument("base", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="Checkpoint to write (a .safetensors file or a directory); default: stdout, for a single file.")
@click.option("--weights", callback=_floats, help="Comma-separated λᵢ, one per input (default 1 each): θ₀ + Σ λᵢ φᵢ.")
@click.option("--method", type=click.Choice(MERGE_METHODS), default="linear", show_default=True, help="How the task vectors combine.")
@click_options(*option_classes())  # every method's parameters, declared once in its module
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of DARE's random drop.")
@click.option("--dtype", type=click.Choice(["F32", "BF16", "F16", "F64"]), help="Output dtype of floating tensors (default: the base's).")
@click.option("--max-shard-size", help="Re-shard the output at this size (default: the base's shard layout).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin/.pt checkpoints (torch.load(weights_only=True)).")
@click.option(
    "--heads", type=click.Choice(HEAD_MODES), default="each", show_default=True,
    help="Inputs with classification heads: each (one model per input) or average (one model, heads of one task averaged).",
)
@json_option
def merge(base, inputs, out, weights, method, seed, dtype, max_shard_size, force, allow_pickle, heads, as_json, **options):
    """Write BASE + the task vectors of INPUTS as a standalone checkpoint.

    INPUTS are .diff files, adapter directories whose method folds into the weights
    (FOLDABLE: folded exactly), or fine-tuned checkpoints of BASE
    (φ = θ_ft − θ₀ on the fly). Streams tensor by tensor; plain transformers loads the
    result. Without -o a single-file result streams to stdout (for pipes).

    \b
    Examples:
      peftcli merge base/ runs/lora/ -o merged/
      peftcli merge base/ sst2.diff agnews.diff --weights 1.0,0.8 -o multi/
      peftcli merge base/ a.diff b.diff --method ties --density 0.2 -o ties/
      peftcli merge base.safetensors taskA.diff taskB.diff > merged.safetensors
    """
    from peftcli.merge.provenance import Hasher

    hasher = Hasher.for_inputs(inputs)  # hashes on its own thread while torch is imported
    from peftcli.merge.engine import merge as run_merge
    from peftcli.merge.engine import stdout_stream

    stream = None
    if out is None:
        stream = stdout_stream()
        if as_json:
            raise click.UsageError("--json needs -o: stdout carries the checkpoint")
    progress = None
    if styled(sys.stderr):
        from rich.progress import Progress

        bar = Progress(console=stderr_console(), transient=True)
        bar.start()
        task = bar.add_task("merge", total=None)
        progress = lambda n, total: bar.update(task, completed=n, total=total)  # noqa: E731
    try:
        report = run_merge(
            base, list(inputs), out, weights=weights, method=method, options=method_options(options), seed=seed, dtype=dtype,
            max_shard_size=max_shard_size, force=force, allow_pickle=allow_pickle, stream=stream, progress=progress, heads=heads,
            hasher=hasher,
        )
    finally:
        if progress is not None:
            bar.stop()
    if as_json:
        emit_json(report.to_json())
    elif stream is None:
        click.echo(f"wrote {report.output}: {report.changed} of {report.tensors} tensors changed ({report.method}, {len(inputs)} input{'s' if len(inputs) > 1 else ''})")
        for t in report.tasks if len(report.tasks) > 1 else []:  # one head model per task
            click.echo(f"  task {t['name']}: {t['architecture']}, {len(t['labels'])} labels -> {t['path']}")
    else:
        click.echo(f"merged {report.changed} of {report.tensors} tensors to stdout", err=True)


merge.help = merge.help.replace("FOLDABLE", ", ".join(foldable()))  # from the method registry
