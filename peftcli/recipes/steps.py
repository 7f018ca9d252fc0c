"""The step kinds of a recipe: a table, one row per subcommand, naming its API call and options.

A row (``Kind``) names the library function a step calls, the options classes its keys are
checked against (``peftcli.options`` declarations: the dataclasses the subcommand's flags are
generated from), its positional arguments and the few flags its subcommand takes beside its
options (``-o``, ``--force``, ``--seed``), which keys are paths, and how its result is described.
A recipe key and a CLI flag can therefore never disagree; ``tests/test_options_api.py`` checks
each row's parameters against the command line's.

A step is turned into the argument list of its command (what ``--dry-run`` prints), read back
by those declarations (numbers in ASCII digits, choices, required values, as the command
line is read), and the values build the options object, checked by the library before
anything runs; running the step calls the API function with it. The printed line and the
executed step are one thing.

Key names are the long flag without dashes (``--reduction-factor`` → ``reduction_factor``;
the shortest spelling when a flag has several, e.g. ``eval`` for ``--eval/--eval-data``, the
others being accepted too) or the argument's name (``model``, ``run``, ``inputs``).
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any, Callable

from peftcli.preflight import CheckOptions
from peftcli.combining import CombineOptions, coefficients
from peftcli.conversion import ConvertOptions, convert_options
from peftcli.diffing import DiffOptions
from peftcli.errors import BadInputError, UsageError
from peftcli.evaluation import EvalOptions
from peftcli.merging.methods import option_classes as merge_method_classes
from peftcli.merging.options import MergeOptions, merge_options
from peftcli.merging.quantized import GgufOutputOptions
from peftcli.methods import METHODS
from peftcli.options import ascii_float, ascii_int, flag_name, from_options, option, option_fields
from peftcli.summary import InspectOptions, budget_option_classes, inspect_options
from peftcli.training.config import TrainConfig

# Not step keys: the subcommands' --json and --quiet (output format, progress) and train's --nproc
# and --resume (a re-launch, a rerun) are the runner's business, so no row declares them.
# (check's --nproc is an option of its training-memory prediction: a step key.)
RUNNER_FLAGS = {"as_json", "quiet"}
RUNNER_FLAGS_OF = {"train": {"nproc", "resume"}}


# -- the flags a subcommand takes beside its options class ------------------------------------


@dataclass
class _Output:
    out: str | None = option(None, "--output", flag="-o", path=True, help="what the step writes")  # -o first, as the command declares it


@dataclass
class _MergeConfig:
    config: str | None = option(None, path=True, help="a mergekit YAML merge configuration (instead of base and inputs)")


@dataclass
class _RequiredOutput:
    out: str | None = option(None, "--output", flag="-o", path=True, required=True, help="what the step writes")


@dataclass
class _Force:
    force: bool = option(False, help="replace the output if it exists")


@dataclass
class _Pickle:
    allow_pickle: bool = option(False, help="allow PyTorch .bin/.pt checkpoints")


@dataclass
class _Seed:
    seed: int = option(0, min=0, max=2**63 - 1, show_default=True, help="seed of the initialisation")


# -- a command's parameters, from the declarations ----------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a step's command: a positional argument (no ``opts``) or a flag."""

    name: str  # where its value goes (out, name_filter, target)
    opts: tuple[str, ...] = ()  # the flags; () for a positional argument
    field: Any = None  # the option() declaration (type, choices, bounds); None for an argument
    hint: Any = str  # the declared type
    nargs: int = 1  # -1: any number of positional values
    required: bool = False
    is_flag: bool = False
    default: Any = None
    bounded: bool = False  # an int refused outside its declared min/max as it is read (as the command line's range does)

    @property
    def path(self) -> bool:
        return self.field is None or bool(self.field.metadata.get("path"))


@dataclass(frozen=True)
class Command:
    """The parameters a step kind takes, in the order its subcommand declares them."""

    params: tuple[Param, ...]


