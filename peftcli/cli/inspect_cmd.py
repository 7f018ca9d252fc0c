"""``peftcli inspect``: what is in a checkpoint, adapter or diff, and what a method would add."""

from __future__ import annotations

import click

from peftcli.cli.output import emit_json, json_option, stdout_console
from peftcli.errors import UsageError
from peftcli.methods import METHODS, get_method
from peftcli.options import AsciiInt, click_options, from_options, option_fields
from peftcli.patterns import FILTER_HINT, compile_pattern

_BUDGET_CLASSES = [m.config_cls for m in METHODS.values()]
_BUDGET_OPTION_NAMES = {f.name for cls in _BUDGET_CLASSES for f in option_fields(cls)}


@click.command()
@click.argument("path", type=click.Path(exists=False))
@json_option
@click.option("--tensors", "with_tensors", is_flag=True, help="List every tensor: name, shape, dtype, shard.")
@click.option("--filter", "name_filter", metavar="REGEX", help="Only tensors whose name matches REGEX (re.search).")
@click.option("--depth", default=4, show_default=True, type=AsciiInt(1, 64), help="Levels of the module tree to show.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin/.pt files (loaded with torch.load(weights_only=True)).")
@click.option(
    "--budget",
    metavar="METHOD",
    type=click.Choice(sorted(METHODS)),
    help="Show the trainable parameters METHOD would add, per target and in total.",
)
@click_options(*_BUDGET_CLASSES)
def inspect(path, as_json, with_tensors, name_filter, depth, allow_pickle, budget, **method_options):
    """Summarise a checkpoint, adapter directory or sparse diff at PATH.

    Reads headers only: a checkpoint of any size is summarised from kilobytes.

    \b
    Examples:
      peftcli inspect model/
      peftcli inspect model.safetensors --json | jq .num_params
      peftcli inspect model/ --tensors --filter 'layers\\.0\\..*proj'
      peftcli inspect model/ --budget lora --rank 16 --targets q_proj,v_proj
    """
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.summary import summarize

    given = sorted(k for k, v in method_options.items() if v is not None)
    if given and not budget:
        raise UsageError(f"--{given[0].replace('_', '-')} only applies with --budget", "add e.g. --budget lora")
    pattern = compile_pattern(name_filter, "--filter", FILTER_HINT) if name_filter else None  # refused before any reading

    method = get_method(budget) if budget else None
    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        report = summarize(ckpt, with_tensors=with_tensors, name_filter=name_filter, max_depth=depth)
        if method is not None and report["format"] != "checkpoint":
            raise UsageError(f"--budget needs a base checkpoint, and {path} is {'an' if report['format'][0] in 'aeiou' else 'a'} {report['format']}", "pass the base model instead")
        if method is not None:
            from peftcli.methods.base import Budget

            cfg = from_options(method.config_cls, method_options)
            unused = [k for k in given if k not in {f.name for f in option_fields(method.config_cls)}]
            if unused:
                raise UsageError(
                    f"--{unused[0].replace('_', '-')} is not an option of {method.name}",
                    f"drop it; see peftcli inject {method.name} --help for {method.name}'s options",
                )
            report["budget"] = Budget.of(method, ckpt, cfg).to_json()
            if name_filter:  # the listing narrows, the totals stay whole (as for the summary)
                budget = report["budget"]
                named = [t for t in budget["targets"] if " " not in t["module"]]
                if named:
                    budget["targets"] = [t for t in named if _names_match(pattern, t["module"])]
                # else: rows that describe a global selection (lt-sft's top-K) name no tensor
                budget["filter"] = {
                    "pattern": name_filter,
                    "applies": bool(named),
                    "num_targets": len(budget["targets"]),
                    "trainable_params": sum(t["params"] for t in budget["targets"]),
                }
    if as_json:
        emit_json(report)
    else:
        from peftcli.cli.render import render_inspect

        render_inspect(report, stdout_console())


def _names_match(pattern, target: str) -> bool:
    """A budget row against --filter, which names tensors: a module row stands for its weight."""
    return pattern.search(target) or pattern.search(target + ".weight")
