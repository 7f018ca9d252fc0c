"""mergekit's YAML merge configuration (``peftcli merge --config merge.yml``) as peftcli's merge.

Scope: read a mergekit configuration (``merge_method``, ``base_model``, ``models`` with
``parameters``, one full-range ``slices`` entry, ``parameters`` with per-filter lists for slerp's
``t``, ``dtype``, ``tokenizer_source: base|union|<model>``) and return the (base, inputs, values) that
``peftcli merge`` takes, where ``values`` are MergeOptions' keys. Only what peftcli computes with
mergekit's formula is accepted: everything else (an unknown key, a method peftcli lacks, a value
that only mergekit's own code would give a meaning to) is refused naming the key, never ignored.
Model paths are local: peftcli never downloads. The YAML is read with the recipes' bounded loader.

The key map (mergekit → peftcli):
- ``linear`` (weighted average of the models, ``normalize`` default true) → ``linear`` on the
  base ``base_model`` (or the first model), one of the models, with λᵢ = wᵢ/Σw over the others:
  Σ wᵢθᵢ/Σw = θ₀ + Σ (wᵢ/Σw)(θᵢ − θ₀) exactly; ``normalize: false`` only where Σw = 1.
- ``task_arithmetic``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``dare_ties``,
  ``della_linear`` (mergekit's ``normalize`` default false): λᵢ = ``lambda``·wᵢ (and /Σw with
  ``normalize: true`` for the methods without a sign election); ``ties`` and ``della``
  (``normalize`` default true) take ``normalize: true`` only, ``della``'s ``lambda`` is ``--scale``.
- ``density``, ``gamma``, ``epsilon``: one value for every model (peftcli's methods take one).
- ``slerp``: the base is ``base_model`` (mergekit's first model), the other model the second input.
- ``model_stock``, ``karcher``: their parameters (``filter_wise: false``; ``max_iter``, ``tol``).
- ``nuslerp``, ``multislerp``: ``weight`` per model (required, as in mergekit) → ``--weights``;
  ``base_model`` → ``origin: base`` (the task vectors are interpolated; nuslerp's base_model
  must not be one of its two models), none → ``origin: zero`` with the first model as peftcli's
  base; ``nuslerp_flatten``/``nuslerp_row_wise`` → ``nuslerp_vectors`` tensor/rows/columns;
  ``normalize_weights: false`` → ``weights_as_given``; ``eps`` → ``eps``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

from peftcli.errors import BadInputError, UsageError

HINT = "see docs/merging.md, mergekit configurations, for the keys peftcli reads"
METHODS = {  # mergekit name -> peftcli method
    "linear": "linear", "task_arithmetic": "linear", "ties": "ties", "dare_ties": "dare-ties",
    "dare_linear": "dare", "slerp": "slerp", "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs-ties",
    "della": "della", "della_linear": "della-linear", "model_stock": "model-stock", "karcher": "karcher",
    "nuslerp": "nuslerp", "multislerp": "multislerp",
}
# mergekit's tensor parameters (per model or global) and its global ones, per method; and the
# value of ``normalize`` each method has by default (None: it takes no normalize).
TASK = ("weight", "density")
PER_MODEL = {
    "linear": ("weight",), "task_arithmetic": ("weight",), "ties": TASK, "dare_ties": TASK, "dare_linear": TASK,
    "breadcrumbs": TASK + ("gamma",), "breadcrumbs_ties": TASK + ("gamma",), "della": TASK + ("epsilon",),
    "della_linear": TASK + ("epsilon",), "slerp": (), "model_stock": (), "karcher": (),
    "nuslerp": ("weight",), "multislerp": ("weight",),
}
SPARSE_GLOBAL = ("normalize", "lambda", "int8_mask", "rescale")
GLOBAL = {
    "linear": ("normalize",), "task_arithmetic": SPARSE_GLOBAL, "ties": SPARSE_GLOBAL,
    "dare_ties": SPARSE_GLOBAL, "dare_linear": SPARSE_GLOBAL,
    "breadcrumbs": SPARSE_GLOBAL, "breadcrumbs_ties": SPARSE_GLOBAL, "della": SPARSE_GLOBAL, "della_linear": SPARSE_GLOBAL,
    "slerp": ("t",), "model_stock": ("filter_wise",), "karcher": ("max_iter", "tol"),
    "nuslerp": ("nuslerp_flatten", "nuslerp_row_wise"), "multislerp": ("normalize_weights", "eps"),
}
NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False,
             "breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": False}
RESCALE = {"ties": False, "dare_ties": True, "dare_linear": True, "breadcrumbs": False, "breadcrumbs_ties": False,
           "della": True, "della_linear": True}  # mergekit's default_rescale: peftcli's methods have it fixed
ELECTS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}  # a sign election: normalize is not a weight factor
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "tokenizer_source")


def refuse(key: str, why: str, hint: str = HINT) -> UsageError:
    return UsageError(f"mergekit config: {key}: {why}", hint)


def load(path: str) -> tuple[str, list[str], dict[str, Any]]:
    """(base, inputs, MergeOptions values) of the mergekit configuration at ``path``."""
    return parse(_read(path))


def _read(path: str) -> dict:
    from peftcli.recipes.recipe import read_yaml_file  # the recipes' bounded reader and YAML loader, shared

    if not os.path.exists(path):
        raise BadInputError(f"{path}: no such mergekit config file", "give the path of a mergekit YAML configuration")
    raw = read_yaml_file(path, "mergekit config")
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: a mergekit config is a YAML mapping, not a {type(raw).__name__}", HINT)
    return raw


PASSTHROUGH_KEYS = ("merge_method", "slices", "dtype")


def passthrough(raw: dict) -> tuple[list, str | None]:
    """(the slices, the output dtype) of a passthrough configuration: one model per slice, no scale."""
    from peftcli.merging.passthrough import Slice

    unknown = next((k for k in raw if k not in PASSTHROUGH_KEYS), None)
    if unknown is not None:
        raise refuse(str(unknown), "not a key peftcli's passthrough reads", f"drop {unknown}; passthrough takes slices: and dtype:")
    slices = raw.get("slices")
    if not isinstance(slices, list) or not slices:
        raise refuse("slices", "passthrough needs a list of slices, each - sources: [{model: PATH, layer_range: [A, B]}]", HINT)
    out = []
    for entry in slices:
        if not isinstance(entry, dict) or set(entry) != {"sources"}:
            bad = next((k for k in entry if k != "sources"), "sources") if isinstance(entry, dict) else "sources"
            raise refuse(f"slices.{bad}", "each slice is - sources: [one model]", HINT)
        sources = entry["sources"]
        if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
            raise refuse("slices.sources", "passthrough takes exactly one model per slice", "give - sources: [{model: PATH, layer_range: [A, B]}]")
        source = sources[0]
        bad = next((k for k in source if k not in ("model", "layer_range")), None)
        if bad is not None:
            raise refuse(f"slices.sources.{bad}", "not a key peftcli's passthrough reads (no scale)", f"drop {bad}")
        path = _local(source.get("model"), "slices.sources.model")
        span = source.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise refuse("slices.sources.layer_range", f"{span!r} is not [START, STOP]", "give layer_range: [0, 16]")
        out.append(Slice(path, span[0], span[1]))
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise refuse("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}", "give dtype float32, bfloat16 or float16")
    return out, DTYPES[dtype] if dtype is not None else None


def parse(raw: dict) -> tuple[str, list[str], dict[str, Any]]:
    if raw.get("merge_method") == "passthrough":
        raise refuse("merge_method", "passthrough stacks layers: `peftcli merge --config FILE` writes it, a recipe's merge step does not", "run `peftcli merge --config FILE`")
    unknown = next((k for k in raw if k not in TOP_KEYS), None)
    if unknown is not None:
        raise refuse(str(unknown), "not a key peftcli reads", f"drop {unknown}; {HINT}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise refuse("merge_method", f"{method!r} is not a method peftcli merges", f"choose one of {', '.join(METHODS)}")
    values: dict[str, Any] = {"method": METHODS[method]}
    if _check_tokenizer(raw.get("tokenizer_source")) is not None:
        values["tokenizer_source"] = raw["tokenizer_source"]  # merging.vocab: by token where vocabularies differ
    if raw.get("dtype") is not None:
        if raw["dtype"] not in DTYPES:
            raise refuse("dtype", f"{raw['dtype']!r} is not one of {', '.join(DTYPES)}", "give dtype float32, bfloat16 or float16")
        values["dtype"] = DTYPES[raw["dtype"]]
    base = raw.get("base_model")
    if base is not None:
        base = _local(base, "base_model")
    models = _models(raw)
    params = _parameters(raw.get("parameters"), "parameters", PER_MODEL[method] + GLOBAL[method])
    resolved = [(path, {**{k: v for k, v in params.items() if k in PER_MODEL[method]}, **mp}) for path, mp in models]
    for _, mp in models:
        bad = next((k for k in mp if k not in PER_MODEL[method]), None)
        if bad is not None:
            raise refuse(f"models.parameters.{bad}", f"{method} takes no per-model {bad}", HINT)
    glob = {k: v for k, v in params.items() if k in GLOBAL[method]}
    if method in ("slerp", "model_stock", "karcher"):
        base, inputs = _geometric(method, base, [p for p, _ in models], glob, values)
    elif method in ("nuslerp", "multislerp"):
        base, inputs = _spherical(method, base, resolved, glob, values)
    else:
        base, inputs = _weighted(method, base, resolved, glob, values)
    return base, inputs, values


def _check_tokenizer(source: Any) -> str | None:
    """``tokenizer_source``: base, union or a model's path (``merging.vocab``; mergekit's ``{model: ...}`` form is refused)."""
    if source is not None and not (isinstance(source, str) and source):
        raise refuse("tokenizer_source", f"{source!r}: peftcli takes base, union or a model's path", "give tokenizer_source: base, union or a model path")
    return source


def _local(name: Any, key: str) -> str:
    if not isinstance(name, str) or not name:
        raise refuse(key, f"{name!r} is not a model path", "give a local directory or file")
    if not os.path.exists(name):
        raise BadInputError(f"mergekit config: {key}: {name!r} is not a local path; peftcli never downloads", "download the model first and give its directory")
    return name


def _same(a: str, b: str | None) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)


def _models(raw: dict) -> list[tuple[str, dict]]:
    """(path, per-model parameters) of ``models``, or of one ``slices`` entry covering every layer."""
    if "slices" in raw:
        if "models" in raw:
            raise refuse("slices", "a config has models or slices, not both", "keep one of them")
        return _slices(raw["slices"], raw.get("base_model"))
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise refuse("models", "needs a list of {model: PATH, parameters: ...}", HINT)
    return [_model(e, "models") for e in entries]


def _model(entry: Any, where: str) -> tuple[str, dict]:
    if not isinstance(entry, dict):
        raise refuse(where, f"{entry!r} is not a mapping with model:", "write - model: PATH")
    bad = next((k for k in entry if k not in ("model", "parameters", "layer_range")), None)
    if bad is not None:
        raise refuse(f"{where}.{bad}", "not a key peftcli reads", HINT)
    return _local(entry.get("model"), f"{where}.model"), _parameters(entry.get("parameters"), f"{where}.parameters", None)


def _slices(slices: Any, base: Any) -> list[tuple[str, dict]]:
    """One slice whose sources all take every layer: the same as ``models`` (passthrough is not merged)."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict) or set(slices[0]) - {"sources"}:
        raise refuse("slices", "peftcli merges whole models: only one slice with sources: covering every layer", "give models: instead")
    sources = slices[0].get("sources")
    if not isinstance(sources, list) or not sources:
        raise refuse("slices.sources", "needs a list of {model: PATH, layer_range: [0, LAYERS]}", HINT)
    out = []
    for s in sources:
        path, params = _model(s, "slices.sources")
        layers = _layers(path)
        if not isinstance(s, dict) or s.get("layer_range") != [0, layers]:
            raise refuse("slices.sources.layer_range", f"{s.get('layer_range')!r} is not every layer of {path} ([0, {layers}])", "peftcli merges whole models; give models: instead")
        out.append((path, params))
    return out


