"""What ``peftcli inspect`` reports: a checkpoint's format, config, sizes and module tree.

``InspectOptions`` are the command's options (the budget method's own among them), checked
when built; ``inspect`` is the command: the report of a path, with a method's budget.

Everything is computed from headers (and ``config.json``), never from tensor values, so
summarising a checkpoint of any size reads kilobytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from peftcli.checkpoint.reader import Checkpoint, open_checkpoint
from peftcli.checkpoint.safetensors_format import gc_paused
from peftcli.errors import UsageError
from peftcli.methods import METHODS, get_method
from peftcli.options import check_declared, from_options, option, option_fields
from peftcli.patterns import FILTER_HINT, compile_pattern
from peftcli.targets import is_index

# config.json spells the same quantity differently per family; the first key present wins.
_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "n_head_kv", "num_kv_heads"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "dtype": ("dtype", "torch_dtype"),
}


def detect_format(ckpt: Checkpoint) -> str:
    """checkpoint, adapter (a PEFT-style adapter directory) or sparse-diff.

    A file that claims to be a diff (named ``.diff``, or carrying a diff's metadata keys) but
    whose ``format`` says otherwise is refused: described as a checkpoint, its idx/val pairs
    would read as model weights."""
    fmt = ckpt.metadata.get("format")
    if fmt == "peftcli.sparse-diff":
        return "sparse-diff"
    claims = ckpt.path.endswith(".diff") or any(k in ckpt.metadata for k in ("base_fingerprint", "dense_tensors"))
    if claims and ckpt.directory is None:
        from peftcli.errors import BadInputError

        raise BadInputError(
            f"{ckpt.path}: looks like a sparse diff, but its metadata format is {fmt!r}, not 'peftcli.sparse-diff'",
            "the file is corrupt or was edited; remake it with peftcli diff, or rename a real checkpoint to .safetensors",
        )
    if ckpt.directory and os.path.isfile(os.path.join(ckpt.directory, "adapter_config.json")):
        return "adapter"
    return "checkpoint"


def config_summary(config: dict | None) -> dict | None:
    if config is None:
        return None
    from peftcli.targets import model_type_of

    archs = config.get("architectures")
    out: dict[str, object] = {
        "model_type": model_type_of(config),
        "architectures": [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else None,
    }
    for key, spellings in _CONFIG_KEYS.items():
        out[key] = next((config[s] for s in spellings if config.get(s) is not None), None)
    if out["intermediate_size"] is None and out["model_type"] == "gpt2" and isinstance(out["hidden_size"], int):
        out["intermediate_size"] = 4 * out["hidden_size"]  # GPT-2's n_inner=null means 4×n_embd
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]  # no GQA: one KV head per query head
    # transformers' own default is True when a config leaves this out.
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
    return out


def dtype_breakdown(ckpt: Checkpoint) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in ckpt.tensors.values():
        d = out.setdefault(t.dtype, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += t.numel
        d["bytes"] += t.nbytes
    return dict(sorted(out.items()))


# -- the module tree ------------------------------------------------------------------------


class _Node:
    """One module of the tree; a plain class with slots, since there is one per layer and module."""

    __slots__ = ("children", "params", "_total", "_sig")

    def __init__(self, params: dict[str, tuple[tuple[int, ...], str]] | None = None):
        self.children: dict[str, _Node] = {}
        self.params = params if params is not None else {}  # leaf name -> (shape, dtype)
        self._total: int | None = None
        self._sig: tuple | None = None

    def total(self) -> int:
        if self._total is None:
            own = 0
            for shape, _ in self.params.values():
                n = 1
                for d in shape:
                    n *= d
                own += n
            self._total = own + sum(c.total() for c in self.children.values())
        return self._total

    def signature(self) -> tuple:
        """Structure and shapes below this node: equal signatures mean interchangeable layers."""
        if self._sig is None:
            self._sig = (
                tuple(sorted(self.params.items())),
                tuple((k, c.signature()) for k, c in self.children.items()),
            )
        return self._sig


@dataclass(frozen=True)
class ModuleRow:
    name: str  # full dotted path with repeated layers collapsed, e.g. "model.layers.{0..29}.mlp"
    label: str  # the part below its parent row, e.g. "layers.{0..29}"
    depth: int
    count: int  # how many identical modules this row stands for
    params: int  # total over all of them

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label, "depth": self.depth, "count": self.count, "params": self.params}


def _build_tree(names_shapes: list[tuple[str, tuple[int, ...], str]]) -> _Node:
    root = _Node()
    for name, shape, dtype in names_shapes:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            child = node.children.get(part)
            if child is None:  # not setdefault(part, _Node()): that builds a node per tensor per level
                child = node.children[part] = _Node()
            node = child
        node.params[leaf] = (shape, dtype)
    return root


def _groups(node: _Node) -> list[tuple[str, list[_Node]]]:
    """Children in order, runs of consecutive numbered children with equal structure merged."""
    out: list[tuple[str, list[_Node]]] = []
    numeric = sorted((k for k in node.children if is_index(k)), key=int)
    runs: list[list[str]] = []
    for k in numeric:
        if runs and int(k) == int(runs[-1][-1]) + 1 and node.children[k].signature() == node.children[runs[-1][-1]].signature():
            runs[-1].append(k)
        else:
            runs.append([k])
    emitted_numeric = False
    for k in node.children:
        if not is_index(k):
            out.append((k, [node.children[k]]))
        elif not emitted_numeric:
            emitted_numeric = True
            for run in runs:
                label = run[0] if len(run) == 1 else f"{{{run[0]}..{run[-1]}}}"
                out.append((label, [node.children[i] for i in run]))
    return out


def module_tree(ckpt: Checkpoint, max_depth: int = 4) -> list[ModuleRow]:
    """Modules down to ``max_depth`` levels, repeated layers shown once with a count."""
    root = _build_tree([(t.name, t.shape, t.dtype) for t in ckpt.tensors.values()])
    rows: list[ModuleRow] = []

    def walk(node: _Node, prefix: str, depth: int, mult: int) -> None:
        for label, members in _groups(node):
            n, first = len(members), members[0]
            # A container holding nothing but one run of numbered layers ("layers") is shown
            # merged with it: "layers.{0..29}".
            while not first.params and first.children and all(is_index(k) for k in first.children):
                sub = _groups(first)
                if len(sub) != 1:
                    break
                label, n, first = f"{label}.{sub[0][0]}", n * len(sub[0][1]), sub[0][1][0]
            name = f"{prefix}.{label}" if prefix else label
            count = mult * n
            rows.append(ModuleRow(name, label, depth, count, first.total() * count))
            if depth + 1 < max_depth and first.children:
                walk(first, name, depth + 1, count)

    if root.params:  # tensors whose names have no dot
        rows.append(ModuleRow("(top level)", "(top level)", 0, 1, _Node(params=root.params).total()))
    walk(root, "", 0, 1)
    return rows


# -- the report -----------------------------------------------------------------------------


def filter_names(names: list[str], pattern: str | None, source: str = "`name_filter`") -> list[str]:
    """The names ``pattern`` finds (re.search), matched in bounded time (peftcli.patterns)."""
    if not pattern:
        return names
    regex = compile_pattern(pattern, source, FILTER_HINT)
    return [n for n in names if regex.search(n)]


def summarize(
    ckpt: Checkpoint, *, with_tensors: bool = False, name_filter: str | None = None, max_depth: int = 4
) -> dict:
    """The whole ``inspect`` report as plain data (the ``--json`` document)."""
    with gc_paused():  # a node and a few tuples per tensor, none of them in a cycle
        return _summarize(ckpt, with_tensors, name_filter, max_depth)


def _summarize(ckpt: Checkpoint, with_tensors: bool, name_filter: str | None, max_depth: int) -> dict:
    names = filter_names(list(ckpt.tensors), name_filter)
    shown = [ckpt.tensors[n] for n in names]
    report: dict = {
        "schema": "peftcli.inspect/1",
        "path": ckpt.path,
        "format": detect_format(ckpt),
        "storage": ckpt.storage,
        "files": [{"path": f, "bytes": os.path.getsize(f)} for f in ckpt.files],
        "num_tensors": len(ckpt.tensors),
        "num_params": ckpt.num_params,
        "bytes": ckpt.bytes_on_disk,
        "dtypes": dtype_breakdown(ckpt),
        "config": config_summary(ckpt.config),
        "metadata": dict(ckpt.metadata),
        "modules": [r.to_json() for r in module_tree(_restricted(ckpt, names) if name_filter else ckpt, max_depth)],
    }
    if name_filter:
        report["filter"] = {"pattern": name_filter, "num_tensors": len(shown), "num_params": sum(t.numel for t in shown)}
    if report["format"] == "sparse-diff":
        from peftcli.artifacts.sparse_diff import describe

        report["diff"] = describe(ckpt)  # reads the (small) diff's values for norms and densities
        # A diff's parameters are its stored values: an index beside each value is no parameter.
        report["diff"]["entries"] = ckpt.num_params - sum(t.numel for n, t in ckpt.tensors.items() if n.endswith(".idx"))
    if report["format"] == "adapter":
        from peftcli.artifacts.adapter_dir import read_adapter_config

        report["adapter_config"] = read_adapter_config(ckpt.directory)
    if with_tensors:
        report["tensors"] = [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "params": t.numel,
                "shard": os.path.basename(t.file),
            }
            for t in shown
        ]
    return report


def _restricted(ckpt: Checkpoint, names: list[str]) -> Checkpoint:
    return Checkpoint(ckpt.path, ckpt.storage, ckpt.files, {n: ckpt.tensors[n] for n in names}, ckpt.metadata, ckpt.directory)


# One string, so that the command to copy is one span (an f-string would split it around METHOD).
_INJECT_HELP = "drop it; see `peftcli inject {method} --help` for {method}'s options"


@dataclass
class InspectOptions:
    """The options of ``peftcli inspect`` (and of a recipe's inspect step).

    ``method_options``: the budget method's options by name (None where not given), checked
    against ``budget``'s config class; with no ``budget`` none may be given."""

    with_tensors: bool = option(False, flag="--tensors", help="List every tensor: name, shape, dtype, shard.")
    name_filter: str | None = option(None, flag="--filter", metavar="REGEX", help="Only tensors whose name matches REGEX (re.search).")
    depth: int = option(4, min=1, max=64, show_default=True, help="Levels of the module tree to show.")
    allow_pickle: bool = option(False, help="Allow PyTorch .bin/.pt files (loaded with torch.load(weights_only=True)).")
    budget: str | None = option(
        None, metavar="METHOD", choices=tuple(sorted(METHODS)),
        help="Show the trainable parameters METHOD would add, per target and in total.",
    )
    method_options: dict[str, Any] = field(default_factory=dict)
    config: Any = field(default=None, init=False, repr=False)  # the budget method's config, once checked

    def __post_init__(self) -> None:
        given = sorted(k for k, v in self.method_options.items() if v is not None)
        if given and not self.budget:
            raise UsageError(f"`{given[0]}` only applies with `budget`", "add e.g. `budget` lora")
        if self.name_filter:
            compile_pattern(self.name_filter, "`name_filter`", FILTER_HINT)  # refused before any reading
        check_declared(self)
        if self.budget is None:
            return
        method = get_method(self.budget)
        self.config = from_options(method.config_cls, self.method_options)
        unused = [k for k in given if k not in {f.name for f in option_fields(method.config_cls)}]
        if unused:
            raise UsageError(
                f"`{unused[0]}` is not an option of {method.name}",
                _INJECT_HELP.format(method=method.name),
            )


def budget_option_classes() -> list[type]:
    """Every method's config class, in registry order: the budget options ``inspect`` takes."""
    return [m.config_cls for m in METHODS.values()]


def inspect_options(values: dict[str, Any]) -> InspectOptions:
    """``InspectOptions`` from the command line's values or a recipe step's keys."""
    names = {f.name for cls in budget_option_classes() for f in option_fields(cls)}
    return from_options(InspectOptions, values, method_options={k: values.get(k) for k in sorted(names)})


def inspect(path: str, opts: InspectOptions | None = None) -> dict:
    """The ``peftcli inspect`` report of the checkpoint, adapter directory or diff at ``path``;
    with ``opts.budget``, what that method would add to it (a base checkpoint)."""
    opts = opts if opts is not None else InspectOptions()
    with open_checkpoint(path, allow_pickle=opts.allow_pickle) as ckpt:
        report = summarize(ckpt, with_tensors=opts.with_tensors, name_filter=opts.name_filter, max_depth=opts.depth)
        if opts.budget is None:
            return report
        if report["format"] != "checkpoint":
            article = "an" if report["format"][0] in "aeiou" else "a"
            raise UsageError(f"`budget` needs a base checkpoint, and {path} is {article} {report['format']}", "pass the base model instead")
        from peftcli.methods.base import Budget

        report["budget"] = Budget.of(get_method(opts.budget), ckpt, opts.config).to_json()
    if opts.name_filter:
        _filter_budget(report["budget"], opts.name_filter)
    return report


def _filter_budget(budget: dict, name_filter: str) -> None:
    """The budget's listing narrowed by ``--filter`` (which names tensors: a module row stands for
    its weight); the totals stay whole, as for the summary."""
    pattern = compile_pattern(name_filter, "`name_filter`", FILTER_HINT)
    named = [t for t in budget["targets"] if " " not in t["module"]]
    if named:
        budget["targets"] = [t for t in named if pattern.search(t["module"]) or pattern.search(t["module"] + ".weight")]
    # else: rows that describe a global selection (lt-sft's top-K) name no tensor
    budget["filter"] = {
        "pattern": name_filter,
        "applies": bool(named),
        "num_targets": len(budget["targets"]),
        "trainable_params": sum(t["params"] for t in budget["targets"]),
    }
