"""``python -m peftcli.cli.prepare``: make a recipe's built-in inputs by hand.

The commands ``peftcli run --dry-run`` prints for a recipe's built-ins
(``peftcli.recipes.prepare``), with the CLI's error contract (``PeftcliGroup``)::

    python -m peftcli.cli.prepare sentiment OUT.jsonl --examples 800 --seed 1
    python -m peftcli.cli.prepare topic OUT.jsonl --examples 200 --seed 2
    python -m peftcli.cli.prepare tiny OUT [--arch llama|llama-tied|bert|gpt2] [--seed N]

The data sets and models are the library's (``peftcli.recipes.prepare``, ``peftcli.tiny``);
this module only parses. It is not a ``peftcli`` subcommand: these are demonstration inputs,
not model surgery.
"""

from __future__ import annotations

import os

import click

from peftcli.cli import PeftcliGroup
from peftcli.errors import UsageError
from peftcli.recipes.prepare import DATASETS, DEFAULT_EXAMPLES, MAX_EXAMPLES, MAX_SEED, TINY_ARCHS, build_tiny, write_data

PROG = "python -m peftcli.cli.prepare"


@click.group(cls=PeftcliGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def prepare() -> None:
    """Write a recipe's built-in data set or tiny model."""


def _data_command(name: str) -> click.Command:
    @click.command(name=name, help=f"Write the built-in {name!r} data set as JSON lines at OUT.")
    @click.argument("out")
    @click.option("--examples", type=int, default=DEFAULT_EXAMPLES, show_default=True, help="How many rows.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Which rows (the same seed, the same file).")
    @click.option("--force", is_flag=True, help="Replace a different file at OUT.")
    def command(out: str, examples: int, seed: int, force: bool) -> None:
        if not 1 <= examples <= MAX_EXAMPLES or not 0 <= seed <= MAX_SEED:
            raise UsageError(
                f"--examples must be from 1 to {MAX_EXAMPLES} and --seed from 0 to {MAX_SEED}",
                f"e.g. --examples {DEFAULT_EXAMPLES} --seed 0",
            )
        write_data(name, out, examples, seed, force=force)

    return command


for _name in DATASETS:
    prepare.add_command(_data_command(_name))


@prepare.command()
@click.argument("out")
@click.option("--arch", type=click.Choice(TINY_ARCHS), default="llama", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives byte-identical files.")
def tiny(out: str, arch: str, seed: int) -> None:
    """Save the tiny seeded ARCH model (and a word tokenizer) to OUT; print OUT.

    An OUT that already holds a model is kept (reruns reuse it).
    """
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED}", "e.g. --seed 0")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise UsageError(f"{out} exists and is not a model directory", "choose another path")
    build_tiny(arch, out, seed)
    click.echo(out)


if __name__ == "__main__":
    prepare.main(prog_name=PROG)
