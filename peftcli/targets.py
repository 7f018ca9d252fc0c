"""Which modules a method adapts, resolved from tensor names and shapes alone (no model built).

A "linear module" is a 2-D ``<module>.weight`` that is not an embedding. GPT-2 and the other
families built on transformers' ``Conv1D`` store those weights transposed ([in, out]);
``LinearModule.shape`` is always [out, in].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from peftcli.architectures import CONV1D_KINDS, CONV1D_MODEL_TYPES, DEFAULT_QV_TARGETS, FALLBACK_QV
from peftcli.errors import UsageError
from peftcli.patterns import compile_pattern, from_file, fullmatch, shown

MAX_HINT_NAMES = 24  # module names listed in an error's hint
MAX_LAYER_INDEX = 100_000
_EMBEDDING = re.compile(r"(embed|^wte$|^wpe$|^emb)", re.IGNORECASE)
_OUTPUT_HEADS = {"lm_head", "score", "classifier", "qa_outputs", "decoder"}
_REGEX_CHARS = set("*+?[](){}|^$\\")


def is_regex(spec: str) -> bool:
    """Whether a targets spec is a regex (PEFT: re.fullmatch) rather than comma-separated names."""
    return bool(_REGEX_CHARS & set(spec))


def names_module(path: str, name: str) -> bool:
    """PEFT's rule for a listed name: the module path itself, or its last dotted pieces."""
    return path == name or path.endswith("." + name)


@dataclass(frozen=True)
class LinearModule:
    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    shape: tuple[int, int]  # [out_features, in_features]
    transposed: bool  # stored [in, out] (GPT-2 Conv1D)
    layer: int | None  # index of the repeated block it belongs to

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def model_type_of(config: dict | None) -> str | None:
    """config.json's model_type, or None when absent or not a string (a hostile config)."""
    value = (config or {}).get("model_type")
    return value if isinstance(value, str) else None


def is_index(part: str) -> bool:
    """An ASCII decimal such as '12' (str.isdigit also takes '١' and '²', which int() reads or refuses)."""
    return part.isascii() and part.isdigit()


def layer_index(module: str) -> int | None:
    for part in module.split("."):
        if is_index(part):
            return int(part)
    return None


