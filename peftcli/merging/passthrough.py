"""mergekit's ``passthrough`` with ``slices``: a model stacked from layer ranges of others, copied.

Scope: ``stack(slices, out)`` writes a model directory whose layers are, in order, layers
[a, b) of each slice's model, renumbered 0, 1, … (the layer index in each tensor name
rewritten), with the config's layer count (``num_hidden_layers`` or ``n_layer``) the total. As
mergekit's planner: the tensors before the layers (embeddings) come from the first slice's
model, those after them (the final norm, the head) from the last slice's; the config and
tokenizer files from the first slice's model. Every tensor is copied byte for byte (or cast
once, with ``dtype``), a range at a time through the merge engine's reader and writer
(``ranged.Copy``, ``ranged.Cast``). Nothing is computed, so nothing is guessed: models whose
configs differ beyond the layer count, layers that are not alike (tensor names, dtypes, shapes),
a layer range beyond a model, a non-layer tensor that is
neither an embedding nor a final norm or head where the first and last models differ, and a
config that lists something per layer other than ``PER_LAYER_KEYS`` are refused naming what.
The keys in ``PER_LAYER_KEYS`` (``layer_types``, which transformers 5 writes for Qwen2, Qwen3,
Gemma and others) are restacked like the layers: each slice contributes its model's entries
[a, b).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from peftcli import __version__
from peftcli.errors import BadInputError, UsageError

LAYER_COUNTS = ("num_hidden_layers", "n_layer")  # the config key holding the number of layers
# config keys that may differ between the stacked models: their names, versions, dtypes
FREE_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", *LAYER_COUNTS)
# config lists known to hold one entry per layer, in layer order: restacked with the layers.
# Any other list as long as the layer count is refused: it may be per layer, and a guess
# would leave a layer described as another (sliding vs full attention).
PER_LAYER_KEYS = ("layer_types",)
PRE = re.compile(r"(?:^|\.)(?:embed_tokens|embeddings|wte|wpe|word_embeddings|embed_in)\.")  # before the layers
POST = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layernorm|final_layer_norm|lm_head|embed_out)\.|^lm_head\.")  # after them
HINT = "see docs/merging.md, mergekit configurations"


@dataclass(frozen=True)
class Slice:
    """Layers [start, stop) of the model at ``path``."""

    path: str
    start: int
    stop: int


def _layers(ckpt, path: str) -> tuple[int, str, dict[str, tuple[int, re.Match]]]:
    """(layer count, its config key, name -> (layer, match) of the layer tensors) of one model."""
    from peftcli.merging.methods.slerp import LAYER

    config = ckpt.config
    if config is None:
        raise BadInputError(f"{path}: no config.json beside the weights", "passthrough stacks model directories with their config.json")
    keys = [k for k in LAYER_COUNTS if k in config]
    if len(keys) != 1 or not isinstance(config[keys[0]], int):
        raise BadInputError(f"{path}: config.json has no one layer count ({' or '.join(LAYER_COUNTS)})", "passthrough stacks decoder models whose config says their layers")
    count = config[keys[0]]
    found = {n: (int(m.group(1)), m) for n in ckpt.tensors if (m := LAYER.search(n))}
    if sorted({i for i, _ in found.values()}) != list(range(count)):
        raise BadInputError(f"{path}: its tensors' layer indices are not 0 … {count - 1} as config.json's {keys[0]} says", "stack models whose weights match their config")
    return count, keys[0], found


def _check_layers(models: dict[str, tuple], ckpts: dict) -> None:
    """Refuse layers that are not alike: every layer of every model must hold the same tensors
    (names but for the index, dtypes, shapes) as the first model's layer 0, or a renumbered
    stack could put a layer where another kind belongs."""
    def template(path: str, layer: int) -> set:
        tensors = ckpts[path].tensors
        return {(n[: m.start(1)] + "{}" + n[m.end(1) :], tensors[n].dtype, tuple(tensors[n].shape)) for n, (i, m) in models[path][2].items() if i == layer}

    first = next(iter(models))
    want = template(first, 0)
    for path, (count, _, _) in models.items():
        bad = next((i for i in range(count) if template(path, i) != want), None)
        if bad is not None:
            raise UsageError(f"passthrough: layer {bad} of {path} holds other tensors than layer 0 of {first}", "stack layers of models of one architecture whose layers are alike")


def _check_same(configs: list[tuple[str, dict]]) -> None:
    """Refuse models whose configs differ beyond FREE_KEYS (hidden size, heads, vocabulary, ...)."""
    first_path, first = configs[0]
    for path, config in configs[1:]:
        for key in sorted(set(first) | set(config)):
            if key not in (*FREE_KEYS, *PER_LAYER_KEYS) and first.get(key) != config.get(key):
                raise UsageError(
                    f"passthrough: {path} has {key} {config.get(key)!r} but {first_path} has {first.get(key)!r}",
                    "stack layers of models of one architecture and size",
                )


def _per_layer(config: dict, count: int, path: str) -> None:
    """Refuse a config that lists something per layer other than PER_LAYER_KEYS (renumbering the
    layers would leave it wrong), and a PER_LAYER_KEYS entry that is not one item per layer."""
    for key, value in config.items():
        if key in PER_LAYER_KEYS:
            if value is not None and not (isinstance(value, list) and len(value) == count):
                raise UsageError(
                    f"passthrough: {path}'s config.json {key} is not a list of its {count} layers' entries",
                    f"fix {key} in {path}/config.json, or stack models whose configs describe their layers",
                )
        elif isinstance(value, list) and len(value) == count and key != "architectures" and count > 1:
            raise UsageError(f"passthrough: {path}'s config.json lists {key} per layer, which peftcli does not restack", "stack models whose config has no per-layer lists")


def _restacked(slices: list[Slice], ckpts: dict) -> dict:
    """PER_LAYER_KEYS of the stacked model: each slice's model's entries [start, stop), in order.
    A key some models list and others lack is refused (the stacked layers would be half described)."""
    out: dict[str, Any] = {}
    for key in PER_LAYER_KEYS:
        lists = [ckpts[s.path].config.get(key) for s in slices]
        if all(v is None for v in lists):
            continue
        if any(v is None for v in lists):
            raise UsageError(f"passthrough: some models' config.json list {key} and some do not", "stack models whose configs describe their layers alike")
        out[key] = [entry for s, v in zip(slices, lists) for entry in v[s.start : s.stop]]
    config = ckpts[slices[0].path].config
    if "layer_types" in out and config.get("use_sliding_window") is True and "max_window_layers" in config:
        out["max_window_layers"] = _window_start(out["layer_types"])
    return out


def _window_start(types: list) -> int:
    """Qwen2's max_window_layers for the stacked ``layer_types`` (layers from it on use sliding
    attention), so that readers deriving the kinds from it (not from layer_types) agree; a
    stack whose sliding layers are not one run at the end cannot be said that way: refused."""
    k = next((i for i, t in enumerate(types) if t == "sliding_attention"), len(types))
    if any(t != "sliding_attention" for t in types[k:]):
        raise UsageError(
            "passthrough: the stacked layer_types put full attention after sliding attention, which max_window_layers cannot describe",
            "order the slices so that the layers with sliding attention come last",
        )
    return k


def plan(slices: list[Slice], ckpts: dict) -> tuple[list[tuple[str, str, str]], dict, int]:
    """(output name, model path, source name) of every output tensor, the output config, the layer total."""
    infos = {}
    for s in slices:
        if s.path not in infos:
            infos[s.path] = _layers(ckpts[s.path], s.path)
    for path, (layers, _, _) in infos.items():  # first: a per-layer list is what makes configs differ
        _per_layer(ckpts[path].config, layers, path)
    configs = [(p, ckpts[p].config) for p in infos]
    _check_same(configs)
    _check_layers(infos, ckpts)
    first, last = slices[0].path, slices[-1].path
    count, key, _ = infos[first]
    names: list[tuple[str, str, str]] = []
    for name in ckpts[first].tensors:  # the embeddings, before the layers
        if name not in infos[first][2] and (first == last or PRE.search(name)):
            names.append((name, first, name))
    total = 0
    for s in slices:
        layers = infos[s.path][0]
        if not (0 <= s.start < s.stop <= layers):
            raise UsageError(
                f"mergekit config: slices.sources.layer_range: [{s.start}, {s.stop}] is not within the {layers} layers of {s.path}",
                f"give 0 ≤ start < stop ≤ {layers}",
            )
        for layer in range(s.start, s.stop):
            for name, (index, m) in infos[s.path][2].items():
                if index == layer:
                    names.append((name[: m.start(1)] + str(total + layer - s.start) + name[m.end(1) :], s.path, name))
        total += s.stop - s.start
    for name in ckpts[last].tensors if first != last else ():  # the final norm and head, after them
        if name not in infos[last][2] and not PRE.search(name):
            if not POST.search(name):
                raise UsageError(f"passthrough: {name!r} is neither an embedding nor a final norm or head", "stack slices whose first and last models are the same model")
            names.append((name, last, name))
    config = dict(ckpts[first].config)
    config[key] = total
    config.update(_restacked(slices, ckpts))
    return names, config, total


def stack(slices: list[Slice], out: str | None, *, dtype: str | None = None, max_shard_size=None, force: bool = False):
    """Write the model stacked from ``slices`` to the directory ``out``; the merge's report."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
    from peftcli.merging.engine import FLOAT_DTYPES
    from peftcli.merging.report import MergeReport, output_size as _size
    from peftcli.merging.heads import with_dtype

    if out is None or out.endswith(".safetensors"):
        raise UsageError("a stacked model is a model directory with its config.json", "pass -o DIR")
    paths = list(dict.fromkeys(s.path for s in slices))
    with contextlib.ExitStack() as stack_:
        ckpts = {p: stack_.enter_context(open_checkpoint(p)) for p in paths}
        names, config, total = plan(slices, ckpts)
        infos = {o: ckpts[p].tensors[n] for o, p, n in names}
        out_dtype = {o: (dtype if dtype and i.dtype in FLOAT_DTYPES else i.dtype) for o, i in infos.items()}
        specs = [TensorSpec(o, out_dtype[o], infos[o].shape) for o in infos]
        provenance = {"version": __version__, "method": "passthrough", "slices": [[os.path.abspath(s.path), s.start, s.stop] for s in slices]}
        metadata = {"format": "pt", "peftcli.merge": json.dumps(provenance, sort_keys=True, separators=(",", ":"))}
        config_bytes = (json.dumps(with_dtype(config, dtype), indent=2, sort_keys=True) + "\n").encode()
        writer = stack_.enter_context(
            CheckpointWriter(
                out, specs, metadata=metadata, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                source_dir=ckpts[slices[0].path].directory, inputs=paths, force=force, extra_files={"config.json": config_bytes},
                tied_heads=True,
            )
        )
        _copy(writer, infos, out_dtype)
    inputs = [{"path": p, "kind": "checkpoint", "weight": 1.0, "tensors": sum(1 for _, q, _ in names if q == p)} for p in paths]
    return MergeReport(out, "passthrough", inputs, len(names), 0, _size(out), metadata)


def _copy(writer, infos: dict, out_dtype: dict) -> None:
    """Every tensor's bytes (or its cast) through the merge's read-ahead and write-behind threads."""
    from peftcli.merging.pipeline import Buffers, ReadAhead, WriteBehind
    from peftcli.merging.ranged import OUT_BUFFERS, WRITE_LIMIT, Cast, Context, Copy, buffer_bytes, read_buffers

    for name, info in infos.items():
        if info.begin is None:
            raise BadInputError(f"{name!r} is not stored in a safetensors file", "stack safetensors checkpoints")
    tasks = [Copy(s.name, infos[s.name]) if out_dtype[s.name] == infos[s.name].dtype else Cast(s.name, infos[s.name], out_dtype[s.name]) for s in writer.specs]
    nbytes = buffer_bytes([i.dtype for i in infos.values()] + list(out_dtype.values()))
    with (
        ReadAhead((r for t in tasks for r in t.requests()), read_buffers(1), nbytes) as reads,
        WriteBehind(writer, WRITE_LIMIT) as behind,
    ):
        ctx = Context(reads, behind, Buffers(OUT_BUFFERS, nbytes))
        for task in tasks:
            task.run(ctx)
