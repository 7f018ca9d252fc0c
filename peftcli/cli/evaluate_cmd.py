"""``peftcli evaluate MODEL --data FILE``: validation loss and accuracy (a thin layer over ``peftcli.evaluation``).

Also the command behind a recipe's evaluate step.
"""

from __future__ import annotations

import click

from peftcli.cli.output import emit_json, json_option, printable
from peftcli.evaluation import EvalOptions  # imports no torch: that happens inside the command
from peftcli.cli.options import click_options
from peftcli.options import from_options


@click.command()
@click.argument("model", type=click.Path())
@click_options(EvalOptions)
@json_option
def evaluate(model, as_json, **options):
    """Validation loss (and accuracy, for classification) of MODEL on --data.

    MODEL is a base checkpoint, an adapter run (or its best/) or a standalone checkpoint
    (merged, or trained with --full). The numbers are the training loop's own. A model
    without a classification head gets a new one seeded like training's (--seed), the
    untrained baseline; --head RUN takes the head trained in RUN. --compare OTHER adds how
    often OTHER's predictions agree with MODEL's. On sft and chat data the model also answers
    each prompt greedily (--max-new-tokens), scored by exact match and F1 against the
    reference, or as a classifier with --labels.

    \b
    Examples:
      peftcli evaluate runs/lora/ --data dev.jsonl
      peftcli evaluate merged/ --data dev.jsonl --compare runs/lora/ --min-agreement 1
      peftcli evaluate multi/ --data sst2-dev.jsonl --head runs/sst2/
      peftcli evaluate runs/chat/ --data dev.jsonl --labels positive,negative --predictions answers.jsonl
    """
    from peftcli.evaluation import describe
    from peftcli.evaluation import evaluate as run_evaluate

    doc = run_evaluate(model, from_options(EvalOptions, options))
    if as_json:
        emit_json(doc)
    else:
        click.echo(printable(f"{model}: {describe(doc)}"))
