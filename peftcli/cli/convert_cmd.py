"""``peftcli convert INPUT --to diff|lora``: an adapter as a sparse diff, or a diff as a LoRA adapter."""

from __future__ import annotations

import click

from peftcli.cli.output import emit_json, json_option, stdout_console
from peftcli.diff import DiffOptions
from peftcli.methods import foldable
from peftcli.options import INT, click_options, from_options, option_fields

_DIFF_OPTIONS = {f.name for f in option_fields(DiffOptions)}


@click.command()
@click.argument("source", type=click.Path())
@click.option("--to", "target", type=click.Choice(["diff", "lora"]), required=True, help="What to convert SOURCE into.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The .diff file or adapter directory to write.")
@click.option("--base", type=click.Path(), help="The base checkpoint (default: the one SOURCE records).")
@click.option("--rank", "-r", type=INT, default=16, show_default=True, help="LoRA rank of the SVD extraction (--to lora).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@click_options(DiffOptions)
def convert(source, target, out, base, rank, force, as_json, **diff_options):
    """Convert SOURCE between artifact kinds.

    An adapter directory (FOLDABLE) becomes a .diff of its exact ΔW:
    --dense, or --density / --top-k selected as `peftcli diff` does. A .diff becomes a LoRA
    adapter by truncated SVD of each linear weight's φ (the best rank-r fit); the report
    gives the share of ‖φ‖² kept and what a LoRA cannot carry.

    \b
    Examples:
      peftcli convert a.diff --to lora --rank 16 -o lora_a/
      peftcli convert runs/lora/ --to diff -o lora.diff --dense
      peftcli convert runs/lora/ --to diff -o lora.diff --density 0.01
    """
    given = sorted(k for k, v in diff_options.items() if v not in (None, False))
    if target == "lora":
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} only applies with --to diff")
        from peftcli.convert import diff_to_lora

        report = diff_to_lora(source, out, rank, base=base, force=force)
        if as_json:
            emit_json(report.to_json())
            return
        click.echo(
            f"wrote {out}: rank {rank} LoRA on {len(report.tensors)} weights, keeping {100 * report.kept_energy:.2f}% of ‖φ‖²"
            + (f"; dropped {len(report.dropped)} tensors a LoRA cannot carry "
               f"({100 * sum(d['energy_share'] for d in report.dropped):.2f}% of ‖φ‖²)" if report.dropped else "")
        )
        return
    from peftcli.convert import adapter_to_diff

    options = from_options(DiffOptions, {k: (v if v is not False else None) for k, v in diff_options.items()})
    report = adapter_to_diff(source, out, options, base=base, force=force)
    if as_json:
        emit_json(report.to_json())
        return
    from peftcli.cli.diff_cmd import render_report

    render_report(report.to_json(), stdout_console())


convert.help = convert.help.replace("FOLDABLE", ", ".join(foldable()))  # from the method registry