def _layers(path: str) -> int:
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.merging.methods.slerp import LAYER

    with open_checkpoint(path) as ckpt:
        indices = [int(m.group(1)) for n in ckpt if (m := LAYER.search(n))]
    return max(indices) + 1 if indices else 0


def _parameters(params: Any, where: str, allowed: tuple | None) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise refuse(where, "is a mapping of parameter names to values", HINT)
    bad = next((k for k in params if allowed is not None and k not in allowed), None)
    if bad is not None:
        raise refuse(f"{where}.{bad}", "not a parameter of this merge_method that peftcli reads", HINT)
    return dict(params)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise refuse(key, f"{value!r} is not a number (peftcli takes one value here, not a list or filters)", f"give {key} a number")
    return float(value)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise refuse(key, f"{value!r} is not true or false", f"give {key}: true or false")
    return value


def _one(resolved: list[tuple[str, dict]], key: str) -> float | None:
    """The one value of a per-model parameter (peftcli's methods take one for every model)."""
    seen = {_number(p[key], key) for _, p in resolved if key in p}
    if len(seen) > 1:
        raise refuse(key, f"differs between models ({', '.join(map(repr, sorted(seen)))}); peftcli takes one value for every model", f"give every model the same {key}")
    if seen and len(seen) == 1 and any(key not in p for _, p in resolved):
        raise refuse(key, "given for some models only", f"give {key} for every model, or under parameters:")
    return seen.pop() if seen else None


