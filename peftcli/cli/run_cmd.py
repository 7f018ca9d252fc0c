"""``peftcli run RECIPE``: run a recipe (a YAML pipeline of subcommand steps).

A thin layer over ``peftcli.recipes`` (the format is documented there and in
recipes/README.md).
"""

from __future__ import annotations

import click

from peftcli.cli.output import emit_json, json_option, printable, quiet_option, stdout_console


@click.command()
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")
@click.option("-o", "--workdir", type=click.Path(), help="Directory the steps write into (default: the recipe's workdir, else runs/NAME).")
@click.option("--dry-run", is_flag=True, help="Print the equivalent peftcli commands, one per step, and write nothing.")
@click.option("--force", is_flag=True, help="Replace the outputs of an earlier run of the recipe (passes --force to every step).")
@quiet_option
@json_option
def run(recipe, overrides, workdir, dry_run, force, quiet, as_json):
    """Run the steps of the YAML RECIPE in order (inspect, inject, train, diff, convert,
    merge, combine, check, evaluate), each with its subcommand's options.

    KEY.SUB=VALUE overrides a recipe value before it is checked: a step's option
    (train.lr=1e-4), an input (model=DIR, data.train=FILE) or a variable (train_steps=50);
    VALUE is read as YAML. Unknown keys are errors naming the closest valid key. Every
    step writes inside the workdir. Progress goes to stderr, a summary (or with --json one
    peftcli.run/1 document) to stdout.

    \b
    Examples:
      peftcli run recipes/quickstart.yaml
      peftcli run recipes/lora.yaml train.lr=1e-4 inject.rank=16 data.train=train.jsonl data.eval=dev.jsonl
      peftcli run recipes/task-arithmetic.yaml --dry-run
      peftcli run recipes/lora.yaml model=path/to/model -o runs/mine --json
    """
    from peftcli.recipes import execute, plan

    p = plan(recipe, list(overrides), workdir=workdir, force=force)
    if dry_run:
        if as_json:
            emit_json({**p.to_json(), "dry_run": True})
        else:
            for line in p.lines():
                click.echo(line)
        return
    progress = None
    log = (lambda line: None) if quiet else (lambda line: click.echo(printable(line), err=True))
    if not quiet:
        from peftcli.cli.train_cmd import Progress

        progress = Progress
    doc = execute(p, force=force, log=log, progress=progress)
    if as_json:
        emit_json(doc)
        return
    _render(doc)


def _render(doc: dict) -> None:
    from rich.table import Table

    from peftcli.recipes.steps import describe

    table = Table(title=f"{doc['name']}: {len(doc['steps'])} steps in {doc['seconds']:.1f} s, workdir {doc['workdir']}", title_justify="left")
    for col, justify in (("step", "left"), ("kind", "left"), ("result", "left"), ("time", "right")):
        table.add_column(col, justify=justify)
    for s in doc["steps"]:
        table.add_row(printable(s["id"]), s["kind"], printable(describe(s["kind"], s["result"])), f"{s['seconds']:.1f} s")
    stdout_console().print(table)


run.fields_are_keys = True  # type: ignore[attr-defined]  # a step's errors name recipe keys, which are the fields
