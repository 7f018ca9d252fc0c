"""``peftcli merge``: θ = θ₀ + combine(φ₁ … φₖ), streamed into a standalone checkpoint.

Each output tensor is one task (``ranged.py``): where the inputs are diffs or full checkpoints
(any method: linear, TIES, DARE, DARE-TIES), it is produced a range of elements at a time: read the
base's range, compute each input's φ for it in fp32 (fp64 for an F64 base: a dtype that holds
θ₀ exactly), accumulate, add θ₀ (whose own bits stay where the sum is 0), cast once to the
output dtype, refuse anything not finite, write. Tensors no input touches are copied byte for
byte (or cast, with ``dtype``); those no merge computes with (integers, bool, FP8) are copied
after checking that no full checkpoint among the inputs changes them. Everything else (adapters, heads, pickles) is produced whole by ``produce``:
the same operations on whole tensors, which the ranged tasks reproduce bit for bit. A reader
and a writer thread overlap the reads, arithmetic and writes (``pipeline.py``), and the inputs'
provenance hashes are computed on a thread of their own (``provenance.py``). Peak memory is a
few ranges plus what one tensor needs whole (``estimate.py``), never the model. The output has
the base's tensor names, shapes, dtypes (unless ``dtype``) and shard layout (unless
``max_shard_size``), its config and tokenizer files, so plain ``transformers`` loads it; tied
weights stay one tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import torch

from peftcli import __version__
from peftcli.checkpoint.dtypes import plus_base, torch_dtype, work_dtype
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, SafetensorsStreamWriter, TensorSpec
from peftcli.errors import BadInputError, UsageError
from peftcli.merge.provenance import Hasher
from peftcli.merge.pipeline import Buffers, ReadAhead, WriteBehind
from peftcli.merge.ranged import (
    OUT_BUFFERS, WRITE_LIMIT, Cast, Context, Copy, Dare, Linear, Task, Ties, buffer_bytes, check_cast, check_finite,
    read_buffers, unmergeable_change,
)
from peftcli.merge.sources import Source, open_source, refuse_unmergeable

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class MergeReport:
    output: str
    method: str
    inputs: list[dict]
    tensors: int
    changed: int
    bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "schema": "peftcli.merge/1", "output": self.output, "method": self.method, "inputs": self.inputs,
            "tensors": self.tensors, "changed_tensors": self.changed, "bytes": self.bytes,
        }


def _weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} values for {n} inputs", "give one weight per input, e.g. --weights 1.0,0.8")
    return list(weights)


def merge(
    base: str,
    inputs: list[str],
    out: str | None,
    *,
    weights: list[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    stream: BinaryIO | None = None,
    progress: Callable[[int, int], None] | None = None,
    hasher: Hasher | None = None,
) -> MergeReport:
    """Merge ``inputs`` into ``base``; write to ``out`` (file or directory) or to ``stream``.

    ``hasher`` hashes the inputs' weight files for the provenance metadata; one started
    earlier (``Hasher.for_inputs(inputs)``) has them ready sooner.
    """
    from peftcli.merge.arithmetic import combine

    if not inputs:
        raise UsageError("nothing to merge", "give at least one .diff, adapter directory or fine-tuned checkpoint")
    lam = _weights(weights, len(inputs))
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", "choose F32, BF16, F16 or F64")
    combine([torch.zeros(1)] * len(inputs), lam, method, density=density, seed=seed, key="")  # validates the options early
    with _one_thread(), open_checkpoint(base, allow_pickle=allow_pickle) as ckpt:
        sources: list[Source] = []
        hasher = hasher or Hasher.for_inputs(inputs)
        try:
            for path in inputs:
                sources.append(open_source(path, ckpt, allow_pickle, hasher.sha256))
            for s in sources:
                unknown = sorted(set(s.deltas) - set(ckpt.tensors))
                if unknown:
                    raise BadInputError(f"{s.path} changes {unknown[0]!r}, which the base does not have", "merge into the base it was made for")
                refuse_unmergeable(s, ckpt)
            out_dtype = {t.name: (dtype if dtype and t.dtype in FLOAT_DTYPES else t.dtype) for t in ckpt.tensors.values()}
            with_heads = [s for s in sources if s.heads]
            layout = None
            if with_heads:
                if len(with_heads) > 1:
                    raise UsageError("more than one input trains a task head", "merge at most one adapter with a head")
                if stream is not None or out.endswith(".safetensors"):
                    raise UsageError("a merged model with a task head is a model directory", "pass -o DIR")
                from peftcli.merge.heads import head_layout

                layout = head_layout(ckpt, with_heads[0].heads, with_heads[0].labels)
            # output name -> base tensor name (None: a head tensor taken from the adapter)
            origin = {t.name: t.name for t in ckpt.tensors.values()}
            if layout is not None:
                origin = {layout.rename[n]: n for n in ckpt.tensors if layout.rename[n]}
                origin.update({h: None for h in layout.head_names})
            head_tensors = with_heads[0].heads if with_heads else {}
            specs = [
                TensorSpec(o, out_dtype[n], ckpt.tensors[n].shape) if n else TensorSpec(o, dtype or "F32", tuple(head_tensors[o].shape))
                for o, n in origin.items()
            ]
            metadata = {
                "format": "pt",
                "peftcli.merge": json.dumps(
                    {
                        "version": __version__, "method": method, "weights": lam, "density": density, "seed": seed,
                        "base": os.path.abspath(base), "inputs": [{"path": os.path.abspath(s.path), "kind": s.kind, "sha256": s.hashes} for s in sources],
                    },
                    sort_keys=True, separators=(",", ":"),
                ),
            }

            def produce(out_name: str):  # a whole tensor at once: what ranged.py has no task for
                name = origin[out_name]
                if name is None:  # the trained head, as the adapter holds it
                    return head_tensors[out_name].to(torch_dtype(dtype or "F32")).contiguous(), True
                info = ckpt.tensors[name]
                touched = [(i, s) for i, s in enumerate(sources) if name in s.deltas]
                if not touched:
                    _check_fixed(name, ckpt, sources)
                if not touched and out_dtype[name] == info.dtype and ckpt.storage != "pickle":
                    return ckpt.read_bytes(name), False
                stored = ckpt.get(name)
                work = work_dtype(stored.dtype)  # holds the base's values exactly
                if touched and method == "linear":
                    # Σ λᵢφᵢ accumulated one input at a time (the same operations, in the same
                    # order, as combine's weighted sum), so only one φ is alive at once.
                    result = torch.zeros(stored.shape, dtype=work)
                    for i, s in touched:
                        phi = s.deltas[name](stored)
                        result.add_(phi, alpha=lam[i])
                        del phi
                    plus_base(result, stored)  # θ₀ + Σ λᵢφᵢ in the work dtype; one cast at the end
                elif touched:
                    # Every input takes part (zero where it does not touch this tensor): the same
                    # result for every method, and DARE's mask for input i depends on i alone.
                    phis = [s.deltas[name](stored) if name in s.deltas else torch.zeros(stored.shape, dtype=work) for s in sources]
                    result = combine(phis, lam, method, density=density, seed=seed, key=name, dtype=work)
                    del phis
                    plus_base(result, stored)  # accumulated in the work dtype, one cast at the end
                if touched:
                    result = result.to(torch_dtype(out_dtype[name])).contiguous()
                    check_finite(name, result)  # after the cast: beyond F16's range is Inf only there
                    return result, True
                result = stored.to(torch_dtype(out_dtype[name])).contiguous()
                if result.dtype != stored.dtype:
                    check_cast(name, stored, result)
                return result, False

            def task_for(out_name: str) -> Task:
                name = origin[out_name]
                info = ckpt.tensors[name] if name is not None else None
                if info is None or ckpt.storage == "pickle" or info.numel == 0:
                    return _Whole(out_name, produce)
                touched = [i for i, s in enumerate(sources) if name in s.deltas]
                if not touched:
                    fixed = [(s.path, s.fixed[name]) for s in sources if name in s.fixed]
                    if any(f.begin is None for _, f in fixed):  # a pickled input: compared whole
                        return _Whole(out_name, produce)
                    if out_dtype[name] == info.dtype:
                        return Copy(out_name, info, fixed)
                    return Cast(out_name, info, out_dtype[name])
                if info.dtype not in FLOAT_DTYPES or any(name not in sources[i].streams for i in touched):
                    return _Whole(out_name, produce)
                streams = [(i, lam[i], sources[i].streams[name]()) for i in touched]
                if method == "linear":
                    return Linear(out_name, info, out_dtype[name], [(w, st) for _, w, st in streams])
                if method == "ties":
                    return Ties(out_name, info, out_dtype[name], [(w, st) for _, w, st in streams], density)
                return Dare(out_name, info, out_dtype[name], streams, density, seed, name, ties=method == "dare-ties")

            changed, total = 0, len(specs)
            with contextlib.ExitStack() as stack:
                if stream is not None:
                    writer, order = SafetensorsStreamWriter(stream, specs, metadata), specs
                else:
                    plan = None
                    if max_shard_size is None and not out.endswith(".safetensors") and len(ckpt.files) > 1 and layout is None:
                        plan = [[t.name for t in ckpt.tensors.values() if t.file == f] for f in ckpt.files]  # the base's layout
                    writer = stack.enter_context(
                        CheckpointWriter(
                            out, specs, metadata=metadata, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                            source_dir=ckpt.directory, inputs=[base, *inputs], force=force, shard_plan=plan,
                            extra_files=_config_files(ckpt, layout, dtype),
                        )
                    )
                    order = writer.specs
                tasks = [task_for(spec.name) for spec in order]
                nbytes = buffer_bytes([t.dtype for t in ckpt.tensors.values()] + list(out_dtype.values()))
                requests = (r for t in tasks for r in t.requests())
                with (
                    ReadAhead(requests, read_buffers(len(sources)), nbytes) as reads,
                    WriteBehind(writer, WRITE_LIMIT) as behind,
                ):
                    ctx = Context(reads, behind, Buffers(OUT_BUFFERS, nbytes))
                    for n, task in enumerate(tasks, 1):
                        task.run(ctx)
                        changed += task.changed
                        if progress:
                            progress(n, total)
                if stream is not None:
                    writer.finish()
        finally:
            hasher.stop()
            for s in sources:
                s.close()
    size = 0
    if out and os.path.isfile(out):
        size = os.path.getsize(out)
    elif out and os.path.isdir(out):
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    report_inputs = [{"path": s.path, "kind": s.kind, "weight": w, "tensors": len(s.deltas)} for s, w in zip(sources, lam)]
    return MergeReport(out or "-", method, report_inputs, len(specs), changed, size, metadata)


def _check_fixed(name: str, ckpt, sources: list[Source]) -> None:
    """Refuse a full checkpoint whose ``name`` (an integer, bool or FP8 tensor) differs from the base's."""
    fixed = [s for s in sources if name in s.fixed]
    if not fixed:
        return
    mine = ckpt.get(name).reshape(-1).view(torch.uint8)
    for s in fixed:
        if not torch.equal(mine, s.checkpoint.get(name).reshape(-1).view(torch.uint8)):
            raise unmergeable_change(s.path, name, ckpt.tensors[name].dtype)


@dataclass
class _Whole(Task):
    """A tensor produced whole by ``produce`` (heads, adapters, pickles): written in one piece."""

    name: str
    produce: Callable

    def run(self, ctx: Context) -> None:
        data, self.changed = self.produce(self.name)
        ctx.out.put(self.name, data, whole=True)


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads off for the merge, restored after it.

    The merge's own threads (reader, writer, hasher) keep the cores busy, and on a shared
    machine every parallel op waits for the slowest of its threads to be scheduled: on two
    busy cores an op on one range (256K elements) took ~6.5 ms with two threads, ~0.2 ms with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stdout_stream() -> BinaryIO:
    if sys.stdout.isatty():
        raise UsageError("refusing to write a binary checkpoint to a terminal", "pass -o OUTPUT or redirect stdout to a file")
    return sys.stdout.buffer


def _config_files(ckpt, layout, dtype: str | None) -> dict[str, bytes] | None:
    """config.json when the merge changes what it says: a head model, or another dtype."""
    if layout is None and (dtype is None or ckpt.config is None):
        return None
    config = json.loads(layout.config_json) if layout is not None else dict(ckpt.config)
    if dtype is not None:
        name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}[dtype]
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = name
    return {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