def _weights(entries: list[tuple[str, dict]]) -> list[float]:
    missing = next((path for path, p in entries if "weight" not in p), None)
    if missing is not None:
        raise refuse("weight", f"{missing} has no weight (mergekit requires one)", "give every model parameters: {weight: W}")
    return [_number(p["weight"], "weight") for _, p in entries]


def _weighted(method: str, base: str | None, resolved: list[tuple[str, dict]], glob: dict, values: dict) -> tuple[str, list[str]]:
    """The task-vector methods: λᵢ, density, gamma, epsilon and scale from mergekit's parameters."""
    if method == "linear":
        if base is not None and not any(_same(path, base) for path, _ in resolved):
            raise refuse("base_model", "mergekit's linear averages the models; peftcli's base must be one of them", "drop base_model, or list it under models")
        base = base if base is not None else resolved[0][0]
    elif base is None:
        raise refuse("base_model", f"{method} needs the base model its task vectors are taken from", "give base_model: PATH")
    normalize = _flag(glob.get("normalize", NORMALIZE[method]), "normalize")
    _flag(glob.get("int8_mask", False), "int8_mask")  # a storage choice of mergekit's: the same values
    rescale = _flag(glob.get("rescale", RESCALE.get(method, False)), "rescale")
    if method in RESCALE and rescale != RESCALE[method]:
        raise refuse("rescale", f"peftcli's {METHODS[method]} has rescale {str(RESCALE[method]).lower()} only", "drop rescale")
    lam = _number(glob.get("lambda", 1.0), "lambda")
    inputs = [(path, p) for path, p in resolved if not _same(path, base)]  # θ₀'s task vector is 0
    if not inputs:
        raise refuse("models", "lists no model but the base", "list the models to merge")
    weights = _weights(inputs)
    if method == "linear":
        total = sum(_weights(resolved))  # the base's weight counts in the average
        if normalize and abs(total) < 1e-8 or not normalize and total != 1.0:
            raise refuse("normalize" if not normalize else "weight", f"the weights sum to {total!r}: Σ wᵢθᵢ is then not θ₀ plus task vectors", "give weights that sum to 1, or normalize: true")
        weights = [w / total for w in weights]
    elif method in ELECTS:
        if normalize != NORMALIZE[method]:
            raise refuse("normalize", f"peftcli's {METHODS[method]} has normalize {str(NORMALIZE[method]).lower()} only", "drop normalize")
    elif normalize:
        total = sum(weights)
        weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]  # mergekit's divisor
    if method in ("della", "della_linear"):
        values["scale"] = lam
    elif lam != 1.0:
        if method in ELECTS and (NORMALIZE[method] or lam <= 0):
            raise refuse("lambda", f"{lam!r} cannot be folded into {method}'s weights", "drop lambda")
        weights = [w * lam for w in weights]
    values["weights"] = weights
    _sparsity(method, inputs, values)
    return base, [path for path, _ in inputs]