def split_layer(path: str) -> tuple[str, str] | None:
    """'model.layers.3.mlp.down_proj' -> ('model.layers.3', 'mlp.down_proj'); None outside numbered blocks."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if is_index(part):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return None


def block_paths(paths: Iterable[str]) -> set[str]:
    """The module paths from their numbered block: 'model.layers.3.mlp' -> 'mlp' (others left out)."""
    return {s[1] for s in map(split_layer, paths) if s is not None}


def names_hint(paths: Iterable[str], cap: int = MAX_HINT_NAMES) -> str:
    """Module paths for an error's hint, each numbered block's once (``self_attn.q_proj``), at most ``cap``."""
    names: list[str] = []
    for path in paths:
        split = split_layer(path)
        name = split[1] if split is not None else path
        if name not in names:
            names.append(name)
    names.sort()
    more = f" (and {len(names) - cap} more)" if len(names) > cap else ""
    return ", ".join(names[:cap]) + more


def excluded(name: str, spec: str | tuple[str, ...]) -> bool:
    """Whether PEFT's ``exclude_modules`` removes module ``name``: a regex matching the whole path,
    or a name equal to it or to a dotted suffix of it. (The one place exclusions are matched.)
    A head model's path (``bert.encoder...``) names the checkpoint's ``encoder...`` too."""
    if isinstance(spec, str):
        return fullmatch(from_file(spec, "adapter_config.json exclude_modules"), name, "exclude_modules")  # bounded
    return any(names_module(name, n) or names_module(n, name) for n in spec)


def linear_names_hint(modules: Iterable[LinearModule]) -> str:
    """'linear modules here: self_attn.q_proj, ...' for the hint of a target that matches nothing."""
    return "linear modules here: " + names_hint(m.name for m in modules)


def linear_modules(shapes: dict[str, tuple[int, ...]], config: dict | None) -> list[LinearModule]:
    model_type = model_type_of(config)
    out = []
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if _EMBEDDING.search(module.rsplit(".", 1)[-1]):
            continue
        transposed = model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_KINDS
        out_in = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        out.append(LinearModule(module, out_in, transposed, layer_index(module)))
    return out


def is_output_head(module: LinearModule, config: dict | None) -> bool:
    vocab = (config or {}).get("vocab_size")
    return module.kind in _OUTPUT_HEADS or (module.layer is None and vocab is not None and module.shape[0] == vocab)


def parse_layers(spec: str | None) -> set[int] | None:
    """'20-29' or '0,2,5-7' -> a set of layer indices; None means every layer."""
    if spec is None or spec == "":
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part, flags=re.ASCII)  # not '١-٣'
        if not m:
            raise UsageError(f"invalid `layers` {spec!r}", "use a list of indices and ranges such as 0,2,20-29")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"invalid `layers` range {part.strip()!r}", "write ranges low-high")
        if hi > MAX_LAYER_INDEX:
            raise UsageError(f"`layers` index {hi} is beyond any real model", f"layer indices stop at {MAX_LAYER_INDEX}")
        layers.update(range(lo, hi + 1))
    return layers


def require_layers(layer_set: set[int], present: set[int]) -> None:
    """Refuse a --layers that names a layer the model does not have (``present``: those it has)."""
    absent = sorted(layer_set - present)
    if absent:
        raise UsageError(
            f"`layers` names layer {absent[0]}, which this model does not have",
            f"layers here: {min(present)}-{max(present)}" if present else "this model has no numbered layers",
        )


def default_targets(modules: list[LinearModule], config: dict | None) -> tuple[str, ...]:
    kinds = {m.kind for m in modules}
    preset = DEFAULT_QV_TARGETS.get(model_type_of(config) or "")
    if preset and set(preset) <= kinds:
        return preset
    for names in FALLBACK_QV:  # unknown family: recognise the projections by name
        if set(names) <= kinds:
            return names
    raise UsageError(
        "cannot tell this architecture's query/value projections",
        "pass `targets`; " + linear_names_hint(modules),
    )


def resolve_targets(
    shapes: dict[str, tuple[int, ...]], config: dict | None, targets: str | None, layers: str | None
) -> list[LinearModule]:
    """The linear modules selected by ``targets`` (names, a regex or 'all-linear') and ``layers``."""
    modules = linear_modules(shapes, config)
    if not modules:
        raise UsageError(
            "this checkpoint has no linear (2-D) weights to adapt",
            "check that the path is the base model's directory, not an adapter's",
        )
    if targets is None or targets.strip() == "":
        names: tuple[str, ...] | None = default_targets(modules, config)
        chosen = [m for m in modules if m.kind in names]
    elif targets.strip() == "all-linear":
        chosen = [m for m in modules if not is_output_head(m, config)]
    elif is_regex(targets):
        pattern = compile_pattern(targets, "`targets`", "e.g. `targets` '.*\\.(q_proj|v_proj)'")
        chosen = [m for m in modules if pattern.fullmatch(m.name)]  # PEFT: re.fullmatch(target_modules, key)
        if not chosen:
            raise UsageError(
                f"{pattern.source} regex {shown(targets)} matches no linear module",
                "a regex must match a whole module path such as "
                + next((m.name for m in modules if m.layer is not None), modules[0].name)
                + "; " + linear_names_hint(modules),
            )
    else:
        wanted = [t.strip() for t in targets.split(",") if t.strip()]
        chosen = [m for m in modules if any(names_module(m.name, t) for t in wanted)]
        missing = [t for t in wanted if not any(names_module(m.name, t) for m in modules)]
        if missing:
            raise UsageError(f"target {', '.join(missing)} matches no linear module", linear_names_hint(modules))
    layer_set = parse_layers(layers)
    if layer_set is not None:
        require_layers(layer_set, {m.layer for m in modules if m.layer is not None})
        chosen = [m for m in chosen if m.layer in layer_set]
    if not chosen:
        what = f"`targets` {targets!r} matches no linear module" if targets else "no module matches the default targets"
        raise UsageError(what + (f" in `layers` {layers}" if layer_set is not None else ""), linear_names_hint(modules))
    return chosen
