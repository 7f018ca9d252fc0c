"""``peftcli merge``'s torch-free path for task arithmetic between full safetensors checkpoints.

Importing torch takes seconds, more than merging a small model does. This path takes a narrow,
declared set of merges and does them with numpy (``fast_kernel``), writing the bytes, config
files and provenance metadata the torch path (``engine.py`` with ``ranged.Linear``) writes:

- ``--method linear``, no ``--dtype``, ``--to-adapter`` or ``--tokenizer-source``, ``-o`` given;
- a base that is one safetensors file or a safetensors model directory (sharded or not) whose
  tensors are all F32, F16 or BF16, and inputs that are full checkpoints of it: safetensors,
  with exactly its tensor names, dtypes and shapes (no .diff, adapter, pickle or GGUF input);
- a CPU whose torch adds ``alpha·φ`` with a fused multiply-add (x86-64 with AVX2 and FMA, or
  aarch64), unless ``ATEN_CPU_CAPABILITY`` forces torch's generic kernels.

``plan`` decides from the headers alone, before torch is imported; anything else (or anything
it cannot open: the torch path then says what is wrong) returns None and goes the torch way,
unchanged. Output writes go through the same ``CheckpointWriter`` (atomic; never over an input).
"""

from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from peftcli import __version__
from peftcli.checkpoint.reader import Checkpoint, open_checkpoint
from peftcli.merging.report import MergeReport, output_size
from peftcli.errors import BadInputError, PeftcliError
from peftcli.merging.fast_kernel import FAST_DTYPES, LinearKernel

RANGE = 1 << 18  # elements per range, as ranged.RANGE: a range's working set stays in cache
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # writer.DEFAULT_MAX_SHARD_SIZE


def fused_add_cpu() -> bool:
    """Whether torch's ``add_(x, alpha=λ)`` rounds once here (the fused multiply-add fast_kernel computes)."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default":
        return False
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def plan(base: str, inputs: list[str], out: str | None, opts) -> "FastMerge | None":
    """The fast merge of ``inputs`` into ``base``, or None where the torch path must do it."""
    if opts.method != "linear" or opts.dtype or opts.to_adapter or opts.tokenizer_source or out is None or not inputs:
        return None
    if any(p.endswith(".diff") or os.path.isfile(os.path.join(p, "adapter_config.json")) for p in [base, *inputs]):
        return None
    lam = list(opts.weights) if opts.weights is not None else [1.0] * len(inputs)
    if len(lam) != len(inputs) or not fused_add_cpu():
        return None
    opened: list[Checkpoint] = []
    try:
        from peftcli.merging.methods import get_merge_method

        m = get_merge_method("linear")
        cfg = m.configure({**opts.params, "density": opts.density})
        m.validate(cfg, lam, len(inputs))
        for path in [base, *inputs]:
            opened.append(open_checkpoint(path))
        if not _eligible(opened):
            raise _NotFast
        if opened[0].directory is not None:  # as engine.merge, in its order: links out, then vocabularies
            from peftcli.checkpoint.writer import checked_model_files

            checked_model_files(opened[0].directory)
        from peftcli.merging import vocab
        from peftcli.merging.architecture import check_same_architecture

        check_same_architecture(opened[0].config, base, list(inputs))
        vocab.plan(opened[0], list(inputs), None, False)
    except (PeftcliError, _NotFast):
        for c in opened:
            c.close()
        return None
    return FastMerge(base, list(inputs), out, opts, cfg, lam, opened[0], opened[1:])


class _NotFast(Exception):
    pass


def _eligible(ckpts: list[Checkpoint]) -> bool:
    base = ckpts[0]
    if not base.storage.startswith("safetensors") or any(t.dtype not in FAST_DTYPES or t.begin is None for t in base.tensors.values()):
        return False
    table = {n: (t.dtype, tuple(t.shape)) for n, t in base.tensors.items()}
    for c in ckpts[1:]:
        if not c.storage.startswith("safetensors") or {n: (t.dtype, tuple(t.shape)) for n, t in c.tensors.items()} != table:
            return False
        if any(t.begin is None for t in c.tensors.values()):
            return False
    return True


@dataclass
class FastMerge:
    """One eligible merge: the open base and inputs; ``run`` writes it."""

    base: str
    inputs: list[str]
    out: str
    opts: Any  # MergeOptions
    cfg: Any  # the linear method's config
    lam: list[float]
    ckpt: Checkpoint
    fts: list[Checkpoint]

    def close(self) -> None:
        for c in [self.ckpt, *self.fts]:
            c.close()

    def metadata(self, sha256: Callable[[str], str]) -> dict[str, str]:
        """``_Job._provenance``'s JSON, key for key."""
        from peftcli.options import option_fields

        o = self.opts
        extra = {f.name: getattr(self.cfg, f.name) for f in option_fields(type(self.cfg)) if f.name != "density"}
        inputs = [
            {"path": os.path.abspath(p), "kind": "checkpoint", "sha256": {os.path.basename(f): sha256(f) for f in c.files}}
            for p, c in zip(self.inputs, self.fts)
        ]
        text = json.dumps(
            {
                "version": __version__, "method": o.method, "weights": self.lam, "density": o.density, "seed": o.seed,
                **extra, "base": os.path.abspath(self.base), "inputs": inputs,
            },
            sort_keys=True, separators=(",", ":"),
        )
        return {"format": "pt", "peftcli.merge": text}

    def run(self, sha256: Callable[[str], str], progress: Callable[[int, int], None] | None = None) -> MergeReport:
        from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec

        ckpt, o = self.ckpt, self.opts
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in ckpt.tensors.values()]
        # The header comes first but needs every input's sha256 (hashed on a thread since the CLI
        # started): write it with placeholders of the same length, merge meanwhile, then patch it.
        final = None if specs else self.metadata(sha256)
        metadata = final or self.metadata(lambda f: "0" * 64)
        plan = None  # engine._shard_plan without heads: the base's layout unless re-sharded or one file
        if o.max_shard_size is None and not self.out.endswith(".safetensors") and len(ckpt.files) > 1:
            plan = [[t.name for t in ckpt.tensors.values() if t.file == f] for f in ckpt.files]
        kernel = LinearKernel(RANGE, self.lam)
        with CheckpointWriter(
            self.out, specs, metadata=metadata, max_shard_size=o.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
            source_dir=ckpt.directory, inputs=[self.base, *self.inputs], force=o.force, shard_plan=plan, tied_heads=True,
        ) as writer, _Files() as files, ThreadPoolExecutor(1, thread_name_prefix="peftcli-read") as reader:
            # The next range is read on a thread while this one is computed and written (the
            # reads release the GIL, and so do numpy's loops).
            ranges = self._ranges([s.name for s in writer.specs])
            job = next(ranges, None)
            pending = reader.submit(files.read_all, job, 0) if job else None
            done, parity = 0, 0
            while job is not None:
                name, dtype, last = job[0], job[1], job[4]
                assert pending is not None  # a job was submitted for every range
                raws = pending.result()
                job, parity = next(ranges, None), 1 - parity
                pending = reader.submit(files.read_all, job, parity) if job else None
                if not raws:  # an empty tensor
                    writer.write(name, b"")
                else:
                    writer.write_partial(name, kernel.run(name, dtype, raws[0], raws[1:]))
                if last:
                    done += 1
                    if progress:
                        progress(done, len(specs))
            if final is None:
                final = self.metadata(sha256)
                _patch_headers(writer, metadata, final)
        report_inputs = [{"path": p, "kind": "checkpoint", "weight": w, "tensors": len(ckpt.tensors)} for p, w in zip(self.inputs, self.lam)]
        assert final is not None
        return MergeReport(self.out, o.method, report_inputs, len(specs), len(specs), output_size(self.out), final)

    def _ranges(self, names: list[str]):
        """(name, dtype, [(file, offset) base first], bytes, whether last) per range of each tensor, in write order."""
        for name in names:
            info = self.ckpt.tensors[name]
            infos = [info, *(c.tensors[name] for c in self.fts)]
            if info.numel == 0:
                yield name, info.dtype, [], 0, True
                continue
            size = 4 if info.dtype == "F32" else 2
            for start in range(0, info.numel, RANGE):
                stop = min(info.numel, start + RANGE)
                yield name, info.dtype, [(t.file, int(t.begin) + start * size) for t in infos], (stop - start) * size, stop == info.numel  # type: ignore[arg-type]  # _eligible: every begin is set


