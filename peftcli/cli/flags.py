"""How the running command spells the library's field names: ``max_length`` → ``--max-length``.

Library errors name options by field (see ``peftcli.errors``); the CLI renders them with the
flags of the command that was resolved, which groups note in ``ctx.meta`` as they resolve it.
"""

from __future__ import annotations

import click

_COMMAND_KEY = "peftcli.command"  # ctx.meta (shared by a context chain): the innermost command resolved


def command_flags(cmd: click.Command) -> dict[str, str]:
    """Field name → how ``cmd``'s command line spells it: ``max_length`` → ``--max-length``,
    ``model`` → ``MODEL``. A parameter whose Python name differs from its long flag (``-o/--output``
    stored as ``out``) is known under both."""
    flags: dict[str, str] = {}
    for param in cmd.params:
        if isinstance(param, click.Argument):
            flags[param.name or ""] = param.make_metavar(click.Context(cmd)) if param.name else ""
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        if not longs or not param.name:
            continue
        flags[param.name] = longs[0]
        flags.setdefault(longs[0][2:].replace("-", "_"), longs[0])
    return flags


class CommandRecorder(click.Group):
    """A group that notes in ``ctx.meta`` which subcommand it resolved, so that an error can be
    rendered with that command's flags after its context is gone."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            ctx.meta[_COMMAND_KEY] = cmd
        return name, cmd, rest


def resolved_flags(ctx: click.Context) -> dict[str, str] | None:
    """The flags of the innermost command resolved under ``ctx``, or None before one was."""
    cmd = ctx.meta.get(_COMMAND_KEY)
    if cmd is None or getattr(cmd, "fields_are_keys", False):  # `peftcli run`: a recipe's keys are the fields
        return None
    return command_flags(cmd)
