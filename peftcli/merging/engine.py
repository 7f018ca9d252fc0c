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
from typing import Any, BinaryIO, Callable

import torch

from peftcli import __version__
from peftcli.checkpoint.atomic import atomic_output
from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.reader import Checkpoint, open_checkpoint
from peftcli.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, SafetensorsStreamWriter, TensorSpec
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Replacement
from peftcli.merging.options import MergeOptions, from_keywords
from peftcli.merging.provenance import Hasher
from peftcli.merging.report import MergeReport, output_size as _size
from peftcli.merging.pipeline import Buffers, ReadAhead, WriteBehind
from peftcli.merging.ranged import (
    OUT_BUFFERS, WRITE_LIMIT, Cast, Context, Copy, Task, buffer_bytes, check_cast, check_finite,
    read_buffers, unmergeable_change,
)
from peftcli.merging.sources import Source, open_source, refuse_unmergeable

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise UsageError(f"`weights` has {len(weights)} values for {n} inputs", "give one weight per input, e.g. `weights` 1.0,0.8")
    return list(weights)


def merge(
    base: str,
    inputs: list[str],
    out: str | None,
    opts: MergeOptions | None = None,
    *,
    stream: BinaryIO | None = None,
    progress: Callable[[int, int], None] | None = None,
    hasher: Hasher | None = None,
    **keywords,
) -> MergeReport:
    """Merge ``inputs`` into ``base``; write to ``out`` (file or directory) or to ``stream``.

    ``opts``: the weights, method and its parameters, seed, dtype, shard size, head mode
    (``MergeOptions``); or give them as ``keywords`` (``weights=``, ``method=``, ``density=``,
    ``options=`` the method's other parameters, ...: ``merge.options.from_keywords``).
    ``hasher`` hashes the inputs' weight files for the provenance metadata; one started
    earlier (``Hasher.for_inputs(inputs)``) has them ready sooner. Inputs with classification
    heads give one model each (``heads="each"``), or one model whose heads of one task are
    averaged (``"average"``; see ``merge.heads``).
    """
    if opts is None:
        opts = from_keywords(**keywords)
    elif keywords:
        raise TypeError(f"merge() takes options or keywords, not both: {sorted(keywords)}")
    from peftcli.merging.arithmetic import prepare

    if not inputs:
        raise UsageError("nothing to merge", "give at least one .diff, adapter directory or fine-tuned checkpoint")
    lam = _weights(opts.weights, len(inputs))
    if opts.to_adapter:  # Σ λᵢ ΔWᵢ re-factored into one LoRA: peftcli.conversion, not a checkpoint write
        from peftcli.conversion import merge_to_adapter

        return merge_to_adapter(base, list(inputs), out, opts, lam)  # type: ignore[return-value]  # MergeReport-shaped
    m, cfg = prepare(opts.method, len(inputs), lam, {**opts.params, "density": opts.density})
    if opts.weights is not None and not m.takes_weights:
        raise UsageError(f"{m.name} takes no `weights`", "drop `weights`")
    from peftcli.merging import vocab
    from peftcli.merging.architecture import check_same_architecture

    with _one_thread(), open_checkpoint(base, allow_pickle=opts.allow_pickle) as raw:
        if raw.directory is not None:  # a link out of the model directory: refused before any is read
            from peftcli.checkpoint.writer import checked_model_files

            checked_model_files(raw.directory)
        check_same_architecture(raw.config, base, list(inputs))
        tokens = vocab.plan(raw, list(inputs), opts.tokenizer_source, opts.allow_pickle)  # differing vocabularies
        ckpt = tokens.reindexed(raw) if tokens else raw  # its embedding and head in the output's token order
        m.plan(cfg, list(ckpt.tensors))  # e.g. SLERP's t lists against the base's layers
        hasher = hasher or Hasher.for_inputs(inputs)
        job = _Job(base, list(inputs), out, opts, ckpt, m, cfg, lam, tokens=tokens)
        try:
            job.open_sources(hasher)
            job.plan(stream)
            changed = job.write(stream, progress)
        finally:
            hasher.stop()
            for s in job.sources:
                s.close()
            if tokens:
                tokens.close()
    report_inputs = [{"path": s.path, "kind": s.kind, "weight": w, "tensors": len(s.deltas)} for s, w in zip(job.sources, job.lam)]
    tasks = _report_tasks(out, job.layout)
    return MergeReport(out or "-", opts.method, report_inputs, len(job.specs), changed, _size(out), job.metadata, tasks)