def _sparsity(method: str, inputs: list[tuple[str, dict]], values: dict) -> None:
    if "density" in PER_MODEL[method]:
        density = _one(inputs, "density")
        values["density"] = 1.0 if density is None else density  # mergekit's default keeps every entry
    if "gamma" in PER_MODEL[method] and (gamma := _one(inputs, "gamma")) is not None:
        values["gamma"] = gamma
    if "epsilon" in PER_MODEL[method]:
        epsilon = _one(inputs, "epsilon")
        if epsilon is None:
            raise refuse("epsilon", f"{method} needs epsilon", "give parameters: {epsilon: 0.1}")
        values["epsilon"] = epsilon


def _geometric(method: str, base: str | None, models: list[str], glob: dict, values: dict) -> tuple[str, list[str]]:
    """slerp, model_stock and karcher: the models as points, the base one of them (or θ₀)."""
    if method == "karcher":
        if base is not None and not any(_same(m, base) for m in models):
            raise refuse("base_model", "karcher averages the models; peftcli's base must be one of them", "drop base_model")
        values["max_iter"] = glob.get("max_iter")
        values["tol"] = glob.get("tol")
        return base if base is not None else models[0], models
    if base is None:
        raise refuse("base_model", f"{method} needs base_model", "give base_model: PATH")
    others = [m for m in models if not _same(m, base)]
    if method == "model_stock":
        if _flag(glob.get("filter_wise", False), "filter_wise"):
            raise refuse("filter_wise", "peftcli's model-stock computes t per tensor only", "drop filter_wise")
        return base, others
    if len(others) != 1 or len(models) != 2:
        raise refuse("models", "slerp merges base_model with exactly one other model", "list base_model and one other model")
    if "t" not in glob:
        raise refuse("t", "slerp needs t", "give parameters: {t: 0.5}")
    values.update(_t(glob["t"], base))
    return base, [base, others[0]]


