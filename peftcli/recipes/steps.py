"""The step kinds of a recipe: one per subcommand, with the subcommand's own options.

A step's keys are the options and arguments of the click command it stands for (the same
click parameters, generated from the same ``peftcli.options`` dataclasses, that parse the
command line), so a recipe key and a CLI flag can never disagree. A step is turned into the
argument list of that command, parsed by click exactly as the shell line would be, and the
parsed values go to the Python API function the command calls. The argument list is what
``--dry-run`` prints, so a printed line and the executed step are one thing.

Key names are the long flag without dashes (``--reduction-factor`` → ``reduction_factor``;
the shortest spelling when a flag has several, e.g. ``eval`` for ``--eval/--eval-data``, the
others being accepted too) or the argument's name (``model``, ``run``, ``inputs``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import click

from peftcli.errors import BadInputError, UsageError
from peftcli.options import from_options

# Command-line switches that are the runner's business, not a step's: output format, progress,
# and re-launching (``--nproc`` re-executes sys.argv; ``--resume`` is a rerun, not a pipeline step).
RUNNER_FLAGS = {"as_json", "quiet", "nproc", "resume"}


@dataclass(frozen=True)
class Key:
    name: str  # the recipe key
    param: click.Parameter
    flag: str | None  # the option spelling printed; None for a positional argument
    path: bool  # a filesystem path (resolved against the workdir)


@dataclass
class Kind:
    """How one step kind maps onto a command and its API call."""

    name: str
    summary: str
    outputs: tuple[str, ...] = ()  # keys naming what the step writes (must stay inside the workdir)
    creates: tuple[str, ...] = ()  # outputs that must not exist yet (unless --force)
    extra_paths: tuple[str, ...] = ()  # path-valued keys whose click type is a plain string
    required: tuple[str, ...] = ()  # keys a recipe must give beyond what click requires
    selector: str | None = None  # a key choosing a subcommand (inject's method)

    def command(self, body: dict) -> tuple[click.Command, list[str]]:
        """The click command for a step body, and the words that invoke it."""
        from peftcli.cli import cli

        if self.name == "evaluate":
            from peftcli.cli.evaluate_cmd import evaluate

            # Printed as a peftcli subcommand once the group registers it.
            words = ["peftcli", "evaluate"] if "evaluate" in cli.commands else ["python", "-m", "peftcli.evaluate"]
            return evaluate, words
        cmd = cli.commands[self.name]
        if self.selector is None:
            return cmd, ["peftcli", self.name]
        choice = body.get(self.selector)
        choices = sorted(cmd.commands)
        if choice is None:
            raise UsageError(f"needs {self.selector}: one of {', '.join(choices)}", f"add e.g. {self.selector}: {choices[0]} to the step")
        if choice not in cmd.commands:
            raise UsageError(f"unknown {self.selector} {choice!r}{suggest(str(choice), choices)}", "choose one of: " + ", ".join(choices))
        return cmd.commands[choice], ["peftcli", self.name, choice]

    def keys(self, cmd: click.Command) -> tuple[dict[str, Key], dict[str, str]]:
        """Recipe keys of ``cmd`` and the aliases (other spellings) that name them."""
        keys: dict[str, Key] = {}
        aliases: dict[str, str] = {}
        for p in cmd.params:
            if p.name in RUNNER_FLAGS:
                continue
            if isinstance(p, click.Argument):
                name, flag = p.name, None
            else:
                longs = [o for o in p.opts if o.startswith("--")]
                flag = min(longs, key=len)
                name = flag[2:].replace("-", "_")
            path = isinstance(p.type, click.Path) or name in self.extra_paths
            keys[name] = Key(name, p, flag, path)
            spellings = {name, p.name}
            if isinstance(p, click.Option):
                spellings |= {o[2:].replace("-", "_") for o in p.opts if o.startswith("--")}
            for s in spellings:
                aliases[s] = name
        if self.selector is not None:
            aliases[self.selector] = self.selector
        return keys, aliases


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("inspect", "summarise a checkpoint, adapter or diff (and a method's budget)"),
        Kind("inject", "write an adapter directory with fresh φ", outputs=("output",), creates=("output",), selector="method"),
        Kind("train", "train an adapter run (or --full)", outputs=("run",), extra_paths=("model", "data", "eval"), required=("data",)),
        Kind("diff", "φ = finetuned − base as a sparse .diff", outputs=("output",), creates=("output",)),
        Kind("convert", "an adapter as a .diff, or a .diff as LoRA", outputs=("output",), creates=("output",)),
        Kind("merge", "fold adapters, diffs or fine-tunes into a checkpoint", outputs=("output",), creates=("output",), required=("output",)),
        Kind("combine", "arithmetic on .diff files", outputs=("output",), creates=("output",)),
        Kind("check", "pre-flight of adapters and diffs against a base"),
        Kind(
            "evaluate", "validation loss / accuracy of a model, run or checkpoint",
            extra_paths=("data", "base", "head", "compare"),
        ),
    )
}


def display(path: str) -> str:
    """How a path is written in commands: relative to the current directory when inside it."""
    import os

    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def suggest(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_argv(kind: Kind, keys: dict[str, Key], body: dict, where: str) -> list[str]:
    """The command-line arguments (after the command words) equal to a resolved step body."""
    positional: list[str] = []
    options: list[str] = []
    for key in [k for k in keys.values() if k.flag is None]:
        p = key.param
        value = body.get(key.name)
        if value is None:
            if p.required:
                raise UsageError(f"{where}: missing key {key.name!r}", f"{kind.name} needs {_wants(keys)}")
            continue
        values = value if isinstance(value, list) else [value]
        if p.nargs != -1 and len(values) != 1:
            raise UsageError(f"{where}: {key.name} takes one value, got a list", f"write {key.name}: VALUE, not a [list]")
        for v in values:
            positional.append(_safe_positional(_scalar(v, key, where)))
    for name in kind.required:
        if body.get(name) is None:
            raise UsageError(f"{where}: missing key {name!r}", f"a {kind.name} step in a recipe needs {name}")
    for name, value in body.items():
        key = keys.get(name)
        if key is None or key.flag is None or value is None:
            continue
        if key.param.is_flag:
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {name} is a switch: give true or false, not {value!r}", f"write {name}: true or {name}: false")
            if value:
                options.append(key.flag)
            continue
        if isinstance(value, list):
            value = ",".join(_scalar(v, key, where) for v in value)  # --targets q,v; --weights 1,0.5
        options += [key.flag, _scalar(value, key, where)]
    return positional + options


def _wants(keys: dict[str, Key]) -> str:
    return ", ".join(k.name for k in keys.values() if k.flag is None)


def _scalar(value: Any, key: Key, where: str) -> str:
    if isinstance(value, bool):
        raise UsageError(f"{where}: {key.name} takes a value, not {str(value).lower()}", f"write {key.name}: VALUE, or leave the key out")
    if isinstance(value, (dict, list)):
        raise UsageError(f"{where}: {key.name} takes a single value, not {type(value).__name__}", f"write {key.name}: VALUE with one string or number")
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _safe_positional(text: str) -> str:
    # A relative path starting with '-' would be read as an option.
    return "./" + text if text.startswith("-") else text


def parse(cmd: click.Command, words: list[str], argv: list[str], where: str) -> dict:
    """Parse ``argv`` as the command line would be: click's own types, choices and checks."""
    try:
        ctx = cmd.make_context(" ".join(words), list(argv), resilient_parsing=False)
    except click.ClickException as exc:
        raise UsageError(f"{where}: {exc.format_message()}", f"the step's keys are the options of {' '.join(words)}: see its --help") from None
    return dict(ctx.params)


