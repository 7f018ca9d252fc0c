"""``peftcli plot RUN``: the loss and accuracy curves of a training run, as a PNG."""

from __future__ import annotations

import os

import click

from peftcli.cli.output import emit_json, json_option


@click.command()
@click.argument("run", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="PNG to write (default RUN/curves.png).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
def plot(run, out, force, as_json):
    """Plot RUN's training loss, validation loss and accuracy (needs the plot extra).

    \b
    A lottery-ticket run gets validation accuracy (or loss) against the ticket's density.

    \b
    Example:
      pip install -e ".[plot]"
      peftcli plot runs/lora/ -o lora.png
      peftcli plot runs/lth/ --json | jq .png
    """
    from peftcli.training.plot import plot_run, read_rounds

    default = out is None
    out = out or os.path.join(run, "curves.png")
    written = plot_run(run, out, force=force or default)  # the default file is ours to refresh
    if as_json:
        emit_json({"schema": "peftcli.plot/1", "run": run, "png": written, "kind": "rounds" if read_rounds(run) else "steps",
                   "bytes": os.path.getsize(written)})
    else:
        click.echo(written)