def arg(name: str, nargs: int = 1, required: bool = True) -> Param:
    return Param(name, nargs=nargs, required=required)


def option_params(*classes: type, bounded: bool = False) -> tuple[Param, ...]:
    """The flags of ``classes``' option fields (a name two classes declare counts once);
    ``bounded``: ints are checked against their bounds as they are read (no options class
    checks these flags later)."""
    seen: dict[str, Param] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            if f.name in seen:
                continue
            meta = f.metadata
            seen[f.name] = Param(
                f.name, (flag_name(f), *meta["decls"]), f, hints[f.name], required=bool(meta.get("required")),
                is_flag=_base(hints[f.name]) is bool, default=f.default if meta.get("show_default") else None, bounded=bounded,
            )
    return tuple(seen.values())


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One step kind: its subcommand's parameters, how they become options, and the API call."""

    name: str
    summary: str
    params: Callable[[str | None], tuple[Param, ...]]  # the parameters (of the selected method, for inject)
    api: str  # "module:function": the library function the step calls (imported when it runs)
    options: Callable[[dict], Any]  # the options object from the parsed values, checked (UsageError)
    call: Callable[..., Any]  # (api, values, options, context) -> the result
    describe: Callable[[dict], str]  # one line saying what the result was
    outputs: tuple[str, ...] = ()  # keys naming what the step writes (must stay inside the workdir)
    creates: tuple[str, ...] = ()  # outputs that must not exist yet (unless --force)
    extra_paths: tuple[str, ...] = ()  # path-valued keys their declaration does not mark as paths
    required: tuple[str, ...] = ()  # keys a recipe must give beyond what the command requires
    selector: str | None = None  # a key choosing a subcommand (inject's method)

    def command(self, body: dict) -> tuple[Command, list[str]]:
        """The parameters for a step body, and the words that invoke its command."""
        if self.selector is None:
            return Command(self.params(None)), ["peftcli", self.name]
        choice = body.get(self.selector)
        choices = sorted(METHODS)
        if choice is None:
            raise UsageError(f"needs {self.selector}: one of {', '.join(choices)}", f"add e.g. {self.selector}: {choices[0]} to the step")
        if choice not in METHODS:
            raise UsageError(f"unknown {self.selector} {choice!r}{suggest(str(choice), choices)}", "choose one of: " + ", ".join(choices))
        return Command(self.params(choice)), ["peftcli", self.name, choice]

    def keys(self, cmd: Command) -> tuple[dict[str, Key], dict[str, str]]:
        """Recipe keys of ``cmd`` and the aliases (other spellings) that name them."""
        keys: dict[str, Key] = {}
        aliases: dict[str, str] = {}
        for p in cmd.params:
            if p.opts:
                flag = min([o for o in p.opts if o.startswith("--")], key=len)
                name = flag[2:].replace("-", "_")
            else:
                name, flag = p.name, None
            keys[name] = Key(name, p, flag, p.path or name in self.extra_paths)
            spellings = {name, p.name} | {o[2:].replace("-", "_") for o in p.opts if o.startswith("--")}
            for s in spellings:
                aliases[s] = name
        if self.selector is not None:
            aliases[self.selector] = self.selector
        return keys, aliases


@dataclass(frozen=True)
class Key:
    name: str  # the recipe key
    param: Param
    flag: str | None  # the option spelling printed; None for a positional argument
    path: bool  # a filesystem path (resolved against the workdir)


def _fixed(*params: Param | tuple[Param, ...]) -> Callable[[str | None], tuple[Param, ...]]:
    flat = tuple(p for group in params for p in (group if isinstance(group, tuple) else (group,)))
    return lambda selected: flat


def _inject_params(method: str | None) -> tuple[Param, ...]:
    cls = METHODS[method].config_cls
    return (arg("model"), *option_params(_Output, _Seed, _Force, _Pickle, bounded=True), *option_params(cls))