# -- the API call behind each kind: the same calls the subcommands make -------------------------

Runner = Callable[["Context"], dict]


@dataclass
class Context:
    """What a running step may use: where to say things, and progress for training."""

    log: Callable[[str], None] = lambda line: None
    progress: Callable[[int], Any] | None = None  # log_every -> a progress object (train_cmd.Progress); None: quiet


def build(kind: str, cmd: click.Command, p: dict) -> Runner:
    """Check the parsed options as the command does, before anything runs; return the call."""
    return _BUILDERS[kind](cmd, p)


def _build_inspect(cmd, p) -> Runner:
    from peftcli.cli.inspect_cmd import _BUDGET_OPTION_NAMES, FILTER_HINT
    from peftcli.methods import get_method
    from peftcli.options import option_fields

    method_options = {k: v for k, v in p.items() if k in _BUDGET_OPTION_NAMES}
    given = sorted(k for k, v in method_options.items() if v is not None)
    if given and not p["budget"]:
        raise UsageError(f"{given[0]} only applies with budget", "add e.g. budget: lora")
    if p["name_filter"]:
        from peftcli.patterns import compile_pattern

        compile_pattern(p["name_filter"], "--filter", FILTER_HINT)  # as inspect compiles it: bounded
    method = get_method(p["budget"]) if p["budget"] else None
    cfg = None
    if method is not None:
        unused = [k for k in given if k not in {f.name for f in option_fields(method.config_cls)}]
        if unused:
            raise UsageError(
                f"{unused[0]} is not an option of {method.name}", f"drop it; see peftcli inject {method.name} --help for {method.name}'s options"
            )
        cfg = from_options(method.config_cls, method_options)

    def run(ctx: Context) -> dict:
        from peftcli.checkpoint.reader import open_checkpoint
        from peftcli.methods.base import Budget
        from peftcli.summary import summarize

        with open_checkpoint(p["path"], allow_pickle=p["allow_pickle"]) as ckpt:
            report = summarize(ckpt, with_tensors=p["with_tensors"], name_filter=p["name_filter"], max_depth=p["depth"])
            if method is not None:
                if report["format"] != "checkpoint":
                    raise UsageError(f"budget needs a base checkpoint, and {p['path']} is a {report['format']}", "set path to the base model instead")
                report["budget"] = Budget.of(method, ckpt, cfg).to_json()
        return report

    return run


