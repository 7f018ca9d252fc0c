"""Streaming, sharded, atomic safetensors writing.

The header is computed from the (name, dtype, shape) list before any tensor exists, so
tensors are produced and written one at a time (or each in parts, ``write_partial``) and the
whole state dict is never in memory. The same ``SafetensorsStreamWriter`` writes to a file or
to a pipe.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterable, Mapping

from peftcli.checkpoint.atomic import atomic_output, open_new_file
from peftcli.checkpoint.reader import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from peftcli.checkpoint.safetensors_format import DTYPES, expected_nbytes
from peftcli.checkpoint.tied_heads import TiedHeads, output_config
from peftcli.errors import BadInputError, ResourceError, UsageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
SINGLE_FILE_SUFFIXES = (".safetensors", ".diff")  # "5GB", as transformers' save_pretrained

# Files copied from a source model directory so the output is a complete, loadable model.
_COPY_PATTERNS = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|"
    r"merges\.txt|spiece\.model|sentencepiece.*\.model|.*\.tiktoken|chat_template\.(jinja|json)|preprocessor_config\.json|"
    r"processor_config\.json)$"
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))  # lists from callers compare equal

    @property
    def nbytes(self) -> int:
        return expected_nbytes(self.dtype, self.shape)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500·2^20, '1000' -> 1000 bytes."""
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"invalid size {text}", "the size must be positive")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B?)\s*", text, flags=re.IGNORECASE | re.ASCII)  # "١٢GB" is no size
    if not m:
        raise UsageError(f"invalid size {text!r}", "use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    number, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(number * base**power)
    if size <= 0:
        raise UsageError(f"invalid size {text!r}", "the size must be positive")
    return size


_ORDER_HINT = "write the tensors in the order of the specs given to the writer"


def build_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8 bytes (as the reference writer)."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise UsageError(f"safetensors metadata must map strings to strings; {bad[0]!r} does not", "encode the value as a string, e.g. with json.dumps")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {spec.dtype!r} for tensor {spec.name!r}", "use a safetensors dtype name: " + ", ".join(DTYPES))
        if spec.name in header:
            raise UsageError(f"tensor {spec.name!r} is listed twice", "give each tensor name one TensorSpec")
        size = spec.nbytes
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)  # the data buffer starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """A tensor's little-endian bytes without a copy when it is already contiguous on CPU."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsStreamWriter:
    """Writes one safetensors file to ``out`` given its tensor list up front.

    Tensors must then be written in the listed order; each is checked against its spec.
    """

    def __init__(self, out: BinaryIO, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None, *, atomic: bool = False):
        self._out = out
        self._specs = list(specs)
        self._next = 0
        self._partial = 0  # bytes of the pending tensor already written by write_partial
        # ``atomic``: ``out`` is a temporary that vanishes on failure (CheckpointWriter). Any
        # other stream (stdout) keeps what it got, so a failure must say it is incomplete.
        self._atomic = atomic
        self.observe = None  # called with (name, bytes) for each tensor's bytes: CheckpointWriter's tied-heads digests
        self._send(build_header(self._specs, metadata))

    def _send(self, data) -> None:
        try:
            self._out.write(data)
        except OSError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: OSError) -> OSError | ResourceError:
        if self._atomic or isinstance(exc, BrokenPipeError):
            return exc  # a temporary is removed with its own error; a closed pipe is the reader's choice
        name = getattr(self._out, "name", None)
        where = "stdout" if name in (1, "<stdout>") else (name if isinstance(name, str) else "the output stream")
        reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        return ResourceError(
            f"writing the checkpoint to {where} failed ({reason}): the output is incomplete",
            "what was written is not a valid checkpoint: delete it, free space or fix the destination, and rerun",
        )

    @property
    def pending(self) -> TensorSpec | None:
        return self._specs[self._next] if self._next < len(self._specs) else None

    def write_partial(self, name: str, data: "torch.Tensor | bytes | memoryview") -> bool:
        """Append the next part of tensor ``name``'s bytes; True once all of them are written.

        A tensor part must be of the promised dtype (any shape: parts are flat runs of bytes).
        """
        spec = self.pending
        if spec is None or spec.name != name:
            raise UsageError(f"tensor {name!r} written out of order, expected {spec.name if spec else 'nothing'!r}", _ORDER_HINT)
        if isinstance(data, (bytes, bytearray, memoryview)):
            buf = memoryview(data)
        else:
            from peftcli.checkpoint.dtypes import safetensors_dtype

            if safetensors_dtype(data.dtype) != spec.dtype:
                raise UsageError(
                    f"a part of tensor {name!r} is {safetensors_dtype(data.dtype)}, but the header promised {spec.dtype}",
                    f"convert the part to {spec.dtype} first, or pass its raw bytes",
                )
            buf = tensor_bytes(data)
        if self._partial + buf.nbytes > spec.nbytes:
            raise UsageError(
                f"tensor {name!r} got {self._partial + buf.nbytes} bytes, more than its {spec.nbytes}",
                f"its parts must add up to exactly {spec.nbytes} bytes",
            )
        if self.observe is not None:
            self.observe(name, buf)
        self._send(buf)
        self._partial += buf.nbytes
        if self._partial < spec.nbytes:
            return False
        self._next += 1
        self._partial = 0
        return True

    def write(self, name: str, data: "torch.Tensor | bytes | memoryview") -> None:
        spec = self.pending
        if spec is None or spec.name != name:
            raise UsageError(f"tensor {name!r} written out of order, expected {spec.name if spec else 'nothing'!r}", _ORDER_HINT)
        if self._partial:
            raise UsageError(
                f"tensor {name!r} is half written in parts; finish it with write_partial",
                f"send its remaining {spec.nbytes - self._partial} bytes with write_partial, not write",
            )
        if isinstance(data, (bytes, bytearray, memoryview)):
            buf = memoryview(data)
        else:
            from peftcli.checkpoint.dtypes import safetensors_dtype

            if safetensors_dtype(data.dtype) != spec.dtype or tuple(data.shape) != spec.shape:
                raise UsageError(
                    f"tensor {name!r} is {safetensors_dtype(data.dtype)}{list(data.shape)}, "
                    f"but the header promised {spec.dtype}{list(spec.shape)}",
                    "pass a tensor of the spec's dtype and shape, or fix the TensorSpec",
                )
            buf = tensor_bytes(data)
        if buf.nbytes != spec.nbytes:
            raise UsageError(f"tensor {name!r} has {buf.nbytes} bytes, expected {spec.nbytes}", "pass exactly the bytes of the spec's dtype and shape")
        if self.observe is not None:
            self.observe(name, buf)
        self._send(buf)
        self._next += 1

    def finish(self) -> None:
        if self.pending is not None:  # including a tensor only partly written
            raise UsageError(f"file closed before tensor {self.pending.name!r} was written", "write every tensor of the header before finish()")
        try:
            self._out.flush()
        except OSError as exc:
            raise self._failed(exc) from exc


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return SAFETENSORS_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def copy_model_files(source_dir: str, dest_dir: str) -> list[str]:
    """Copy config, tokenizer and generation files (never weights) from ``source_dir``.

    Only regular files are copied, and only files of the model: an entry that is a symlink
    is followed only when its real target is a regular file inside the source directory or,
    for a Hugging Face cache snapshot (``.../models--ORG--NAME/snapshots/REV/``, whose files
    link to ``../../blobs/HASH``), inside that cached repository ``.../models--ORG--NAME/``.
    A link to anything else (``tokenizer_extra.json -> /etc/shadow``) is refused, naming it:
    copying it would publish a file that is not part of the model.
    """
    copied = []
    for name, real in checked_model_files(source_dir):
        if os.path.isfile(real):  # directories, FIFOs, devices and dangling links are not model files
            _copy_regular(real, os.path.join(dest_dir, name))
            copied.append(name)
    return copied


