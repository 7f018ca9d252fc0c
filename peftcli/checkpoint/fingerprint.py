"""The identity of a base checkpoint: tensor names, dtypes and shapes, plus optional content hashes.

A fingerprint lets an artifact made from a base (a sparse diff) refuse any other base. Parts:

- ``tensors``: ``{name: [dtype, shape]}`` for every tensor of the base (safetensors dtype names);
- ``hash``: sha256 (hex) of the UTF-8 text ``json.dumps([[name, dtype, shape], ...], separators=(",", ":"),
  ensure_ascii=False)`` with the list sorted by name: the same for the same tensors whatever the
  file layout (one file or shards, any order inside them);
- ``content`` (optional): sha256 (hex) over the raw little-endian bytes of chosen tensors (the bytes
  safetensors stores), concatenated in sorted name order. No separators are needed: the shapes
  fix every tensor's length. Computed streaming, one tensor at a time.

``file_sha256`` hashes whole weight files for provenance, streaming in 8 MiB chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from peftcli.checkpoint.reader import Checkpoint
from peftcli.errors import BadInputError

CHUNK = 8 * 1024 * 1024
SHOWN_DIFFERENCES = 3  # an error lists this many differences, then a count of the rest

Progress = Callable[[str, int, int], None]  # (phase, done, total), done and total in bytes here


def tensor_table(ckpt: Checkpoint) -> dict[str, list[Any]]:
    """``{name: [dtype, shape]}`` for every tensor of ``ckpt``, sorted by name."""
    return {name: [ckpt.tensors[name].dtype, list(ckpt.tensors[name].shape)] for name in sorted(ckpt.tensors)}


def structure_hash(table: dict[str, list[Any]]) -> str:
    rows = [[name, table[name][0], list(table[name][1])] for name in sorted(table)]
    text = json.dumps(rows, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(ckpt: Checkpoint, names: Iterable[str], progress: Progress | None = None) -> str:
    """sha256 over the bytes of tensors ``names`` in sorted name order, one tensor in memory at a time."""
    from peftcli.checkpoint.writer import tensor_bytes

    names = sorted(names)
    total = sum(ckpt.tensors[n].nbytes for n in names)
    h = hashlib.sha256()
    done = 0
    for name in names:
        h.update(tensor_bytes(ckpt.get(name)))  # a view of the memory map: no copy
        done += ckpt.tensors[name].nbytes
        if progress:
            progress("hashing base tensors", done, total)
    return h.hexdigest()


def file_sha256(path: str, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a file's bytes, read in chunks; ``on_bytes(n)`` after each chunk of n bytes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read: {exc.strerror or exc}", "check that the file exists and is readable") from exc
    return h.hexdigest()


def file_hashes(ckpt: Checkpoint, progress: Progress | None = None) -> dict[str, str]:
    """``{file: sha256}`` for each weight file of ``ckpt``, named relative to the checkpoint directory."""
    total = sum(os.path.getsize(f) for f in ckpt.files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:  # always, where advance is passed on
            progress(f"hashing {ckpt.path}", done, total)

    hashes = {}
    for file in ckpt.files:
        key = os.path.relpath(file, ckpt.directory) if ckpt.directory else os.path.basename(file)
        hashes[key] = file_sha256(file, advance if progress else None)
    return hashes


def table_differences(
    expected: dict[str, list[Any]], actual: dict[str, list[Any]], expected_label: str, actual_label: str
) -> list[str]:
    """Every difference between two tensor tables, in name order, as short phrases."""
    out = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            out.append(f"{name!r} only in {expected_label}")
        elif name not in expected:
            out.append(f"{name!r} only in {actual_label}")
        elif list(expected[name][1]) != list(actual[name][1]) or expected[name][0] != actual[name][0]:
            a, b = expected[name], actual[name]
            out.append(f"{name!r} is {a[0]}{list(a[1])} in {expected_label} but {b[0]}{list(b[1])} in {actual_label}")
    return out


def summarize_differences(differences: list[str]) -> str:
    """The first few differences and how many more there are (an error message stays one line)."""
    shown = "; ".join(differences[:SHOWN_DIFFERENCES])
    rest = len(differences) - SHOWN_DIFFERENCES
    return f"{len(differences)} difference{'s' if len(differences) != 1 else ''}: {shown}" + (
        f"; and {rest} more" if rest > 0 else ""
    )


@dataclass(frozen=True)
class Fingerprint:
    tensors: dict[str, list[Any]]  # {name: [dtype, shape]}
    hash: str
    content: str | None = None  # sha256 of the bytes of the tensors an artifact touches

    @classmethod
    def of(
        cls, ckpt: Checkpoint, content_names: Iterable[str] | None = None, progress: Progress | None = None
    ) -> "Fingerprint":
        table = tensor_table(ckpt)
        content = content_hash(ckpt, content_names, progress) if content_names is not None else None
        return cls(table, structure_hash(table), content)

    def to_json(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "hash": self.hash, "content": self.content}

    @classmethod
    def from_json(cls, obj: object, where: str) -> "Fingerprint":
        """Parse and check a fingerprint; ``where`` names the file for errors."""
        if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict) or not isinstance(obj.get("hash"), str):
            raise BadInputError(
                f"{where}: base_fingerprint must be an object with 'tensors' and 'hash'", "the file is corrupt"
            )
        for name, entry in obj["tensors"].items():
            if not is_dtype_shape(entry):
                raise BadInputError(
                    f"{where}: base_fingerprint: tensor {name!r} has an invalid entry {entry!r}", "the file is corrupt"
                )
        content = obj.get("content")
        if content is not None and not isinstance(content, str):
            raise BadInputError(f"{where}: base_fingerprint: content must be a string or null", "the file is corrupt")
        fp = cls({n: [e[0], list(e[1])] for n, e in obj["tensors"].items()}, obj["hash"], content)
        if structure_hash(fp.tensors) != fp.hash:
            raise BadInputError(
                f"{where}: base_fingerprint: the hash does not match its tensor list", "the file is corrupt or was edited"
            )
        return fp

    def differences(self, ckpt: Checkpoint) -> list[str]:
        """How ``ckpt``'s tensor names, dtypes and shapes differ from this fingerprint."""
        return table_differences(self.tensors, tensor_table(ckpt), "the fingerprint", ckpt.path)


def is_dtype_shape(entry: object) -> bool:
    """True for a ``[dtype, shape]`` pair as tables and fingerprints hold them."""
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])
    )
