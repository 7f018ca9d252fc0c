"""Reading a recipe: YAML, overrides, variables, the workdir, and the resolved plan.

A recipe is a YAML mapping::

    name: lora                      # optional: the file name without .yaml
    description: one line           # optional
    workdir: runs/lora              # optional: default runs/<name>; -o/--workdir DIR wins
    vars: {train_steps: 100}        # ${train_steps} anywhere below
    model: {builtin: quickstart}    # a path, or a built-in (peftcli.recipes.prepare)
    data:                           # named input files: paths or built-ins
      train: {builtin: sentiment, examples: 800, seed: 1}
    steps:                          # in order; the key names the step and, unless do: says, its kind
      inject: {method: lora, model: "${model}", output: lora, rank: 8}
      train: {run: lora, data: "${data.train}", steps: "${train_steps}"}

Paths: ``model`` and ``data`` are your inputs and are relative to the current directory;
every path in a step is relative to the workdir, so ``train: {run: lora}`` is what the
``inject`` step wrote. Whatever a step writes must resolve (symlinks included) strictly
inside the workdir, and a recipe's own ``workdir`` must be a relative path below the
current directory: only ``-o/--workdir`` on the command line puts the outputs elsewhere.

``${name}`` takes a variable (``vars``), ``${model}``, ``${data.NAME}``, ``${workdir}`` or
``${name}``; a value that is exactly ``${x}`` keeps x's type (a number, a list), and ``$${``
is a literal ``${``. Overrides ``key.sub=value`` (split on the first ``=``, the value read
as YAML) address top-level keys, steps by name (``train.lr=1e-4``) and variables by name
(``train_steps=2``), before anything is resolved.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from peftcli.errors import BadInputError, PeftcliError, UsageError
from peftcli.recipes.prepare import Builtin, data_builtin, model_builtin
from peftcli.recipes.steps import KINDS, Context, Runner, build, display, parse, suggest, to_argv

TOP_KEYS = ("name", "description", "workdir", "vars", "model", "data", "steps")
RESERVED_VARS = {"workdir", "name", "model", "data"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
DEFAULT_ROOT = "runs"


# -- YAML ---------------------------------------------------------------------------------------


# A recipe is a page of settings: these bounds are far above any real one and stop a hostile
# file before it costs time or memory (a "billion laughs" alias bomb is a few hundred bytes
# whose expansion, once substituted, would never finish).
MAX_RECIPE_BYTES = 4 * 2**20
MAX_DEPTH = 64  # nesting of mappings and lists (the YAML composer recurses per level)
MAX_NODES = 100_000  # values once every alias is expanded


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe YAML that refuses duplicate keys (PyYAML keeps the last one silently), deep
        nesting, recursive aliases and alias expansion past ``MAX_NODES`` values."""

        _depth = 0

        def compose_node(self, parent, index):
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _expanded_size(node)
            return node

    def mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _expanded_size(root) -> int:
    """How many values the YAML graph at ``root`` has with every alias expanded (bounded).

    Aliases share nodes, so the graph is small while its expansion (what substitution and
    the steps walk) can be exponential; a node that contains itself would be infinite.
    """
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:  # depth is bounded by MAX_DEPTH (compose_node)
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it", node.start_mark)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        if total > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values once its aliases are expanded", node.start_mark)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def read_yaml_file(path: str, what: str = "recipe") -> Any:
    """The YAML document in the file at ``path``, read as recipes are: a regular file of at most
    ``MAX_RECIPE_BYTES``, UTF-8, parsed by the bounded loader; errors call the file a ``what``
    (``"mergekit config"`` for ``peftcli merge --config``)."""
    return _yaml(_read_text(path, what), path, what)