def checked_model_files(source_dir: str) -> list[tuple[str, str]]:
    """(name, real path) of the model files ``copy_model_files`` would copy, after refusing a
    link out of the model directory (the rule above); a merge calls it before reading any of
    them, so that the refusal is this one whichever reader comes first."""
    files = []
    root = _link_root(source_dir)
    for name in sorted(os.listdir(source_dir)):
        if not _COPY_PATTERNS.match(name):
            continue
        src = os.path.join(source_dir, name)
        real = os.path.realpath(src)
        if os.path.islink(src) and not _inside(real, root):
            raise BadInputError(
                f"{src} is a symlink to {real}, outside the model directory",
                "replace the link with the file itself (cp -L) if it belongs to the model, or remove it",
            )
        files.append((name, real))
    return files


def _link_root(source_dir: str) -> str:
    """Where a source directory's symlinks may point: itself, or its HF cache repository."""
    real = os.path.realpath(source_dir)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(("models--", "datasets--")):
        return repo
    return real


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip(os.sep) + os.sep)


def _copy_regular(src: str, dest: str) -> None:
    """Copy the regular file ``src`` (fully resolved) to a new file ``dest``, following no link."""
    # O_NOFOLLOW|O_NONBLOCK and the fstat: what was checked is what is read, even if the
    # entry is swapped for a link or a FIFO in between.
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInputError(f"{src} is not a regular file", "replace it with the file itself")
        if os.path.lexists(dest):  # e.g. a training run's previous copy: replaced, never written through
            os.unlink(dest)
        with open_new_file(dest) as out:
            shutil.copyfileobj(f, out)