def _build_inject(cmd, p) -> Runner:
    from peftcli.methods import get_method

    method = get_method(cmd.name)
    cfg = from_options(method.config_cls, p)

    def run(ctx: Context) -> dict:
        from peftcli.inject import inject

        budget = inject(p["model"], method.name, cfg, p["out"], seed=p["seed"], force=p["force"], allow_pickle=p["allow_pickle"])
        return {"schema": "peftcli.inject/1", "output": p["out"], "budget": budget.to_json()}

    return run


def _build_train(cmd, p) -> Runner:
    from peftcli.train.config import TrainConfig

    cfg = from_options(TrainConfig, p)

    def run(ctx: Context) -> dict:
        from peftcli.train.loop import train

        progress = ctx.progress(cfg.log_every) if ctx.progress else None
        summary = train(p["run"], cfg, force=p["force"], log=ctx.log, progress=progress)
        return {"schema": "peftcli.train/1", **summary}

    return run


def _build_diff(cmd, p) -> Runner:
    from peftcli.diff import DiffOptions

    cfg = from_options(DiffOptions, p)

    def run(ctx: Context) -> dict:
        from peftcli.diff import diff

        return diff(p["base"], p["finetuned"], p["out"], cfg, force=p["force"], allow_pickle=p["allow_pickle"]).to_json()

    return run


def _build_convert(cmd, p) -> Runner:
    from peftcli.cli.convert_cmd import _DIFF_OPTIONS
    from peftcli.diff import DiffOptions

    diff_options = {k: v for k, v in p.items() if k in _DIFF_OPTIONS}
    given = sorted(k for k, v in diff_options.items() if v not in (None, False))
    if p["target"] == "lora":
        if given:
            raise UsageError(f"{given[0]} only applies with to: diff", "drop it, or set to: diff")

        def run_lora(ctx: Context) -> dict:
            from peftcli.convert import diff_to_lora

            return diff_to_lora(p["source"], p["out"], p["rank"], base=p["base"], force=p["force"]).to_json()

        return run_lora
    cfg = from_options(DiffOptions, {k: (v if v is not False else None) for k, v in diff_options.items()})

    def run(ctx: Context) -> dict:
        from peftcli.convert import adapter_to_diff

        return adapter_to_diff(p["source"], p["out"], cfg, base=p["base"], force=p["force"]).to_json()

    return run