def _yaml(text: str, where: str, what: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise BadInputError(f"{where}: not valid YAML: {problem}{at}", f"fix the {what} file") from None


def load(path: str) -> dict:
    """The recipe file's YAML mapping (one-line errors for unreadable or malformed files)."""
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: a recipe is a YAML mapping with steps:, not a {type(raw).__name__}", "see recipes/README.md")
    return raw


def _read_text(path: str, what: str) -> str:
    """The text of the regular file ``path``; a FIFO, device or directory is refused unread."""
    import stat

    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once (and is then refused),
        # and the fstat checks what was opened, not what was there a moment before.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        hint = "see recipes/ for the shipped recipes" if what == "recipe" else f"give the path of a {what} file"
        raise BadInputError(f"{path}: no such {what} file", hint) from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the {what}: {exc.strerror or exc}", f"check the {what}'s path and permissions") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)  # checked before os.fdopen, which itself refuses a directory with IsADirectoryError
        if stat.S_ISDIR(mode):
            raise BadInputError(f"{path} is a directory, not a {what} file", "pass a .yaml file")
        raise BadInputError(f"{path} is not a regular file (a pipe or a device)", f"pass a .yaml {what} file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read the {what}: {exc.strerror or exc}", f"check the {what}'s path and permissions") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise BadInputError(f"{path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB, not a {what}", f"pass a YAML {what} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not a text (UTF-8) file", f"pass a YAML {what}") from None


# -- overrides ----------------------------------------------------------------------------------


def override_value(text: str) -> Any:
    """A command-line value read as YAML (``2`` is a number, ``[a, b]`` a list), else the text."""
    import yaml

    try:
        value = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text  # "a: b" is a string on a command line
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with each ``key.sub=value`` set (a new, independent mapping)."""
    import copy

    raw = copy.deepcopy(raw)
    for text in overrides:
        if "=" not in text:
            raise UsageError(f"override {text!r} is not key=value", "e.g. train.lr=1e-4 or model=path/to/model")
        key, value_text = text.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"override {text!r}: {key!r} is not a key path", "e.g. train.lr=1e-4")
        steps = raw.get("steps") if isinstance(raw.get("steps"), dict) else {}
        variables = raw.get("vars") if isinstance(raw.get("vars"), dict) else {}
        head = parts[0]
        if head in TOP_KEYS:
            path = parts
        elif head in steps:
            path = ["steps", *parts]
        elif head in variables:
            path = ["vars", *parts]
        else:
            known = [*TOP_KEYS, *steps, *variables]
            raise UsageError(
                f"override {key}: no key, step or variable {head!r}{suggest(head, known)}",
                "top-level keys: " + ", ".join(TOP_KEYS) + (("; steps: " + ", ".join(steps)) if steps else "")
                + (("; vars: " + ", ".join(variables)) if variables else ""),
            )
        node = raw
        for i, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UsageError(f"override {key}: {'.'.join(path[: i + 1])} is not a mapping", f"set it whole: {'.'.join(path[: i + 1])}=...")
        node[path[-1]] = override_value(value_text)
    return raw


# -- substitution -------------------------------------------------------------------------------


def substitute(value: Any, names: dict[str, Any], where: str) -> Any:
    """``value`` with every ``${name}`` replaced (recursively through lists and mappings)."""
    if isinstance(value, list):
        return [substitute(v, names, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, names, where) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def lookup(name: str) -> Any:
        name = name.strip()
        if name not in names:
            raise UsageError(f"{where}: unknown variable ${{{name}}}{suggest(name, names)}", "known: " + ", ".join(sorted(names)))
        if names[name] is None:
            raise UsageError(f"{where}: ${{{name}}} is not set", f"give it, e.g. {name}=...")
        return names[name]

    whole = _REF.fullmatch(value)
    if whole and whole.group(1) is not None:
        return lookup(whole.group(1))  # keeps the type: steps: ${n} is a number
    return _REF.sub(lambda m: "${" if m.group(1) is None else _text(lookup(m.group(1))), value)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# -- paths --------------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path.startswith(root.rstrip(os.sep) + os.sep)


def confine(path: str, wd: str, where: str) -> None:
    """Refuse ``path`` unless it resolves (symlinks included) strictly inside the workdir.

    Checked when the recipe is planned and again just before each write: a directory of the
    workdir (``data/``, a step's output) replaced by a link to elsewhere in between is not
    written through.
    """
    if not _inside(path, wd):
        raise UsageError(
            f"{where}: {display(path)} is outside the workdir {display(wd)} (resolving its symlinks: {os.path.realpath(path)})",
            "a recipe writes only inside its workdir: remove the link or give a path relative to the workdir",
        )


def _workdir(raw: dict, name: str, given: str | None, where: str) -> str:
    if given is not None:
        return os.path.abspath(given)
    wd = raw.get("workdir")
    if wd is None:
        return os.path.abspath(os.path.join(DEFAULT_ROOT, name))
    if not isinstance(wd, str) or not wd.strip():
        raise UsageError(f"{where}: workdir must be a path", f"write workdir: DIR, or leave it out for {DEFAULT_ROOT}/NAME")
    parts = wd.replace("\\", "/").split("/")
    if os.path.isabs(wd) or ".." in parts or wd.startswith("~"):
        raise UsageError(
            f"{where}: workdir {wd!r} is outside the current directory",
            "a recipe's workdir must be a relative path below it; pass -o DIR to write elsewhere",
        )
    path = os.path.abspath(wd)
    if not _inside(path, os.getcwd()):
        raise UsageError(f"{where}: workdir {wd!r} resolves outside the current directory", "pass -o DIR to write elsewhere")
    return path


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class PlannedStep:
    id: str
    kind: str
    words: list[str]  # the command: ["peftcli", "train"]
    argv: list[str]  # its arguments, exactly as parsed
    params: dict
    runner: Runner
    creates: list[str] = field(default_factory=list)  # absolute paths the step makes anew
    outputs: list[str] = field(default_factory=list)  # absolute paths the step writes (inside the workdir)

    @property
    def command(self) -> str:
        return shlex.join(self.words + self.argv)


@dataclass
class Plan:
    recipe: str
    name: str
    description: str | None
    workdir: str  # absolute
    model: str | None
    data: dict[str, str]
    builtins: list[Builtin]
    steps: list[PlannedStep]

    def lines(self) -> list[str]:
        """The shell lines equal to this recipe: built-in inputs first, then one per step."""
        return [shlex.join(b.argv) for b in self.builtins if b.argv] + [s.command for s in self.steps]

    def to_json(self) -> dict:
        return {
            "schema": "peftcli.run/1",
            "recipe": self.recipe,
            "name": self.name,
            "description": self.description,
            "workdir": display(self.workdir),
            "model": display(self.model) if self.model else None,
            "data": {k: display(v) for k, v in self.data.items()},
            "prepared": [{"what": b.what, "path": display(b.path), "command": shlex.join(b.argv) if b.argv else None} for b in self.builtins],
            "steps": [{"id": s.id, "kind": s.kind, "command": s.command, "argv": s.words + s.argv} for s in self.steps],
        }


def plan(path: str, overrides: list[str] = (), workdir: str | None = None, force: bool = False) -> Plan:
    """Read, override, validate and resolve the recipe at ``path``; nothing is written."""
    raw = apply_overrides(load(path), list(overrides))
    for key in raw:
        if key not in TOP_KEYS:
            raise UsageError(f"{path}: unknown top-level key {key!r}{suggest(str(key), TOP_KEYS)}", "allowed: " + ", ".join(TOP_KEYS))
    stem = os.path.splitext(os.path.basename(path))[0]
    name = raw.get("name") or stem
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-'", "set a top-level name: made of those characters only")
    description = raw.get("description")
    wd = _workdir(raw, name, workdir, path)

    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise UsageError(f"{path}: vars must be a mapping of names to values", "write one NAME: VALUE per line under vars:")
    for k, v in variables.items():
        if not isinstance(k, str) or not _IDENT.match(k) or k in RESERVED_VARS:
            raise UsageError(f"{path}: {k!r} cannot be a variable name", "use letters, digits and _, not " + ", ".join(sorted(RESERVED_VARS)))
        if isinstance(v, dict):
            raise UsageError(f"{path}: vars.{k} must be a value or a list, not a mapping", f"give {k} a single value or a [list] of values")
    names: dict[str, Any] = {**variables, "workdir": wd, "name": name}

    builtins: list[Builtin] = []
    model = None
    spec = substitute(raw.get("model"), names, f"{path}: model")
    if isinstance(spec, dict):
        b = model_builtin(spec, wd, f"{path}: model")
        if b.argv:  # made in the workdir (an installed model is only read)
            confine(b.path, wd, f"{path}: model")
        builtins.append(b)
        model = b.path
    elif isinstance(spec, str) and spec:
        model = os.path.abspath(spec)
    elif spec is not None:
        raise UsageError(f"{path}: model must be a path or a mapping with builtin: NAME", "e.g. model: path/to/model, or model: {builtin: tiny}")
    names["model"] = model

    data: dict[str, str] = {}
    entries = raw.get("data") or {}
    if not isinstance(entries, dict):
        raise UsageError(f"{path}: data must be a mapping of names to files", "write one NAME: FILE per line under data:")
    for k, v in entries.items():
        if not isinstance(k, str) or not _IDENT.match(k):
            raise UsageError(f"{path}: data name {k!r} must be letters, digits and _", "rename it, e.g. train or dev_set")
        v = substitute(v, names, f"{path}: data.{k}")
        if isinstance(v, dict):
            b = data_builtin(f"data.{k}", v, os.path.join(wd, "data", f"{k}.jsonl"), f"{path}: data.{k}")
            confine(b.path, wd, f"{path}: data.{k}")
            builtins.append(b)
            data[k] = b.path
        elif isinstance(v, str) and v:
            data[k] = os.path.abspath(v)
        elif v is not None:
            raise UsageError(f"{path}: data.{k} must be a path or a mapping with builtin: NAME", f"e.g. {k}: train.jsonl, or {k}: {{builtin: sentiment}}")
    for k in data:
        names[f"data.{k}"] = data[k]

    steps = raw.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise UsageError(f"{path}: no steps", "add steps: a mapping of step names to their options, in order")
    planned: list[PlannedStep] = []
    written: dict[str, str] = {}
    for step_id, body in steps.items():
        step = _plan_step(path, str(step_id), body, names, wd, force)
        for out in step.creates:
            if out in written:
                raise UsageError(f"{path}: steps {written[out]} and {step.id} both write {display(out)}", "give one of them another output")
            written[out] = step.id
        planned.append(step)
    return Plan(path, name, description, wd, model, data, builtins, planned)


def _plan_step(path: str, step_id: str, body: Any, names: dict, wd: str, force: bool) -> PlannedStep:
    where = f"{path}: step {step_id}"
    if not _IDENT.match(step_id):
        raise UsageError(f"{where}: a step name is letters, digits, '_' and '-'", "rename the step using those characters only")
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise UsageError(f"{where}: a step is a mapping of options, not {type(body).__name__}", "write its options as KEY: VALUE lines under the step")
    kind_name = body.get("do", step_id)
    kind = KINDS.get(kind_name)
    if kind is None:
        if "do" in body:
            raise UsageError(f"{where}: unknown step kind {kind_name!r}{suggest(str(kind_name), KINDS)}", "kinds: " + ", ".join(KINDS))
        raise UsageError(
            f"{where}: {step_id!r} is not a step kind{suggest(step_id, KINDS)}",
            "name the step after its kind or add do: KIND (kinds: " + ", ".join(KINDS) + ")",
        )
    body = substitute({k: v for k, v in body.items() if k != "do"}, names, where)
    try:
        cmd, words = kind.command(body)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}", exc.hint) from None
    keys, aliases = kind.keys(cmd)
    resolved: dict[str, Any] = {}
    for k, v in body.items():
        canonical = aliases.get(k) if isinstance(k, str) else None
        if canonical is None:
            close = _closest_alias(str(k), aliases)
            raise UsageError(
                f"{where}: unknown key {k!r}" + (f" (did you mean {close!r}?)" if close else ""),
                f"{' '.join(words)} takes: " + ", ".join(sorted(keys) + ([kind.selector] if kind.selector else [])),
            )
        if canonical in resolved:
            raise UsageError(f"{where}: {k!r} and another spelling of {canonical!r} are both given", "keep one")
        resolved[canonical] = v
    paths = {k for k, v in resolved.items() if v is not None and keys.get(k) is not None and keys[k].path}
    for k in paths:
        v = resolved[k]
        resolved[k] = [_path(x, wd, where, k) for x in v] if isinstance(v, list) else _path(v, wd, where, k)
    outputs = [o for o in kind.outputs if resolved.get(o) is not None]
    for o in outputs:
        if not _inside(resolved[o], wd):
            raise UsageError(
                f"{where}: {o} {resolved[o]} is outside the workdir {display(wd)}",
                "a recipe writes only inside its workdir: give a path relative to it",
            )
    creates = [resolved[o] for o in kind.creates if resolved.get(o) is not None]
    # Commands name paths as you would type them here: relative to the current directory when inside it.
    shown = {k: ((list(map(display, v)) if isinstance(v, list) else display(v)) if k in paths else v) for k, v in resolved.items()}
    argv = to_argv(kind, keys, shown, where)
    if force and "force" in keys and "--force" not in argv:  # argv
        argv.append("--force")  # argv
    params = parse(cmd, words, argv, where)
    if kind.selector is not None:
        params[kind.selector] = words[-1]  # inject's method: the subcommand the step runs
    try:
        runner = build(kind.name, cmd, params)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}", exc.hint) from None
    return PlannedStep(step_id, kind.name, words, argv, params, runner, creates, [resolved[o] for o in outputs])


def _closest_alias(word: str, aliases: dict[str, str]) -> str | None:
    """The key whose spelling is closest to ``word`` (difflib), if any is close."""
    import difflib

    close = difflib.get_close_matches(word, list(aliases), n=1, cutoff=0.6)
    return aliases[close[0]] if close else None


def _path(value: Any, wd: str, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {key} must be a path, not {value!r}", f"write {key}: PATH, relative to the workdir")
    return os.path.normpath(os.path.join(wd, value))


# -- running ------------------------------------------------------------------------------------


def execute(p: Plan, *, force: bool = False, log=None, progress=None) -> dict:
    """Make the built-in inputs, then run every step in order; returns the ``peftcli.run/1`` document."""
    import time

    log = log or (lambda line: None)
    for step in p.steps:
        for out in step.creates:
            if os.path.lexists(out) and not force:
                raise UsageError(
                    f"step {step.id}: {display(out)} already exists",
                    "rerun with `peftcli run RECIPE --force` to replace this recipe's outputs, or -o a new workdir",
                )
    started = time.perf_counter()
    doc = p.to_json()
    doc["dry_run"] = False
    for b in p.builtins:
        if b.argv:
            confine(b.path, p.workdir, f"prepare {b.what}")
            log(f"prepare {b.what}: {shlex.join(b.argv)}")
        b.make(force)
    ctx = Context(log=lambda line: log("  " + line), progress=progress)
    for i, (step, entry) in enumerate(zip(p.steps, doc["steps"]), 1):
        log(f"[{i}/{len(p.steps)}] {step.id}: {step.command}")
        t0 = time.perf_counter()
        for out in step.outputs:  # what an earlier step or anyone else did to the workdir since the plan
            confine(out, p.workdir, f"step {step.id}")
        try:
            entry["result"] = step.runner(ctx)
        except PeftcliError as exc:  # the same error and exit code, saying which step
            raise type(exc)(f"step {step.id} ({step.kind}): {exc.message}", exc.hint) from None
        entry["seconds"] = time.perf_counter() - t0
    doc["seconds"] = time.perf_counter() - started
    return doc