@dataclass
class _Job:
    """One merge once its options are checked: the open base and inputs, and the output's plan."""

    base: str
    inputs: list[str]
    out: str | None
    opts: MergeOptions
    ckpt: Checkpoint
    m: Any  # the MergeMethod
    cfg: Any  # its options instance
    lam: list[float]
    sources: list[Source] = field(default_factory=list)
    layout: Any = None  # merge.heads' layout; None: no input carries a task head
    out_dtype: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str | None] = field(default_factory=dict)  # output name -> base tensor (None: a head tensor)
    specs: list[TensorSpec] = field(default_factory=list)
    body_specs: list[TensorSpec] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    tokens: Any = None  # merging.vocab's VocabPlan where the inputs' vocabularies differ

    def open_sources(self, hasher: Hasher) -> None:
        ckpt = self.ckpt
        for path in self.inputs:
            self.sources.append(open_source(path, ckpt, self.opts.allow_pickle, hasher.sha256, self.tokens and self.tokens.reindexed))
        for s in self.sources:
            unknown = sorted(set(s.deltas) - set(ckpt.tensors))
            if unknown:
                raise BadInputError(f"{s.path} changes {unknown[0]!r}, which the base does not have", "merge into the base it was made for")
            refuse_unmergeable(s, ckpt)
        _check_ties(self.base, ckpt, self.sources)

    def plan(self, stream: BinaryIO | None) -> None:
        """The output's tensors (names, dtypes, shapes), where each comes from, and its metadata."""
        from peftcli.merging import heads

        ckpt, dtype = self.ckpt, self.opts.dtype
        self.out_dtype = {t.name: (dtype if dtype and t.dtype in FLOAT_DTYPES else t.dtype) for t in ckpt.tensors.values()}
        layout = self.layout = heads.plan_heads(ckpt, self.sources, self.opts.heads)
        if layout is not None and (stream is not None or self.out.endswith(".safetensors")):
            raise UsageError("a merged model with a task head is a model directory", "pass -o DIR")
        if self.tokens and self.tokens.files and (stream is not None or self.out.endswith(".safetensors")):
            raise UsageError(f"with `tokenizer_source` {self.tokens.source}, the merged model's tokenizer is not the base's: it is a model directory", "pass -o DIR")
        self.origin = {t.name: t.name for t in ckpt.tensors.values()}
        if layout is not None:
            self.origin = {layout.model.rename[n]: n for n in ckpt.tensors if layout.model.rename[n]}
        self.specs = [TensorSpec(o, self.out_dtype[n], ckpt.tensors[n].shape) for o, n in self.origin.items()]
        self.body_specs = list(self.specs)
        if layout is not None:
            self.specs += heads.head_specs(layout.tasks[0], dtype)
            self.origin.update({s.name: None for s in self.specs[len(self.body_specs) :]})
        self.metadata = {"format": "pt", "peftcli.merge": self._provenance()}

    def _provenance(self) -> str:
        o = self.opts
        return json.dumps(
            {
                "version": __version__, "method": o.method, "weights": self.lam, "density": o.density, "seed": o.seed,
                **_extra(self.cfg), "base": os.path.abspath(self.base),
                **({"tokenizer_source": self.tokens.source, "vocab_size": self.tokens.rows} if self.tokens else {}),
                "inputs": [{"path": os.path.abspath(s.path), "kind": s.kind, "sha256": s.hashes} for s in self.sources],
            },
            sort_keys=True, separators=(",", ":"),
        )

    def produce(self, out_name: str):
        """A whole tensor at once, and whether it changed: what ranged.py has no task for."""
        name, ckpt, sources, lam = self.origin[out_name], self.ckpt, self.sources, self.lam
        if name is None:  # the first task's head: as its input holds it (several: their mean)
            value = self.layout.tasks[0].value(out_name, lam, self.opts.dtype)
            check_finite(out_name, value)
            return value, True
        info, out_dtype = ckpt.tensors[name], self.out_dtype[name]
        touched = [(i, s) for i, s in enumerate(sources) if name in s.deltas]
        if not touched:
            _check_fixed(name, ckpt, sources)
            if out_dtype == info.dtype and info.begin is not None:  # pickle and GGUF tensors have no byte range
                return ckpt.read_bytes(name), False
        stored = ckpt.get(name)
        if not touched:
            result = stored.to(torch_dtype(out_dtype)).contiguous()
            if result.dtype != stored.dtype:
                check_cast(name, stored, result)
            return result, False
        if self.m.weighted_sum and len(touched) == 1 and lam[touched[0][0]] == 1.0 and isinstance(touched[0][1].deltas[name], Replacement):
            # One input whose change is new values (a saved module, new token rows), taken
            # whole: written as they are, as PEFT's merge_and_unload writes them.
            result = touched[0][1].deltas[name].values(stored)
        else:
            deltas = [s.deltas.get(name) for s in sources]
            work = work_dtype(stored.dtype)  # holds the base's values exactly
            result = self.m.whole(stored, deltas, lam, self.cfg, seed=self.opts.seed, key=name, work=work)
        result = result.to(torch_dtype(out_dtype)).contiguous()
        check_finite(name, result)  # after the cast: beyond F16's range is Inf only there
        return result, True

    def task_for(self, out_name: str) -> Task:
        name, ckpt, sources = self.origin[out_name], self.ckpt, self.sources
        info = ckpt.tensors[name] if name is not None else None
        if info is None or info.begin is None or info.numel == 0:  # pickle, GGUF: produced whole
            return _Whole(out_name, self.produce)
        touched = [i for i, s in enumerate(sources) if name in s.deltas]
        if not touched:
            fixed = [(s.path, s.fixed[name]) for s in sources if name in s.fixed]
            if any(f.begin is None for _, f in fixed):  # a pickled input: compared whole
                return _Whole(out_name, self.produce)
            if self.out_dtype[name] == info.dtype:
                return Copy(out_name, info, fixed)
            return Cast(out_name, info, self.out_dtype[name])
        if info.dtype not in FLOAT_DTYPES or any(name not in sources[i].streams for i in touched):
            return _Whole(out_name, self.produce)
        streams = [(i, self.lam[i], sources[i].streams[name]) for i in touched]
        return self.m.task(out_name, info, self.out_dtype[name], streams, self.cfg, seed=self.opts.seed, key=name, n_inputs=len(sources))

    def write(self, stream: BinaryIO | None, progress) -> int:
        """Run every tensor's task into the output; the number of tensors changed."""
        changed, total = 0, len(self.specs)
        with contextlib.ExitStack() as stack:
            writer, order = self._writer(stack, stream)
            tasks = [self.task_for(spec.name) for spec in order]
            nbytes = buffer_bytes([t.dtype for t in self.ckpt.tensors.values()] + list(self.out_dtype.values()))
            requests = (r for t in tasks for r in t.requests())
            with (
                ReadAhead(requests, read_buffers(len(self.sources)), nbytes) as reads,
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
        return changed

    def _writer(self, stack: contextlib.ExitStack, stream: BinaryIO | None):
        """The output's writer (entered on ``stack``) and the order it takes the tensors in."""
        if stream is not None:
            return SafetensorsStreamWriter(stream, self.specs, self.metadata), self.specs
        o, ckpt, layout, out = self.opts, self.ckpt, self.layout, self.out
        target, multi = out, layout is not None and layout.multi
        if multi:  # out/ holds a head model per task, and appears whole or not at all
            outer = stack.enter_context(atomic_output(out, directory=True, inputs=[self.base, *self.inputs], force=o.force))
            target = os.path.join(outer, layout.tasks[0].name)
            stack.push(self._siblings(target, outer))
        plan = _shard_plan(ckpt, out, self.body_specs, self.specs, layout, o.max_shard_size)
        source_dir, extra = ckpt.directory, _config_files(ckpt, layout, o.dtype)
        if self.tokens:  # the output tokenizer's files and vocab_size
            source_dir, extra = self.tokens.source_dir, self.tokens.extra_files(extra)
        writer = stack.enter_context(
            CheckpointWriter(
                target, self.specs, metadata=self.metadata, max_shard_size=o.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                source_dir=source_dir, inputs=[] if multi else [self.base, *self.inputs], force=o.force and not multi,
                shard_plan=plan, extra_files=extra, tied_heads=True,
            )
        )
        return writer, writer.specs

    def _siblings(self, target: str, outer: str):
        """The exit callback writing the other tasks' directories once the first one is complete."""
        from peftcli.merging import heads

        layout, dtype, ckpt = self.layout, self.opts.dtype, self.ckpt

        def siblings(exc_type, *_):
            for task in layout.tasks[1:] if exc_type is None else []:
                heads.write_sibling(
                    target, os.path.join(outer, task.name), task, self.lam, dtype, self.metadata,
                    heads.config_json(ckpt, task.head, dtype), ckpt.directory, sum(s.nbytes for s in self.body_specs),
                )

        return siblings


def _check_ties(base: str, ckpt, sources: list) -> None:
    """Refuse a merge that would write a tied config over two different heads. A base whose
    config ties lm_head to the input embedding may still store both tensors (equal), and
    transformers ties them on load only while they are equal: a merge changing one of the two
    would write a model transformers unties, silently not the one merged. This up-front check
    names the adapter or diff that changes one side only; full checkpoints change every float
    tensor (both are in ``deltas``), and for them, as for every merge, the writer compares the
    two tensors as written (``CheckpointWriter(tied_heads=True)``, ``checkpoint.tied_heads``)."""
    from peftcli.preflight import input_embedding

    head = "lm_head.weight"
    embedding = input_embedding(ckpt) if head in ckpt.tensors else None
    if embedding is None or (ckpt.config or {}).get("tie_word_embeddings") is not True:
        return
    changed = [n for n in (embedding, head) if any(n in s.deltas for s in sources)]
    if len(changed) == 1:
        other = head if changed[0] == embedding else embedding
        raise BadInputError(
            f"{base}: config.json ties lm_head to {embedding} and the checkpoint stores both, but the merge changes "
            f"{changed[0]} and not {other}: the merged config would tie two different heads",
            f"drop {head} from the base (it is {embedding}) or set tie_word_embeddings false in its config.json, then merge again",
        )


def _extra(cfg) -> dict:
    """The provenance of a method's parameters beyond density (recorded already, for every method)."""
    from peftcli.options import option_fields

    return {f.name: getattr(cfg, f.name) for f in option_fields(type(cfg)) if f.name != "density"}


def _report_tasks(out: str | None, layout) -> list[dict]:
    """The head models written: one per task (in ``out/<task>/`` when there are several)."""
    if layout is None:
        return []
    return [
        {
            "name": t.name, "path": os.path.join(out, t.name) if layout.multi else out, "architecture": t.head.architecture,
            "labels": t.head.labels, "inputs": [i for i, _ in t.members],
        }
        for t in layout.tasks
    ]


def _shard_plan(ckpt, out: str, body_specs: list, specs: list, layout, max_shard_size) -> list[list[str]] | None:
    """Tensor names per shard: the base's layout where it has several files (and no head);
    with several tasks, the body's shards then the head in a last shard of its own, so that
    every task directory holds the same body files."""
    from peftcli.checkpoint.writer import parse_size, plan_shards

    if layout is not None and layout.multi:
        size = parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        body = [[s.name for s in shard] for shard in plan_shards(body_specs, size)]
        return body + [[s.name for s in specs[len(body_specs) :]]]
    if max_shard_size is None and not out.endswith(".safetensors") and len(ckpt.files) > 1 and layout is None:
        return [[t.name for t in ckpt.tensors.values() if t.file == f] for f in ckpt.files]  # the base's layout
    return None


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
    """config.json when the merge changes what it says: a head model (the first task's), or another dtype."""
    from peftcli.merging.heads import config_json, with_dtype

    if layout is not None:
        return {"config.json": config_json(ckpt, layout.tasks[0].head, dtype)}
    rebuilt = ckpt.storage == "gguf"  # no config.json beside it to copy: write the one rebuilt from its metadata
    if (dtype is None and not rebuilt) or ckpt.config is None:
        return None
    config = with_dtype(dict(ckpt.config), dtype)
    return {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
