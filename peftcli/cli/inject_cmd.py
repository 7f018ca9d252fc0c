"""``peftcli inject METHOD``: write an adapter directory with freshly initialised φ.

One subcommand per registered method, its options generated from the method's config class.
"""

from __future__ import annotations

import click

from peftcli.cli.flags import CommandRecorder, command_flags
from peftcli.cli.output import emit_json, json_option, stdout_console
from peftcli.methods import METHODS
from peftcli.cli.options import SEED, click_options
from peftcli.options import from_options


def _command(method) -> click.Command:
    examples = "\n".join("  " + e for e in method.examples)

    @click.command(name=method.name, help=f"{method.summary}\n\n\b\nExamples:\n{examples}")
    @click.argument("model", type=click.Path())
    @click.option(
        "-o", "--output", "out", type=click.Path(),
        help="Adapter directory to create (default: runs/MODEL-METHOD/ in the current directory, printed).",
    )
    @click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the initialisation.")
    @click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
    @click.option("--allow-pickle", is_flag=True, help="Allow a PyTorch .bin/.pt base (torch.load(weights_only=True)).")
    @json_option
    @click_options(method.config_cls)
    def command(model, out, seed, force, allow_pickle, as_json, **options):
        from peftcli.injection import inject

        cfg = from_options(method.config_cls, options)
        out = out if out is not None else default_output(model, method.name)
        budget = inject(model, method.name, cfg, out, seed=seed, force=force, allow_pickle=allow_pickle)
        if method.name == "lora":  # PEFT issue 2777: on stderr, so --quiet and --json stdout stay clean
            from peftcli.methods.lora.embeddings import tied_lora_warning

            warning = tied_lora_warning(model, [r.module for r in budget.rows], allow_pickle)
            if warning:
                click.echo(warning, err=True)
        if as_json:
            emit_json({"schema": "peftcli.inject/1", "output": out, "budget": budget.to_json()})
            return
        from peftcli.cli.render import render_budget

        console = stdout_console()
        render_budget(budget.to_json(), console)
        note = getattr(method, "inject_note", lambda cfg: None)(cfg)  # e.g. LoRA's PiSSA: the base PEFT loads it on
        if note:
            console.print(note, markup=False, highlight=False)
        console.print(f"wrote {out}")

    return command


def default_output(model: str, method: str) -> str:
    """``runs/<model name>-<method>``: where an adapter goes when ``-o`` is not given."""
    import os

    name = os.path.basename(os.path.normpath(os.path.abspath(model)))
    if os.path.isfile(model):  # model.safetensors, x.bin: the directory names the model better
        stem = os.path.splitext(name)[0]
        parent = os.path.basename(os.path.dirname(os.path.abspath(model)))
        name = parent if stem in ("model", "pytorch_model") and parent else stem
    return os.path.join("runs", f"{name or 'model'}-{method}")


class _MethodGroup(CommandRecorder):
    """The methods as subcommands; an unknown one is the registry's usage error (the methods, the closest)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            from peftcli.errors import PeftcliError
            from peftcli.methods import get_method

            try:
                get_method(name)  # raises: "unknown method 'lroa' (did you mean 'lora'?) (choose one of: ...)"
            except PeftcliError as exc:
                # A suggestion may name another method's option field ('lora `dora`'): no method
                # was resolved, so render with the flags of them all (one flag per field name).
                exc.flags = {k: v for c in self.commands.values() for k, v in command_flags(c).items()}  # type: ignore[attr-defined]
                raise
        return super().resolve_command(ctx, args)


@click.group(cls=_MethodGroup)
def inject() -> None:
    """Add a PEFT method's parameters φ to a model: writes an adapter directory.

    Works from config.json and tensor headers: the model is never built. Prints what was
    added per target and in total (the numbers of `peftcli inspect --budget`).

    Without -o the adapter goes to runs/MODEL-METHOD/ (e.g. runs/smollm2-lora/), printed.

    \b
    Example:
      peftcli inject lora --rank 8 model/ -o runs/lora/
      peftcli inject lora --rank 8 model/          # writes runs/model-lora/
    """


for _method in METHODS.values():
    inject.add_command(_command(_method))
