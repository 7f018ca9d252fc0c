"""``peftcli inspect``: what is in a checkpoint, adapter or diff, and what a method would add."""

from __future__ import annotations

import click

from peftcli.cli.options import click_options
from peftcli.cli.output import emit_json, json_option, stdout_console
from peftcli.summary import InspectOptions, budget_option_classes


@click.command()
@click.argument("path", type=click.Path(exists=False))
@json_option
@click_options(InspectOptions)
@click_options(*budget_option_classes())
def inspect(path, as_json, **values):
    """Summarise a checkpoint, adapter directory or sparse diff at PATH.

    Reads headers only: a checkpoint of any size is summarised from kilobytes.

    \b
    Examples:
      peftcli inspect model/
      peftcli inspect model.safetensors --json | jq .num_params
      peftcli inspect model/ --tensors --filter 'layers\\.0\\..*proj'
      peftcli inspect model/ --budget lora --rank 16 --targets q_proj,v_proj
    """
    from peftcli.summary import inspect as run_inspect
    from peftcli.summary import inspect_options

    report = run_inspect(path, inspect_options(values))
    if as_json:
        emit_json(report)
    else:
        from peftcli.cli.render import render_inspect

        render_inspect(report, stdout_console())
