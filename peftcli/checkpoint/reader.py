"""Lazy, validated access to a checkpoint's tensors.

``open_checkpoint`` accepts one ``.safetensors`` file, a directory with ``model.safetensors``,
a sharded directory with ``model.safetensors.index.json``, an adapter directory
(``adapter_model.safetensors``) and, only with ``allow_pickle=True``, PyTorch ``.bin``/``.pt``
files through ``torch.load(weights_only=True)``, and a llama.cpp ``.gguf`` file under Hugging Face
names (peftcli.checkpoint.gguf_format).

Opening reads headers only (kilobytes, whatever the checkpoint's size). ``get`` reads one
tensor from its file into a buffer of its own, ``read_range`` a byte range of one into a
buffer the caller may reuse (streaming a tensor in parts); nothing else is read until asked for.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, NamedTuple

from peftcli.checkpoint.safetensors_format import DTYPES, gc_paused, read_header
from peftcli.errors import BadInputError, UsageError

if TYPE_CHECKING:  # torch is imported only when tensor bytes are read
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SINGLE = ("pytorch_model.bin", "model.bin", "model.pt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_HINT = "pass `allow_pickle` to load it with torch.load(weights_only=True), or re-save it as safetensors"
# One string, so that the command to copy is one span (an f-string would split it around PATH).
_LIST_TENSORS = "list its tensors with `peftcli inspect {path} --tensors`"


def list_tensors_hint(path: str) -> str:
    """The hint of a missing tensor: the command that lists the tensors ``path`` holds."""
    return _LIST_TENSORS.format(path=path)


class TensorInfo(NamedTuple):
    """Where one tensor lives. ``begin``/``end`` are absolute file offsets (None for pickles).

    Immutable; a named tuple rather than a frozen dataclass because a header may list hundreds
    of thousands of tensors, and a frozen dataclass is several times slower to build.
    """

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    begin: int | None = None
    end: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return (DTYPES[self.dtype][0] * self.numel + 7) // 8


@dataclass
class Checkpoint:
    """A read-only view of a checkpoint's tensors; use as a context manager or call ``close``."""

    path: str  # as the user gave it
    storage: str  # "safetensors" | "safetensors-sharded" | "pickle" | "gguf"
    files: list[str]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    directory: str | None = None  # the model directory, where config.json and tokenizer files live
    _maps: dict[str, object] = field(default_factory=dict, repr=False)  # open weight files, by path
    _loaded: dict[str, "torch.Tensor"] = field(default_factory=dict, repr=False)  # pickle state dicts only

    # -- descriptive ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def bytes_on_disk(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    @property
    def config(self) -> dict | None:
        """``config.json`` beside the weights (the fields peftcli reads type-checked), or None."""
        if self.directory is None:
            return None
        path = os.path.join(self.directory, "config.json")
        if not os.path.isfile(path):
            return None
        from peftcli.checkpoint.model_config import check_model_config

        return check_model_config(load_json(path, "config"), path)

    # -- reading tensors --------------------------------------------------------------
    def get(self, name: str) -> "torch.Tensor":
        """The tensor ``name``, read from its file into memory it owns (writable; the file is untouched)."""
        import torch

        info = self.tensors.get(name)
        if info is None:
            raise BadInputError(f"{self.path}: no tensor named {name!r}", list_tensors_hint(self.path))
        if self.storage == "pickle":
            return self._loaded[name]
        from peftcli.checkpoint.dtypes import torch_dtype

        try:
            dtype = torch_dtype(info.dtype)
        except BadInputError as exc:
            raise BadInputError(f"{info.file}: tensor {name!r}: {exc.message}", exc.hint) from None
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        return self._raw(info).view(dtype).view(info.shape)

    def read_bytes(self, name: str) -> bytes:
        """The raw little-endian bytes of tensor ``name`` (safetensors storage only)."""
        info = self.tensors.get(name)
        if info is None:
            raise BadInputError(f"{self.path}: no tensor named {name!r}", list_tensors_hint(self.path))
        if info.begin is None:
            raise UsageError("raw bytes are only available from safetensors files", "read pickle checkpoints with Checkpoint.get")
        return self._raw(info).numpy().tobytes()

    def read_range(self, name: str, begin: int, end: int, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Bytes ``[begin, end)`` of tensor ``name`` (offsets within the tensor) as a uint8 tensor.

        Read into ``out`` (a uint8 tensor of at least ``end - begin`` bytes, reused by callers that
        stream a tensor in parts) or into a new buffer. Safetensors storage only.
        """
        info = self.tensors.get(name)
        if info is None:
            raise BadInputError(f"{self.path}: no tensor named {name!r}", list_tensors_hint(self.path))
        if info.begin is None:
            raise UsageError("byte ranges are only available from safetensors files", "read pickle checkpoints with Checkpoint.get")
        if not 0 <= begin <= end <= info.end - info.begin:
            raise UsageError(
                f"byte range [{begin}, {end}) is outside tensor {name!r} ({info.end - info.begin} bytes)",
                f"ask for 0 <= begin <= end <= {info.end - info.begin}",
            )
        return read_file_range(self._file(info.file), info.file, info.begin + begin, end - begin, out, info.name)

    def _file(self, path: str):
        f = self._maps.get(path)
        if f is None:
            f = self._maps[path] = open(path, "rb", buffering=0)
        return f

    def _raw(self, info: TensorInfo) -> "torch.Tensor":
        """The tensor's bytes, read into a buffer of its own (aligned, writable, owned).

        Not a memory map: mapped pages stay in the process's RSS until the map is closed, so a
        streaming merge of a 14 GB checkpoint would end up holding 14 GB. A read costs the same
        single pass over the bytes, and the memory goes when the tensor does.
        """
        return read_file_range(self._file(info.file), info.file, info.begin, info.end - info.begin, None, info.name)

    def close(self) -> None:
        for f in self._maps.values():  # tensors already handed out own their bytes
            f.close()
        self._maps.clear()
        self._loaded.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_file_range(f, path: str, offset: int, n: int, out: "torch.Tensor | None" = None, what: str = "") -> "torch.Tensor":
    """``n`` bytes of open file ``f`` from ``offset``, into ``out[:n]`` (uint8) or a new buffer."""
    import torch

    buf = torch.empty(n, dtype=torch.uint8) if out is None else out[:n]
    if out is not None and (out.dtype != torch.uint8 or buf.numel() != n or not buf.is_contiguous()):
        raise UsageError(
            f"the buffer for {n} bytes of {path} is not a contiguous uint8 tensor that large",
            f"pass out=None or a contiguous torch.uint8 tensor of at least {n} elements",
        )
    if n == 0:
        return buf
    view = memoryview(buf.numpy())
    done = 0
    while done < n:
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got <= 0:
            raise BadInputError(
                f"{path}: the file shrank while reading" + (f" tensor {what!r}" if what else ""),
                "something else is writing or truncating it; rerun once the file is complete",
            )
        done += got
    return buf


def load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read {what}: {exc.strerror or exc}", "check that the file is readable") from None
    except ValueError as exc:  # bad UTF-8, bad JSON, an integer of over 4300 digits
        raise BadInputError(f"{path}: cannot read {what}: {exc}", _BROKEN_JSON_HINT) from None
    except RecursionError:
        raise BadInputError(f"{path}: cannot read {what}: JSON nested too deeply", _BROKEN_JSON_HINT) from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: {what} is not a JSON object", "it must hold one {...} object; replace it with an intact copy")
    return obj


_BROKEN_JSON_HINT = "the file is corrupt or truncated; replace it with an intact copy"


def open_checkpoint(path: str, allow_pickle: bool = False) -> Checkpoint:
    """Open ``path`` (file or directory), validating every header it reads."""
    if os.path.isdir(path):
        return _open_directory(path, allow_pickle)
    if not os.path.exists(path):
        raise BadInputError(f"{path}: no such file or directory", "check the path; pass a .safetensors file or a model directory")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise BadInputError(f"{path}: not a regular file", "pass a .safetensors file or a model directory")
    if path.endswith(PICKLE_SUFFIXES):
        return _open_pickle(path, [path], None, allow_pickle)
    if path.endswith(".gguf"):
        from peftcli.checkpoint.gguf_format import open_gguf

        return open_gguf(path)
    _refuse_pickle_magic(path)
    # A weights file inside a model directory still has its config.json (GPT-2's Conv1D
    # layout, layer counts) beside it.
    parent = os.path.dirname(os.path.abspath(path))
    return _open_safetensors_files(path, [path], parent if os.path.isfile(os.path.join(parent, "config.json")) else None)


def _open_directory(path: str, allow_pickle: bool) -> Checkpoint:
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        return _open_sharded(path, index)
    for name in (SAFETENSORS_SINGLE, ADAPTER_WEIGHTS):
        single = os.path.join(path, name)
        if os.path.isfile(single):
            return _open_safetensors_files(path, [single], path)
    pickle_index = os.path.join(path, PICKLE_INDEX)
    if os.path.isfile(pickle_index):
        shards = sorted(set(_read_weight_map(path, pickle_index).values()))
        return _open_pickle(path, [os.path.join(path, s) for s in shards], path, allow_pickle)
    for name in PICKLE_SINGLE:
        if os.path.isfile(os.path.join(path, name)):
            return _open_pickle(path, [os.path.join(path, name)], path, allow_pickle)
    raise BadInputError(
        f"{path}: no checkpoint in this directory",
        f"expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {ADAPTER_WEIGHTS}",
    )


def _read_weight_map(directory: str, index_path: str) -> dict[str, str]:
    obj = load_json(index_path, "shard index")
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise BadInputError(
            f"{index_path}: weight_map must map tensor names to shard file names",
            "the index is corrupt; replace it with an intact copy",
        )
    for shard in set(weight_map.values()):
        norm = os.path.normpath(shard)
        # Lexical check on purpose: Hugging Face caches symlink shards to blobs elsewhere,
        # but the index itself must never name a path outside its directory.
        if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) or shard.startswith("~"):
            raise BadInputError(f"{index_path}: shard path {shard!r} points outside {directory}", "the index is corrupt or hostile")
        if not os.path.isfile(os.path.join(directory, shard)):
            raise BadInputError(f"{index_path}: names shard {shard!r}, which does not exist", "a shard is missing from the directory")
    return weight_map


_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _open_sharded(directory: str, index_path: str) -> Checkpoint:
    weight_map = _read_weight_map(directory, index_path)
    if not weight_map:
        raise BadInputError(f"{index_path}: the index lists no tensors", "the index is empty or corrupt")
    shards = sorted(set(weight_map.values()))
    orphans = sorted(n for n in os.listdir(directory) if _SHARD_NAME.match(n) and n not in shards)
    if orphans:
        raise BadInputError(f"{index_path}: shard {orphans[0]} is in the directory but not in the index", "the index is stale or corrupt")
    ckpt = _open_safetensors_files(directory, [os.path.join(directory, s) for s in shards], directory)
    ckpt.storage = "safetensors-sharded"
    for name, shard in weight_map.items():
        info = ckpt.tensors.get(name)
        if info is None or info.file != os.path.join(directory, shard):
            raise BadInputError(f"{index_path}: says tensor {name!r} is in {shard!r}, but it is not", "the index is stale or corrupt")
    extra = [n for n in ckpt.tensors if n not in weight_map]
    if extra:
        raise BadInputError(
            f"{index_path}: {len(extra)} tensors in the shards are missing from the index, e.g. {extra[0]!r}",
            "the index is stale or corrupt",
        )
    return ckpt


def _open_safetensors_files(path: str, files: list[str], directory: str | None) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    with gc_paused():
        for file in files:
            header = read_header(file)
            if not metadata:
                metadata = header.metadata
            start = header.data_start
            for e in header.entries:
                if e.name in tensors:
                    raise BadInputError(
                        f"{file}: tensor {e.name!r} is also in {tensors[e.name].file}", "two shards hold the same tensor"
                    )
                tensors[e.name] = TensorInfo(e.name, e.dtype, e.shape, file, start + e.begin, start + e.end)
    return Checkpoint(path=path, storage="safetensors", files=list(files), tensors=tensors, metadata=metadata, directory=directory)


def _refuse_pickle_magic(path: str) -> None:
    """A pickle renamed to .safetensors would otherwise give a puzzling header error."""
    with open(path, "rb") as f:
        magic = f.read(9)
    if magic[8:9] == b"{":  # a safetensors header always opens its JSON here
        return
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        raise BadInputError(f"{path}: this is a PyTorch pickle checkpoint, not safetensors", "rename it to .bin and " + PICKLE_HINT)


def _open_pickle(path: str, files: list[str], directory: str | None, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise BadInputError(f"{files[0]}: PyTorch pickle checkpoints can run code when loaded", PICKLE_HINT)
    import pickle

    import torch

    from peftcli.checkpoint.dtypes import safetensors_dtype

    tensors: dict[str, TensorInfo] = {}
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with warnings.catch_warnings():  # torch's multi-line advice to drop weights_only is not ours to give
                warnings.simplefilter("ignore")
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=_is_zip(file))
        except MemoryError:
            raise
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" in str(exc) and _refused_global(exc):
                raise _pickle_refused(file, exc) from None
            # An opcode the safe unpickler lacks, or text we cannot match: a damaged file far
            # more often than a hostile one (random bytes and bit flips end here).
            raise _pickle_unreadable(file, exc) from None
        except OSError as exc:
            raise BadInputError(f"{file}: cannot read: {exc.strerror or exc}", "check that the file is readable") from None
        except Exception as exc:  # noqa: BLE001 - a damaged pickle breaks torch.load in any number of ways
            # (EOFError, RuntimeError from the zip reader, IndexError, KeyError, struct.error, ...)
            raise _pickle_unreadable(file, exc) from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise BadInputError(f"{file}: not a flat state dict of tensors", "save model.state_dict() instead")
        for name, tensor in state.items():
            if not name:
                raise BadInputError(f"{file}: a tensor has an empty name", "the state dict is corrupt")
            if name in tensors:
                raise BadInputError(f"{file}: tensor {name!r} is also in {tensors[name].file}", "two shards hold the same tensor")
            tensors[name] = TensorInfo(name, safetensors_dtype(tensor.dtype), tuple(tensor.shape), file)
            loaded[name] = tensor
    return Checkpoint(path=path, storage="pickle", files=files, tensors=tensors, directory=directory, _loaded=loaded)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REFUSED = (  # how torch's weights_only unpickler names the global it refused, and how we say it
    (re.compile(r"GLOBAL ([\w.]+) was not an allowed global"), "it needs {}, which is not an allowed global"),
    (re.compile(r"unsupported GLOBAL ([\w.]+) whose module"), "it needs {}, which is blocked"),
)


def _refused_global(exc: Exception) -> bool:
    """torch refused a named global (code the file asks to run), not an unreadable byte."""
    text = _ANSI.sub("", str(exc))
    return any(pattern.search(text) for pattern, _ in _REFUSED)
PICKLE_REFUSED_HINT = (
    "peftcli never runs pickled code; if you trust the file, "
    "convert it to safetensors in a trusted environment and pass that file"
)


def _pickle_refused(file: str, exc: Exception) -> BadInputError:
    """Our one line for a pickle that torch's weights_only unpickler refused.

    torch's own text is a paragraph (ANSI escapes, "you have two options", advice to turn
    weights_only off) that is not ours to repeat; we keep only what it refused.
    """
    text = _ANSI.sub("", str(exc))
    for pattern, said in _REFUSED:
        found = pattern.search(text)
        if found:
            what = said.format(found.group(1))
            break
    else:
        what = "it holds objects other than tensors"
    return BadInputError(f"{file}: refused by torch.load(weights_only=True): {what}", PICKLE_REFUSED_HINT)


def _pickle_unreadable(file: str, exc: Exception) -> BadInputError:
    return BadInputError(
        f"{file}: torch.load(weights_only=True) cannot read it: {torch_error_text(exc)}",
        "the file is truncated or not a PyTorch checkpoint; replace it with an intact copy",
    )


def torch_error_text(exc: Exception) -> str:
    """The first sentence of a torch/pickle exception's text, without escapes, at most 200 characters."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if not text:
        return type(exc).__name__
    if isinstance(exc, KeyError):  # str(KeyError(101)) is just "101"
        text = f"{type(exc).__name__}: {text}"
    sentence = re.match(r"(.*?[.!?])(\s|$)", text)
    text = sentence.group(1) if sentence else text
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def _is_zip(file: str) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
