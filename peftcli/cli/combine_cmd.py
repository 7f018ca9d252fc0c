"""``peftcli combine A.diff B.diff --op add -o AB.diff``: arithmetic on sparse diffs, kept sparse.

A thin layer over ``peftcli.combining.combine``; the rules are in that module's docstring.
"""

from __future__ import annotations

import click

from peftcli.cli.options import click_options
from peftcli.cli.output import emit_json, json_option, printable, stdout_console
from peftcli.combining import CombineOptions  # imports no torch: that happens inside the command
from peftcli.options import from_options


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click_options(CombineOptions, skip=("force",))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The .diff file to write.")
@click_options(CombineOptions, only=("force",))
@json_option
def combine(inputs, out, as_json, **values):
    """Combine sparse diffs (.diff) of one base: Σ wᵢ·φᵢ, a − b or c·φ, still sparse.

    Every input must carry the same base fingerprint; a tensor only some inputs cover counts
    as 0 in the others. Values are summed in fp32 (fp64 for F64 tensors) in input order and
    cast once; entries that come out exactly 0 are dropped, so a − a keeps no entry
    (tensors stored whole, such as biases and norms, stay whole). The output's
    method is "combined", its density is recomputed, and its provenance names and hashes the
    inputs. Reads one tensor of each input at a time.

    \b
    Examples:
      peftcli combine a.diff b.diff --op add -o ab.diff
      peftcli combine a.diff b.diff --op add --weights 1.0,0.5 -o ab.diff
      peftcli combine a.diff b.diff --op subtract -o a-minus-b.diff
      peftcli combine a.diff --op scale --by -1 -o forget-a.diff
    """
    from peftcli.combining import combine as run_combine

    report = run_combine(list(inputs), from_options(CombineOptions, values), out)
    if as_json:
        emit_json(report.to_json())
    else:
        _render(report.to_json(), stdout_console())


def expression(coefficients: list[float], names: list[str]) -> str:
    """Σ cᵢ·φᵢ as one writes it: ``a − b``, ``0.5·a + 2·b``, ``−a`` (no ``1·``, no ``+ -``)."""
    text = ""
    for i, (c, name) in enumerate(zip(coefficients, names)):
        sign = "−" if c < 0 else "+"
        term = name if abs(c) == 1 else f"{abs(c):g}·{name}"
        text += (("−" if sign == "−" else "") + term) if i == 0 else f" {sign} {term}"
    return text


def _render(doc: dict, console) -> None:
    from rich.table import Table

    from peftcli.cli.render import add_stored_rows, human_bytes

    terms = expression(doc["coefficients"], [printable(p) for p in doc["inputs"]])
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("combined", f"{doc['op']}: {terms}, values {doc['values']}")
    add_stored_rows(grid, doc)
    grid.add_row("wrote", f"{printable(doc['output'])} ({doc['bytes']:,} bytes, {human_bytes(doc['bytes'])})")
    console.print(grid)
