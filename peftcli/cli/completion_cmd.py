"""``peftcli completion SHELL``: print the shell completion script (also shipped in completions/)."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_PEFTCLI_COMPLETE"


def completion_source(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from peftcli.cli import cli

    cls = get_completion_class(shell)
    return cls(cli, {}, "peftcli", COMPLETE_VAR).source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document ({schema, shell, script}) instead of the script.")
def completion(shell: str, as_json: bool) -> None:
    """Print the completion script for SHELL.

    \b
    Example:
      peftcli completion bash > ~/.local/share/bash-completion/completions/peftcli
      peftcli completion zsh > "${fpath[1]}/_peftcli"
      peftcli completion fish > ~/.config/fish/completions/peftcli.fish
    """
    if as_json:
        from peftcli.cli.output import emit_json

        emit_json({"schema": "peftcli.completion/1", "shell": shell, "script": completion_source(shell)})
    else:
        click.echo(completion_source(shell), nl=False)