def _inject_options(p: dict) -> Any:
    return from_options(METHODS[p["method"]].config_cls, p)


def _inject(api, p: dict, cfg, ctx) -> dict:
    budget = api(p["model"], p["method"], cfg, p["out"], seed=p["seed"], force=p["force"], allow_pickle=p["allow_pickle"])
    return {"schema": "peftcli.inject/1", "output": p["out"], "budget": budget.to_json()}


def _train(api, p: dict, cfg, ctx) -> dict:
    progress = ctx.progress(cfg.log_every) if ctx.progress else None
    return {"schema": "peftcli.train/1", **api(p["run"], cfg, force=p["force"], log=ctx.log, progress=progress)}


def _combine_options(p: dict) -> CombineOptions:
    opts = from_options(CombineOptions, p)
    coefficients(opts.op, len(p["inputs"]), opts.by, opts.weights)  # as combine checks them, before anything runs
    return opts


def _check(api, p: dict, opts, ctx):
    report = api(p["base"], list(p["artifacts"]), opts)
    if not report.ok:
        raise BadInputError(report.failure(), "`peftcli check --json` lists every problem")
    return report


def _options(cls: type) -> Callable[[dict], Any]:
    return lambda p: from_options(cls, p)


def _run_merge(api, p: dict, o, ctx) -> Any:
    """A merge step, as ``peftcli merge`` runs it: into a GGUF with ``outtype``, else the engine."""
    from peftcli.merging import quantized

    if quantized.check_request(p["base"], p["out"], p.get("outtype"), p.get("probe"), o):
        return quantized.merge_to_gguf(p["base"], list(p["inputs"]), p["out"], o, p["outtype"], p.get("probe"))[0]
    return api(p["base"], list(p["inputs"]), p["out"], o)


def _merge_options(p: dict) -> Any:
    """A merge step's options, as ``peftcli merge`` reads them: from its keys, or from the
    mergekit configuration ``config`` (which then also gives ``base`` and ``inputs``)."""
    if p.get("config") is None:
        missing = next((k for k in ("base", "inputs") if not p.get(k)), None)
        if missing is not None:
            raise UsageError(f"missing key {missing!r}", "merge needs base and inputs, or config (a mergekit YAML)")
        return merge_options(p)
    from peftcli.merging import mergekit_config

    declared = {f.name: f.default for cls in (MergeOptions, *merge_method_classes()) for f in option_fields(cls)}
    given = [k for k, default in declared.items() if p.get(k) is not None and p.get(k) != default]
    p["base"], p["inputs"], values = mergekit_config.with_config(p["config"], p.get("base"), p.get("inputs"), p, given)
    return merge_options(values)


def _describe_inspect(doc: dict) -> str:
    text = f"{doc['format']}: {doc['num_params']:,} params in {doc['num_tensors']} tensors"
    if doc.get("budget"):
        b = doc["budget"]
        text += f"; {b['method']} adds {b['trainable_params']:,} ({b['pct_of_base']:.3f}% of the base)"
    return text


def _describe_inject(doc: dict) -> str:
    b = doc["budget"]
    return f"wrote {doc['output']}: {b['method']}, {b['trainable_params']:,} trainable params ({b['pct_of_base']:.3f}% of the base)"


def _describe_train(doc: dict) -> str:
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


def _describe_diff(doc: dict) -> str:
    return f"wrote {doc['output']}: {doc['k']:,} of {doc['n']:,} entries (density {doc['density']:.4g})"


def _describe_convert(doc: dict) -> str:
    if doc.get("to") != "lora":
        return _describe_diff(doc)
    return f"wrote {doc['output']}: rank {doc['rank']} LoRA keeping {100 * doc['kept_energy']:.2f}% of ‖φ‖²"