WRITEBACK_CHUNK = 32 * 2**20  # bytes between two writeback starts
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range: object = None  # resolved on first use: the libc function, or False where there is none


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None elsewhere."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError, ImportError):
                pass
    return _sync_file_range or None


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``fd``'s bytes [offset, offset+nbytes) to disk now,
    without waiting: the final fsync then finds little left to do. False where it cannot (not
    Linux, a file system that refuses it); that costs time only, never durability, which the
    fsync before the rename alone provides."""
    fn = _load_sync_file_range()
    if fn is None:
        return False
    return fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


class _WritebackFile:
    """A file being written that starts the kernel's writeback every ``WRITEBACK_CHUNK``
    bytes, so that writing to disk overlaps the work that produces the bytes."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.name = getattr(file, "name", None)
        self._written = 0  # bytes handed to write()
        self._started = 0  # bytes whose writeback was started
        self._enabled = True

    def write(self, data) -> int:
        n = self._file.write(data)
        self._written += memoryview(data).nbytes
        if self._enabled and self._written - self._started >= WRITEBACK_CHUNK:
            self._file.flush()  # the buffered tail too: what is started must be in the page cache
            self._enabled = start_writeback(self._file.fileno(), self._started, self._written - self._started)
            self._started = self._written
        return n

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


