"""Parsing and validating one safetensors header, without trusting anything in the file.

The reference ``safetensors`` library checks some of this but silently keeps the last of
two entries with the same name and accepts trailing bytes; we reject both, and give every
problem a one-line message that names the file.

Layout: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeGuard

from peftcli.errors import BadInputError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's ceiling

# safetensors dtype name -> (bits per element, torch dtype attribute or None if torch lacks it)
DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "F64": (64, "float64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "F4": (4, None),
}


class RawEntry(NamedTuple):
    """One tensor as declared in a header; offsets are relative to the data buffer.

    A named tuple, not a dataclass: a header may declare hundreds of thousands of tensors.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParsedHeader:
    header_len: int  # N, the JSON's length in bytes
    entries: list[RawEntry]  # in file order (sorted by offset)
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects.

    A header of 500,000 tensors makes millions of dicts, tuples and entries; the collector's
    repeated passes over them would take as long as building them. Nothing built here forms
    a cycle, so reference counting frees it all the same.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


MAX_SIZE = (1 << 63) - 1  # torch and numpy index with signed 64-bit integers


def size_problem(dtype: str, shape: tuple[int, ...]) -> str | None:
    """Why a ``dtype`` tensor of ``shape`` cannot exist in memory, or None.

    torch and numpy compute sizes and strides in signed 64 bits: every dimension, the product
    of the non-zero ones (a stride) and that product in bytes must fit, even when another
    dimension is 0 and the tensor holds no byte (``empty()`` overflows otherwise).
    """
    size = max(1, DTYPES[dtype][0] // 8)
    for d in shape:
        size *= max(d, 1)
        if size > MAX_SIZE:
            return f"the shape {dtype}{list(shape)} overflows 64-bit sizes (its dimensions multiply past 2^63 bytes)"
    return None


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    bits = DTYPES[dtype][0] * math.prod(shape)
    return (bits + 7) // 8


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)  # called for every object of the header: the common case stays in C
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


EXPECTED = (
    "pass a .safetensors file, a .diff, a model directory (config.json + model.safetensors) "
    "or an adapter directory (adapter_config.json + adapter_model.safetensors)"
)


def _refuse_other_format(path: str, prefix: bytes) -> None:
    """An impossible header length: say what the file is when its first bytes tell (a text file
    read as a checkpoint should not read as a 'header length 8367736964726416744')."""
    if prefix[:4] == b"GGUF":
        raise BadInputError(f"{path}: a GGUF file, not safetensors", "name it .gguf to read it as a llama GGUF base, or " + EXPECTED)
    if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
        raise BadInputError(
            f"{path}: a PyTorch pickle, not safetensors",
            "pass `allow_pickle` to read it with torch.load(weights_only=True), or " + EXPECTED,
        )
    if all(32 <= b < 127 or b in (9, 10, 13) for b in prefix):
        raise BadInputError(f"{path}: a text file, not safetensors (it starts with {prefix.decode('ascii')!r})", EXPECTED)


def read_header(path: str) -> ParsedHeader:
    """Read and validate the header of ``path``; reads only 8 + N bytes of the file."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadInputError(
                    f"{path}: not a safetensors file: {file_size} bytes, shorter than the 8-byte header length",
                    "the file is truncated or empty",
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                _refuse_other_format(path, prefix)
            if header_len > MAX_HEADER_BYTES:
                raise BadInputError(
                    f"{path}: header length {header_len} is over the 100 MB limit", "the file is corrupt or not safetensors"
                )
            if 8 + header_len > file_size:
                raise BadInputError(
                    f"{path}: header length {header_len} runs past the end of the {file_size}-byte file",
                    "the file is truncated or not safetensors",
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read: {exc.strerror or exc}", "check that the file exists and is readable") from exc
    return parse_header(path, raw, file_size)


def parse_header(path: str, raw: bytes, file_size: int) -> ParsedHeader:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes."""
    header_len = len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as exc:
        raise BadInputError(
            f"{path}: header has the key {exc.key!r} twice", "the file is corrupt; the writer that made it is buggy"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:  # ValueError: integers too long to parse
        raise BadInputError(f"{path}: header is not valid JSON: {exc}", "the file is corrupt or not safetensors") from None
    except RecursionError:
        raise BadInputError(f"{path}: header JSON is nested too deeply", "the file is corrupt") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: header is JSON but not an object", "the file is corrupt or not safetensors")

    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise BadInputError(f"{path}: __metadata__ must map strings to strings", "the file is corrupt")

    entries = [_parse_entry(path, name, spec) for name, spec in obj.items()]
    entries.sort(key=lambda e: (e.begin, e.end))

    # The data buffer must be covered exactly: no overlaps, no holes, nothing after it.
    data_len = file_size - 8 - header_len
    cursor = 0
    for e in entries:
        if e.end > data_len:
            raise BadInputError(
                f"{path}: tensor {e.name!r} ends at byte {e.end} of a {data_len}-byte data buffer (out of bounds)",
                "the file is truncated or corrupt",
            )
        if e.begin < cursor:
            raise BadInputError(f"{path}: tensor {e.name!r} overlaps the tensor before it", "the file is corrupt")
        if e.begin > cursor:
            raise BadInputError(
                f"{path}: hole of {e.begin - cursor} bytes before tensor {e.name!r}", "the file is corrupt"
            )
        cursor = e.end
    if cursor != data_len:
        raise BadInputError(
            f"{path}: {data_len - cursor} trailing bytes after the last tensor", "the file is corrupt or was appended to"
        )
    return ParsedHeader(header_len=header_len, entries=entries, metadata=dict(metadata))


def _naturals(values: object) -> TypeGuard[list[int]]:
    """A JSON list of non-negative integers (``type(...) is int`` also rules out booleans)."""
    if type(values) is not list:
        return False
    for v in values:
        if type(v) is not int or v < 0:
            return False
    return True


def _parse_entry(path: str, name: str, spec: object) -> RawEntry:
    if not name:  # no module parameter is called "", and "" is a "no tensor" sentinel downstream
        raise BadInputError(f"{path}: a tensor has an empty name", "the file is corrupt")
    if type(spec) is not dict:
        raise BadInputError(f"{path}: entry for tensor {name!r} is not an object", "the file is corrupt")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if type(dtype) is not str or dtype not in DTYPES:
        raise BadInputError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}",
            "known: " + ", ".join(DTYPES),
        )
    if not _naturals(shape):
        raise BadInputError(f"{path}: tensor {name!r} has an invalid shape {shape!r}", "the file is corrupt")
    if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise BadInputError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}", "the file is corrupt")
    shape_t = tuple(shape)
    too_large = size_problem(dtype, shape_t)
    if too_large:
        raise BadInputError(f"{path}: tensor {name!r}: {too_large}", "the file is corrupt")
    bits = DTYPES[dtype][0] * math.prod(shape_t)
    if bits % 8:
        raise BadInputError(f"{path}: tensor {name!r} of {dtype}{list(shape_t)} does not end on a byte boundary", "the file is corrupt")
    want = bits // 8
    got = offsets[1] - offsets[0]
    if want != got:
        raise BadInputError(
            f"{path}: tensor {name!r} is {dtype}{list(shape_t)} = {want} bytes but its byte range holds {got}",
            "the file is corrupt",
        )
    return RawEntry(name, dtype, shape_t, offsets[0], offsets[1])