def _describe_merge(doc: dict) -> str:
    return f"wrote {doc['output']}: {doc['changed_tensors']} of {doc['tensors']} tensors changed ({doc['method']})"


def _describe_check(doc: dict) -> str:
    n = len(doc.get("artifacts", []))
    return f"ok: {n} artifact{'s fit' if n != 1 else ' fits'} the base" if n else "ok: the base passes its checks"


def _describe_evaluate(doc: dict) -> str:
    from peftcli.evaluation import describe

    return describe(doc)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "inspect", "summarise a checkpoint, adapter or diff (and a method's budget)",
            _fixed(arg("path"), option_params(InspectOptions, *budget_option_classes())),
            "peftcli.summary:inspect", inspect_options, lambda api, p, o, ctx: api(p["path"], o), _describe_inspect,
        ),
        Kind(
            "inject", "write an adapter directory with fresh φ", _inject_params, "peftcli.injection:inject", _inject_options, _inject,
            _describe_inject, outputs=("output",), creates=("output",), selector="method",
        ),
        Kind(
            "train", "train an adapter run (or `full`)", _fixed(arg("run"), option_params(_Force, TrainConfig)),
            "peftcli.training.loop:train", _options(TrainConfig), _train, _describe_train,
            outputs=("run",), extra_paths=("model", "data", "eval"), required=("data",),
        ),
        Kind(
            "diff", "φ = finetuned − base as a sparse .diff",
            _fixed(arg("base"), arg("finetuned"), option_params(_RequiredOutput, DiffOptions, _Force, _Pickle)),
            "peftcli.diffing:diff", _options(DiffOptions),
            lambda api, p, o, ctx: api(p["base"], p["finetuned"], p["out"], o, force=p["force"], allow_pickle=p["allow_pickle"]),
            _describe_diff, outputs=("output",), creates=("output",),
        ),
        Kind(
            "convert", "an adapter as a .diff, or a .diff as LoRA",
            _fixed(arg("source"), option_params(ConvertOptions, _RequiredOutput, DiffOptions)),
            "peftcli.conversion:convert", convert_options, lambda api, p, o, ctx: api(p["source"], p["out"], o), _describe_convert,
            outputs=("output",), creates=("output",),
        ),
        Kind(
            "merge", "fold adapters, diffs or fine-tunes into a checkpoint",
            _fixed(arg("base", required=False), arg("inputs", -1, required=False),
                   option_params(_Output, _MergeConfig, MergeOptions, *merge_method_classes(), GgufOutputOptions)),
            "peftcli.merging.engine:merge", _merge_options, _run_merge,
            _describe_merge, outputs=("output",), creates=("output",), required=("output",),
        ),
        Kind(
            "combine", "arithmetic on .diff files", _fixed(arg("inputs", -1), option_params(CombineOptions, _RequiredOutput)),
            "peftcli.combining:combine", _combine_options, lambda api, p, o, ctx: api(list(p["inputs"]), o, p["out"]),
            _describe_diff, outputs=("output",), creates=("output",),
        ),
        Kind(
            "check", "pre-flight of adapters and diffs against a base",
            _fixed(arg("base"), arg("artifacts", -1, required=False), option_params(CheckOptions)),
            "peftcli.preflight:check", _options(CheckOptions), _check, _describe_check,
        ),
        Kind(
            "evaluate", "validation loss / accuracy of a model, run or checkpoint", _fixed(arg("model"), option_params(EvalOptions)),
            "peftcli.evaluation:evaluate", _options(EvalOptions), lambda api, p, o, ctx: api(p["model"], o), _describe_evaluate,
            extra_paths=("data", "base", "head", "compare"), outputs=("predictions",), creates=("predictions",),
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


# -- a step as a command line, and back ------------------------------------------------------------


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


# One string, so that the command to copy is one span (an f-string would split it around the command).
_KEYS_HINT = "the step's keys are the options of peftcli {command}: see `peftcli {command} --help`"


def parse(cmd: Command, words: list[str], argv: list[str], where: str) -> dict:
    """Read ``argv`` back as the command line is read: the declared types, choices and required values."""
    try:
        return _read(cmd, argv)
    except _BadArgs as exc:
        raise UsageError(f"{where}: {exc}", _KEYS_HINT.format(command=" ".join(words[1:]))) from None


class _BadArgs(Exception):
    """What the command line would refuse (in the words the command's own error uses)."""


def _read(cmd: Command, argv: list[str]) -> dict:
    by_flag = {o: p for p in cmd.params for o in p.opts}
    values: dict[str, Any] = {p.name: () if p.nargs == -1 else p.default for p in cmd.params}  # None: not given
    positional: list[str] = []
    words = iter(argv)
    for word in words:
        p = by_flag.get(word)
        if p is None:
            positional.append(word)  # to_argv writes no unknown flag: keys were checked against the same params
        elif p.is_flag:
            values[p.name] = True
        else:
            values[p.name] = _convert(p, word, next(words))
    args = [p for p in cmd.params if not p.opts]
    for i, p in enumerate(args):
        if p.nargs == -1:  # the list takes what the arguments after it leave
            taken = len(positional) - (len(args) - i - 1)
            values[p.name], positional = tuple(positional[:taken]), positional[taken:]
        elif positional:
            values[p.name] = positional.pop(0)
    for p in cmd.params:
        if p.required and values[p.name] in (None, ()):
            what = f"option {_names(p)}" if p.opts else f"argument {p.name.upper()!r}"
            raise _BadArgs(f"Missing {what}.")
    return values


def _convert(p: Param, flag: str, text: str) -> Any:
    """``text`` as the declared type of ``p``, as the command line reads it (ASCII digits; nan read here,
    refused by the declaration's own check, which says more)."""
    choices = p.field.metadata.get("choices") if p.field is not None else None
    if choices:
        if text not in choices:
            raise _BadArgs(f"Invalid value for {_names(p)}: {text!r} is not one of {', '.join(map(repr, choices))}.")
        return text
    base = _base(p.hint)
    if base is int:
        number = ascii_int(text)
        if number is None:
            raise _BadArgs(f"Invalid value for {_names(p)}: {text!r} is not a valid integer (digits 0-9 only)")
        lo, hi = p.field.metadata.get("min"), p.field.metadata.get("max")
        if p.bounded and (lo is not None and number < lo or hi is not None and number > hi):
            raise _BadArgs(f"Invalid value for {_names(p)}: {number} is not in the range {lo}<=x<={hi}")
        return number
    if base is float:
        number = ascii_float(text)
        if number is None:
            raise _BadArgs(f"Invalid value for {_names(p)}: {text!r} is not a valid float (digits 0-9 only)")
        return number
    return text


def _names(p: Param) -> str:
    return " / ".join(repr(o) for o in p.opts)  # in the order the command declares them, as its errors name them


# -- running ------------------------------------------------------------------------------------

Runner = Callable[["Context"], dict]


@dataclass
class Context:
    """What a running step may use: where to say things, and progress for training."""

    log: Callable[[str], None] = lambda line: None
    progress: Callable[[int], Any] | None = None  # log_every -> a progress object (train_cmd.Progress); None: quiet


def build(kind: str, cmd: Command, p: dict) -> Runner:
    """The step's options, built and checked by the library before anything runs; returns the call."""
    row = KINDS[kind]
    opts = row.options(p)

    def run(ctx: Context) -> dict:
        import importlib

        module, name = row.api.split(":")
        result = row.call(getattr(importlib.import_module(module), name), p, opts, ctx)
        return result.to_json() if hasattr(result, "to_json") else result

    return run


def describe(kind: str, doc: dict) -> str:
    """One line saying what a step's result was, for the summary table."""
    row = KINDS.get(kind)
    return row.describe(doc) if row is not None else ""