def _spherical(method: str, base: str | None, resolved: list[tuple[str, dict]], glob: dict, values: dict) -> tuple[str, list[str]]:
    """nuslerp and multislerp: with base_model the points are the task vectors (``origin`` base),
    without it the models themselves (``origin`` zero, peftcli's base the first model)."""
    if base is not None:
        inputs = [(path, p) for path, p in resolved if not _same(path, base)]
        if method == "nuslerp" and len(inputs) != len(resolved):
            raise refuse("base_model", "nuslerp's base_model cannot be one of its two models (mergekit refuses it too)", "list two other models, or drop base_model")
        values["origin"] = "base"
    else:
        inputs, base = resolved, resolved[0][0]
        values["origin"] = "zero"
    least, most = (2, 2) if method == "nuslerp" else (2, None)
    if len(inputs) < least or most is not None and len(inputs) > most:
        exact = "exactly" if most else "at least"
        raise refuse("models", f"{method} merges {exact} 2 models besides base_model, got {len(inputs)}", f"list {exact} two models")
    values["weights"] = _weights(inputs)
    if method == "nuslerp":
        flatten = _flag(glob.get("nuslerp_flatten", True), "nuslerp_flatten")
        row_wise = _flag(glob.get("nuslerp_row_wise", False), "nuslerp_row_wise")
        values["nuslerp_vectors"] = "tensor" if flatten else "columns" if row_wise else "rows"  # mergekit's dim 0 or -1
    else:
        values["weights_as_given"] = not _flag(glob.get("normalize_weights", True), "normalize_weights")
        if "eps" in glob:
            values["eps"] = _number(glob["eps"], "eps")
    return base, [path for path, _ in inputs]


