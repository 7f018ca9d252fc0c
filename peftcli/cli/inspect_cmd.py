"""``peftcli inspect``: what is in a checkpoint, adapter or diff, and what a method would add.

``--budget METHOD`` takes METHOD's own options (those of ``peftcli inject METHOD``). They are
parsed by one set of flags shared by every method, hidden from ``inspect --help``, which lists
them per method instead: ``peftcli inspect --budget METHOD --help`` shows METHOD's, generated
from its config class as ``inject``'s subcommands are.
"""

from __future__ import annotations

import click

from peftcli.cli.options import click_options
from peftcli.cli.output import emit_json, json_option, stdout_console
from peftcli.methods import METHODS
from peftcli.options import option_fields
from peftcli.summary import InspectOptions, budget_option_classes


def _method_params(method) -> list[click.Parameter]:
    """METHOD's budget options as click parameters of their own (for its --help section only)."""
    return click.command()(click_options(method.config_cls)(lambda **_: None)).params


class _InspectCommand(click.Command):
    """``inspect``, whose --help lists a budget method's options after ``--budget METHOD``."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)  # inspect's own options (the method flags are hidden)
        name = ctx.params.get("budget")  # --budget is eager: read before --help when given first
        if name in METHODS:
            records = [r for p in _method_params(METHODS[name]) if (r := p.get_help_record(ctx))]
            with formatter.section(f"Options of --budget {name}"):
                formatter.write_dl(records)
            return
        with formatter.section("Budget options"):
            formatter.write_text(
                "Each method takes its own options, as `peftcli inject METHOD` does: "
                "`peftcli inspect --budget METHOD --help` lists them."
            )


    def shell_complete(self, ctx: click.Context, incomplete: str) -> list:
        """Completion offers the hidden method flags too, once ``--budget METHOD`` names the method."""
        from click.shell_completion import CompletionItem

        items = super().shell_complete(ctx, incomplete)
        name = ctx.params.get("budget")
        if name in METHODS and incomplete.startswith("-"):
            mine = {f.name for f in option_fields(METHODS[name].config_cls)}
            items += [
                CompletionItem(o, help=p.help) for p in self.params if getattr(p, "hidden", False) and p.name in mine for o in p.opts if o.startswith(incomplete)
            ]
        return items


@click.command(cls=_InspectCommand)
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
      peftcli inspect --budget lora --help
    """
    from peftcli.summary import inspect as run_inspect
    from peftcli.summary import inspect_options

    report = run_inspect(path, inspect_options(values))
    if as_json:
        emit_json(report)
    else:
        from peftcli.cli.render import render_inspect

        render_inspect(report, stdout_console())


_OWN = {f.name for f in option_fields(InspectOptions)}
for _param in inspect.params:
    if _param.name == "budget":
        _param.is_eager = True  # so that `--budget METHOD --help` knows METHOD
    elif isinstance(_param, click.Option) and _param.name not in _OWN and _param.name not in ("as_json", "quiet"):
        _param.hidden = True  # a method's option: listed under --budget METHOD --help