def _build_merge(cmd, p) -> Runner:
    def run(ctx: Context) -> dict:
        from peftcli.cli.merge_cmd import method_options
        from peftcli.merge.engine import merge

        return merge(
            p["base"], list(p["inputs"]), p["out"], weights=p["weights"], method=p["method"], options=method_options(p),
            seed=p["seed"], dtype=p["dtype"], max_shard_size=p["max_shard_size"], force=p["force"], allow_pickle=p["allow_pickle"],
            heads=p["heads"],
        ).to_json()

    return run


def _build_combine(cmd, p) -> Runner:
    from peftcli.combine import coefficients, parse_weights

    weights = parse_weights(p["weights"]) if p["weights"] is not None else None
    coefficients(p["op"], len(p["inputs"]), p["by"], weights)  # the option checks, before anything runs

    def run(ctx: Context) -> dict:
        from peftcli.combine import combine

        return combine(list(p["inputs"]), p["op"], p["out"], by=p["by"], weights=weights, values=p["values"], force=p["force"]).to_json()

    return run


def _build_check(cmd, p) -> Runner:
    def run(ctx: Context) -> dict:
        from peftcli.check import check
        from peftcli.cli.check_cmd import _failure

        report = check(p["base"], list(p["artifacts"]), content=p["content"], scan_base=p["scan_base"], allow_pickle=p["allow_pickle"])
        if not report.ok:
            raise BadInputError(_failure(report), "peftcli check with --json lists every problem")
        return report.to_json()

    return run


def _build_evaluate(cmd, p) -> Runner:
    from peftcli.evaluate import EvalOptions

    opts = from_options(EvalOptions, p)

    def run(ctx: Context) -> dict:
        from peftcli.evaluate import evaluate

        return evaluate(p["model"], opts)

    return run


_BUILDERS = {
    "inspect": _build_inspect, "inject": _build_inject, "train": _build_train, "diff": _build_diff, "convert": _build_convert,
    "merge": _build_merge, "combine": _build_combine, "check": _build_check, "evaluate": _build_evaluate,
}


def describe(kind: str, doc: dict) -> str:
    """One line saying what a step's result was, for the summary table."""
    if kind == "inspect":
        text = f"{doc['format']}: {doc['num_params']:,} params in {doc['num_tensors']} tensors"
        if doc.get("budget"):
            b = doc["budget"]
            text += f"; {b['method']} adds {b['trainable_params']:,} ({b['pct_of_base']:.3f}% of the base)"
        return text
    if kind == "inject":
        b = doc["budget"]
        return f"wrote {doc['output']}: {b['method']}, {b['trainable_params']:,} trainable params ({b['pct_of_base']:.3f}% of the base)"
    if kind == "train":
        text = f"{doc['steps']} steps" + (" (stopped early)" if doc["stopped_early"] else "")
        if doc.get("final_loss") is not None:
            n = doc.get("final_loss_steps")
            text += f", final loss {doc['final_loss']:.4f}" + (f" (mean of the last {n} steps)" if n else "")
        best = doc.get("best") or {}
        if best.get("eval_loss") is not None:
            text += f", best eval loss {best['eval_loss']:.4f} at step {best['step']}"
            if best.get("eval_accuracy") is not None:
                text += f" (accuracy {best['eval_accuracy']:.4f})"
        return text
    if kind in ("diff", "combine") or (kind == "convert" and doc.get("to") != "lora"):
        return f"wrote {doc['output']}: {doc['k']:,} of {doc['n']:,} entries (density {doc['density']:.4g})"
    if kind == "convert":
        return f"wrote {doc['output']}: rank {doc['rank']} LoRA keeping {100 * doc['kept_energy']:.2f}% of ‖φ‖²"
    if kind == "merge":
        return f"wrote {doc['output']}: {doc['changed_tensors']} of {doc['tensors']} tensors changed ({doc['method']})"
    if kind == "check":
        n = len(doc.get("artifacts", []))
        return f"ok: {n} artifact{'s fit' if n != 1 else ' fits'} the base" if n else "ok: the base passes its checks"
    if kind == "evaluate":
        from peftcli.evaluate import describe as describe_eval

        return describe_eval(doc)
    return ""
