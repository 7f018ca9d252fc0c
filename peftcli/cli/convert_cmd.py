"""``peftcli convert INPUT --to diff|lora``: an adapter as a sparse diff, or a diff as a LoRA adapter."""

from __future__ import annotations

import click

from peftcli.cli.options import click_options
from peftcli.cli.output import emit_json, json_option, stdout_console
from peftcli.conversion import ConvertOptions
from peftcli.diffing import DiffOptions
from peftcli.methods import foldable


@click.command()
@click.argument("source", type=click.Path())
@click_options(ConvertOptions, only=("target",))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The .diff file or adapter directory to write.")
@click_options(ConvertOptions, skip=("target",))
@json_option
@click_options(DiffOptions)
def convert(source, out, as_json, **values):
    """Convert SOURCE between artifact kinds.

    An adapter directory (FOLDABLE) becomes a .diff of its exact ΔW:
    --dense, or --density / --top-k selected as `peftcli diff` does. A .diff, a foldable
    adapter, or a fine-tuned checkpoint with --base (ΔW = W_ft − W_base) becomes a LoRA
    adapter by truncated SVD of each linear weight's ΔW (the best rank-r fit; --energy E: per
    weight the smallest rank keeping E of ‖ΔW‖²); the report gives the share of ‖ΔW‖² kept
    and what a LoRA cannot carry.

    \b
    Examples:
      peftcli convert a.diff --to lora --rank 16 -o lora_a/
      peftcli convert runs/loha/ --to lora --energy 0.9 -o lora_b/
      peftcli convert finetuned/ --base base/ --to lora --rank 32 -o extracted/
      peftcli convert runs/lora/ --to diff -o lora.diff --dense
      peftcli convert runs/lora/ --to diff -o lora.diff --density 0.01
    """
    from peftcli.conversion import convert as run_convert
    from peftcli.conversion import convert_options

    opts = convert_options(values)
    report = run_convert(source, out, opts)
    if as_json:
        emit_json(report.to_json())
    elif opts.target == "lora":
        _print_lora(out, report)
    else:
        from peftcli.cli.render import render_report

        render_report(report.to_json(), stdout_console())


def _print_lora(out: str, report) -> None:
    from peftcli.cli.output import printable

    click.echo(
        f"wrote {out}: rank {report.rank} LoRA on {len(report.tensors)} weights, keeping {100 * report.kept_energy:.2f}% of ‖ΔW‖²"
        + (f"; dropped {len(report.dropped)} tensors a LoRA cannot carry "
           f"({100 * sum(d['energy_share'] for d in report.dropped):.2f}% of ‖ΔW‖²)" if report.dropped else "")
    )
    for t in report.tensors:
        click.echo(f"  {printable(t['name'])}: rank {t['rank']}, keeps {100 * t['kept_energy']:.2f}%")
    for d in report.dropped:
        click.echo(f"  {printable(d['name'])}: dropped, {100 * d['energy_share']:.2f}% of ‖ΔW‖²")


convert.help = convert.help.replace("FOLDABLE", ", ".join(foldable()))  # from the method registry
