"""``peftcli plot RUN``: the loss and accuracy curves of a training run, as a PNG."""

from __future__ import annotations

import os

import click


@click.command()
@click.argument("run", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="PNG to write (default RUN/curves.png).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def plot(run, out, force):
    """Plot RUN's training loss, validation loss and accuracy (needs the plot extra).

    \b
    Example:
      pip install -e ".[plot]"
      peftcli plot runs/lora/ -o lora.png
    """
    from peftcli.train.plot import plot_run

    default = out is None
    out = out or os.path.join(run, "curves.png")
    click.echo(plot_run(run, out, force=force or default))  # the default file is ours to refresh
