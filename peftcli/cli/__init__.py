"""The ``peftcli`` click group and the error contract every subcommand inherits.

Exit codes: 0 ok, 1 bad input data, 2 usage, 3 interrupted or resource failure. Every
failure is one line ``error: <what> (<hint>)`` on stderr; ``--debug`` (or PEFTCLI_DEBUG=1)
adds the traceback. Subcommand modules import torch/transformers only inside commands,
so ``peftcli --help`` and shell completion stay instant.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback
from collections.abc import MutableMapping

import click

from peftcli import __version__
from peftcli.cli.flags import CommandRecorder, resolved_flags
from peftcli.errors import EXIT_BAD_INPUT, EXIT_RESOURCE, EXIT_USAGE, Interrupted, PeftcliError

_debug = False
INTERRUPTED_HINT = "outputs are written whole or not at all; rerun the command"


class PeftcliGroup(CommandRecorder):
    """A click group whose ``main`` applies the one-line error contract."""

    def invoke(self, ctx: click.Context):
        from peftcli.patterns import command_budget

        try:
            with command_budget():  # all user and file regexes of this command share one time budget
                return super().invoke(ctx)
        except KeyboardInterrupt:
            # Caught before click's own handler, which would print an empty line first.
            raise Interrupted("interrupted", INTERRUPTED_HINT) from None
        except PeftcliError as exc:
            # The library names fields; the user typed flags: render with the running command's.
            if getattr(exc, "flags", None) is None:
                exc.flags = resolved_flags(ctx)  # type: ignore[attr-defined]
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _debug
        _debug = bool(os.environ.get("PEFTCLI_DEBUG"))
        from peftcli.cli.output import escape_std_streams, restore_stderr

        # Nothing from a file reaches the terminal raw; shell completion's replies (fish's are
        # tab-separated) are for the shell, not a terminal.
        completing = bool(os.environ.get(complete_var or "_PEFTCLI_COMPLETE"))
        restore_std_streams = (lambda: None) if completing else escape_std_streams()
        args = _without_debug(list(sys.argv[1:] if args is None else args))
        try:
            rv = super().main(args, prog_name or "peftcli", complete_var, standalone_mode=False, **extra)
        except BaseException as exc:  # noqa: BLE001 - this is the one place errors become exit codes
            code = _report(exc)
            restore_stderr()
            if not standalone_mode:
                raise
            sys.exit(code)
        finally:
            restore_stderr()
            restore_std_streams()
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return rv


def _without_debug(args: list[str]) -> list[str]:
    """``args`` without ``--debug``, which is accepted anywhere before a ``--`` (after the
    subcommand too: ``peftcli merge ... --debug``), and sets the traceback mode."""
    global _debug
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        _debug = True
        args = [a for a in args[:end] if a != "--debug"] + args[end:]
    return args


def _fail(message: str, code: int, exc: BaseException) -> int:
    from peftcli.cli.output import error_stream, printable

    if _debug:
        traceback.print_exception(exc, file=error_stream())
    click.echo(printable(" ".join(message.split())), file=error_stream())
    return code


def _report(exc: BaseException) -> int:
    """Print the one-line error for ``exc`` and return its exit code."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, PeftcliError):
        return _fail(exc.one_line(getattr(exc, "flags", None)), exc.exit_code, exc)
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        from peftcli.cli.output import error_stream

        click.echo(exc.ctx.get_help() if exc.ctx else "", file=error_stream())
        return EXIT_USAGE
    if isinstance(exc, click.UsageError):
        cmd = exc.ctx.command_path if exc.ctx else "peftcli"
        return _fail(f"error: {exc.format_message()} (see '{cmd} --help')", EXIT_USAGE, exc)
    if isinstance(exc, click.ClickException):
        return _fail(f"error: {exc.format_message()}", exc.exit_code, exc)
    if isinstance(exc, (click.Abort, KeyboardInterrupt)):
        return _fail(f"error: interrupted ({INTERRUPTED_HINT})", EXIT_RESOURCE, exc)
    if isinstance(exc, BrokenPipeError):
        # The reader of our stdout went away (`| head`): not an error worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if isinstance(exc, MemoryError):
        return _fail("error: out of memory (use a machine with more memory or a smaller input)", EXIT_RESOURCE, exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _fail(f"error: no space left on device ({exc.filename or 'output'})", EXIT_RESOURCE, exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
        return _fail(
            f"error: the system refused a resource: {exc.strerror or exc} (too many processes, threads or open "
            "files on this machine; retry when it is less busy, or raise its limits, e.g. ulimit -n)",
            EXIT_RESOURCE, exc,
        )
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        # Thread exhaustion (a full process table, a low ulimit -u): the machine, not peftcli.
        return _fail(
            "error: the system refused to start a thread (too many processes or threads on this machine; "
            "retry when it is less busy, lower --threads, or raise ulimit -u)",
            EXIT_RESOURCE, exc,
        )
    return _fail(
        f"error: internal error: {type(exc).__name__}: {exc} (a bug in peftcli; rerun with --debug for a traceback)",
        EXIT_BAD_INPUT,
        exc,
    )


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global _debug
    _debug = _debug or value
    return value


@click.group(
    cls=PeftcliGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Example: peftcli inspect model/ --budget lora --rank 16 --targets q_proj,v_proj",
)
@click.version_option(__version__, "--version", prog_name="peftcli")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug, help="Show tracebacks on errors.")
def cli() -> None:
    """Model surgery on checkpoints: inspect, adapt, diff, merge.

    Results go to stdout (--json for one JSON document), progress and errors to stderr.
    Exit codes: 0 ok, 1 bad input, 2 usage, 3 interrupted or out of resources.
    """


def main() -> None:
    cli.main(prog_name="peftcli")


# The subcommands as (module, command). A command's module is imported when the command is
# looked up (``peftcli merge`` imports merge_cmd alone; ``--help`` and completion list them all).
COMMANDS = (
    ("inspect_cmd", "inspect"), ("inject_cmd", "inject"), ("train_cmd", "train"), ("plot_cmd", "plot"),
    ("diff_cmd", "diff"), ("merge_cmd", "merge"), ("convert_cmd", "convert"), ("combine_cmd", "combine"),
    ("check_cmd", "check"), ("run_cmd", "run"), ("evaluate_cmd", "evaluate"), ("completion_cmd", "completion"),
    ("export_cmd", "export"),
)


class LazyCommands(MutableMapping):
    """The group's ``commands``: every name is known up front, a command's module is imported
    on first access. click's Group reads ``commands`` through ``get``, ``in`` and iteration
    only, so listing, resolving and completing need no other change."""

    def __init__(self, modules: dict[str, str]):
        self._modules: dict[str, str | None] = dict(modules)
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        cmd = self._loaded.get(name)
        if cmd is None:
            module = self._modules[name]  # KeyError: not a command (Mapping.get answers None)
            cmd = getattr(importlib.import_module(f"peftcli.cli.{module}"), name)
            from peftcli.cli.output import add_quiet

            add_quiet(cmd)  # every subcommand takes --quiet, with one meaning
            self._loaded[name] = cmd
        return cmd

    def __setitem__(self, name: str, cmd: click.Command) -> None:  # Group.add_command
        self._modules.setdefault(name, None)
        self._loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._modules[name]
        self._loaded.pop(name, None)

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


cli.commands = LazyCommands({name: module for module, name in COMMANDS})