FILTERS = {"self_attn": "t_attention", "mlp": "t_mlp"}


def _schedule(value: Any, key: str) -> str:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise refuse(key, "an empty list", "give a number or a list of numbers")
    return ",".join(repr(_number(v, key)) for v in items)


def _t(value: Any, base: str) -> dict[str, str]:
    """slerp's t: a number, a list across layers, or filters (self_attn, mlp) and a fallback."""
    if not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
        return {"t": _schedule(value, "t")}
    out: dict[str, str] = {}
    order = []
    for entry in value:
        bad = next((k for k in entry if k not in ("filter", "value")), None)
        if bad is not None:
            raise refuse(f"t.{bad}", "not a key peftcli reads", "write {filter: self_attn, value: ...}")
        if "t" in out:
            raise refuse("t", "an entry after the one without filter is never used", "put the entry without filter last")
        f = entry.get("filter")
        key = "t" if f is None else FILTERS.get(f)
        if key is None or key in out:
            raise refuse("t.filter", f"{f!r}: peftcli filters self_attn and mlp once each", "use filter: self_attn or mlp")
        out[key] = _schedule(entry.get("value"), "t.value")
        order.append(f)
    if "t" not in out:
        raise refuse("t", "needs an entry without filter (the value of the other tensors)", "add - value: 0.5")
    _check_filters(base, [f for f in order if f is not None], out)
    return out


def _check_filters(base: str, filters: list[str], given: dict) -> None:
    """mergekit picks the first filter that is a substring of the tensor's name; peftcli's
    families (slerp.t_for) must pick the same schedule for every tensor of the base."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.merging.methods.slerp import ATTENTION, LAYER, MLP

    with open_checkpoint(base) as ckpt:
        names = list(ckpt)
    for name in names:
        theirs = next((FILTERS[f] for f in filters if f in name), "t")
        ours = "t"
        if LAYER.search(name):
            parts = set(name.split("."))
            family = "t_attention" if parts & ATTENTION else "t_mlp" if parts & MLP else "t"
            ours = family if family in given else "t"
        if theirs != ours:
            raise refuse("t.filter", f"tensor {name} takes {theirs} in mergekit but {ours} in peftcli", "give t one value or list for every tensor")


# What a merge takes beside a configuration: output, seed, shards, heads, force, pickles.
KEPT_WITH_CONFIG = ("seed", "max_shard_size", "force", "allow_pickle", "heads")


def with_config(path: str, base, inputs, values: dict[str, Any], given: Iterable[str], *, stack: bool = False) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """(base, inputs, values) of a merge run from the mergekit configuration at ``path``: the
    configuration gives the base, the inputs, the method and its parameters; ``values`` keeps
    only KEPT_WITH_CONFIG. ``given``: the options the command line or recipe step set itself,
    refused when the configuration sets them (never silently overridden). ``stack``: the caller
    writes a passthrough configuration (``values["stack"]``: its slices, for ``passthrough.stack``)."""
    if base or inputs:
        raise UsageError("`config` gives BASE and INPUTS", "give `config` or BASE INPUT..., not both")
    clash = next((k for k in given if k not in KEPT_WITH_CONFIG), None)
    if clash is not None:
        flag = f"`{clash}`"
        raise UsageError(f"`config` sets the method and its parameters; {flag} is not taken with it", f"drop {flag}, or set it in the configuration")
    kept = {k: values.get(k) for k in KEPT_WITH_CONFIG}
    raw = _read(path)
    if raw.get("merge_method") == "passthrough":
        if not stack:
            raise refuse("merge_method", "passthrough stacks layers: `peftcli merge --config FILE` writes it, a recipe's merge step does not", "run `peftcli merge --config FILE`")
        slices, dtype = passthrough(raw)
        return "", (), {**kept, "stack": slices, "dtype": dtype}
    base, found, mk = parse(raw)
    return base, tuple(found), {**kept, **mk}