class CheckpointWriter:
    """Writes a checkpoint to ``target``: a ``.safetensors``/``.diff`` file, or a model directory.

    Usage::

        with CheckpointWriter("out/", specs, source_dir="base/", inputs=["base/"]) as w:
            for spec in specs:
                w.write(spec.name, make_tensor(spec.name))

    A directory gets ``model.safetensors`` or shards plus ``model.safetensors.index.json``,
    and the source directory's config and tokenizer files. Everything appears at ``target``
    only when the ``with`` block completes; an exception leaves no trace.
    """

    def __init__(
        self,
        target: str,
        specs: Iterable[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        source_dir: str | None = None,
        inputs: Iterable[str] = (),
        force: bool = False,
        single_file: bool | None = None,
        shard_plan: list[list[str]] | None = None,
        extra_files: Mapping[str, bytes] | None = None,
        tied_heads: bool = False,
    ):
        self.target = target = os.path.normpath(target)
        self.specs = list(specs)
        # transformers refuses safetensors files whose metadata lacks format=pt.
        self.metadata = {"format": "pt", **(metadata or {})}
        # A ".safetensors" or ".diff" target is one file; anything else is a model directory.
        self.single_file = target.endswith(SINGLE_FILE_SUFFIXES) if single_file is None else single_file
        if self.single_file:
            self.shards = [self.specs]
        elif shard_plan is not None:  # e.g. the base's own layout: tensor names per shard, in order
            by_name = {s.name: s for s in self.specs}
            self.shards = [[by_name[n] for n in names] for names in shard_plan if names]
            self.specs = [s for shard in self.shards for s in shard]
        else:
            self.shards = plan_shards(self.specs, parse_size(max_shard_size))
        self.source_dir = source_dir
        self.extra_files = dict(extra_files or {})  # written after the copied files, e.g. a changed config.json
        self.inputs = list(inputs)
        self.force = force
        self._shard_of = {s.name: i for i, shard in enumerate(self.shards) for s in shard}
        if len(self._shard_of) != len(self.specs):
            raise UsageError("a tensor name is listed twice", "give each tensor name one TensorSpec")
        # ``tied_heads`` (the merges): a directory whose config ties lm_head to the embedding must
        # store the two equal, or transformers loads another model (checkpoint.tied_heads).
        watch = tied_heads and not self.single_file
        self._tied = TiedHeads.watch(output_config(source_dir, self.extra_files), self.specs) if watch else None
        self._ctx = None
        self._tmp = ""
        self._file = None
        self._writer: SafetensorsStreamWriter | None = None
        self._current = -1
        self._written = 0

    def __enter__(self) -> "CheckpointWriter":
        self._ctx = atomic_output(self.target, directory=not self.single_file, inputs=self.inputs, force=self.force)
        self._tmp = self._ctx.__enter__()
        return self

    def _path_of_shard(self, i: int) -> str:
        return self._tmp if self.single_file else os.path.join(self._tmp, shard_name(i, len(self.shards)))

    def _open_shard(self, i: int) -> None:
        self._close_shard()
        self._file = _WritebackFile(open_new_file(self._path_of_shard(i)))
        self._writer = SafetensorsStreamWriter(self._file, self.shards[i], self.metadata, atomic=True)
        if self._tied is not None:
            self._writer.observe = self._tied.update
        self._current = i

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.finish()
            self._file.flush()
            os.fsync(self._file.fileno())  # durability: the writeback started along the way only saves time
            self._file.close()
            self._writer = self._file = None

    def write(self, name: str, data: "torch.Tensor | bytes | memoryview") -> None:
        """Write the next tensor; tensors come in the order of ``specs``."""
        self._shard_for(name)
        self._writer.write(name, data)
        self._written += 1

    def write_partial(self, name: str, data: "torch.Tensor | bytes | memoryview") -> bool:
        """Append the next part of tensor ``name``'s bytes (a tensor streamed in parts); True once complete."""
        self._shard_for(name)
        done = self._writer.write_partial(name, data)
        self._written += done
        return done

    def _shard_for(self, name: str) -> None:
        if self._written >= len(self.specs) or self.specs[self._written].name != name:
            expected = self.specs[self._written].name if self._written < len(self.specs) else "nothing more"
            raise UsageError(f"tensor {name!r} written out of order, expected {expected!r}", _ORDER_HINT)
        i = self._shard_of[name]
        if i != self._current:
            self._open_shard(i)

    def _finish(self) -> None:
        if not self.specs:
            self._open_shard(0)  # a checkpoint without tensors is still a valid file
        elif self._written != len(self.specs):
            raise UsageError(
                f"checkpoint closed before tensor {self.specs[self._written].name!r} was written",
                "write every tensor of the specs before leaving the with block",
            )
        self._close_shard()
        if self.single_file:
            return
        if self._tied is not None:  # before anything is renamed into place: nothing appears
            self._tied.check()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                "weight_map": {s.name: shard_name(i, len(self.shards)) for i, sh in enumerate(self.shards) for s in sh},
            }
            with open_new_file(os.path.join(self._tmp, SAFETENSORS_INDEX)) as f:
                f.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        if self.source_dir:
            copy_model_files(self.source_dir, self._tmp)
        for name, data in self.extra_files.items():
            path = os.path.join(self._tmp, name)
            if os.path.exists(path):
                os.unlink(path)
            with open_new_file(path) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._writer = self._file = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as inner:
                self._abort()
                self._ctx.__exit__(type(inner), inner, inner.__traceback__)
                raise
            return bool(self._ctx.__exit__(None, None, None))
        self._abort()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def save_state_dict(
    state_dict: Mapping[str, "torch.Tensor"], target: str, **kwargs
) -> None:
    """Write an in-memory state dict through the streaming writer (tests, small outputs)."""
    from peftcli.checkpoint.dtypes import safetensors_dtype

    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in state_dict.items()]
    with CheckpointWriter(target, specs, **kwargs) as w:
        for name, tensor in state_dict.items():
            w.write(name, tensor)