def _patch_headers(writer, placeholder: dict[str, str], final: dict[str, str]) -> None:
    """Rewrite each shard's header (still in the writer's temporary) with the real hashes: same length, same offsets."""
    from peftcli.checkpoint.writer import build_header

    for i, shard in enumerate(writer.shards):
        old, new = build_header(shard, {"format": "pt", **placeholder}), build_header(shard, {"format": "pt", **final})
        if len(old) != len(new):  # a sha256 is 64 hex digits: cannot happen
            raise RuntimeError("the provenance header changed length")
        if writer._file is not None and i == writer._current:  # the open shard: fsynced as the writer closes it
            writer._file.flush()
            os.pwrite(writer._file.fileno(), new, 0)
            continue
        fd = os.open(writer._path_of_shard(i), os.O_WRONLY)
        try:
            os.pwrite(fd, new, 0)
            os.fsync(fd)
        finally:
            os.close(fd)


class _Files:
    """Open input files and one read buffer per checkpoint (base first)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._bufs: dict[object, np.ndarray] = {}

    def read_all(self, job, parity: int) -> list[np.ndarray]:
        """The bytes of one range of ``_ranges`` in every checkpoint, into buffers of ``parity`` (0 or 1)."""
        _, _, where, n, _ = job
        return [self.read(path, offset, n, (i, parity)) for i, (path, offset) in enumerate(where)]

    def read(self, path: str, offset: int, n: int, slot) -> np.ndarray:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        buf = self._bufs.get(slot)
        if buf is None:
            buf = self._bufs[slot] = np.empty(RANGE * 4 + 64, np.uint8)
        view, got = buf.data[:n], 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k == 0:
                raise BadInputError(f"{path} ends inside a tensor (at byte {offset + got})", "the file is truncated: copy or download it again")
            got += k
        return buf[:n]

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)


