"""Parsing and validating one safetensors header, without trusting anything in the file.

The reference ``safetensors`` library checks some of this but silently keeps the last of
two entries with the same name and accepts trailing bytes; we reject both, and give every
problem a one-line message that names the file.

Layout: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RawEntry:
    """One tensor as declared in a header; offsets are relative to the data buffer."""

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


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    bits = DTYPES[dtype][0] * math.prod(shape)
    return (bits + 7) // 8


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


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
        raise BadInputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
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
        raise BadInputError(f"{path}: header is not valid JSON ({exc})", "the file is corrupt or not safetensors") from None
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


def _parse_entry(path: str, name: str, spec: object) -> RawEntry:
    if not isinstance(spec, dict):
        raise BadInputError(f"{path}: entry for tensor {name!r} is not an object", "the file is corrupt")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadInputError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}",
            "known: " + ", ".join(DTYPES),
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadInputError(f"{path}: tensor {name!r} has an invalid shape {shape!r}", "the file is corrupt")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise BadInputError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}", "the file is corrupt")
    shape_t = tuple(shape)
    if (DTYPES[dtype][0] * math.prod(shape_t)) % 8:
        raise BadInputError(f"{path}: tensor {name!r} of {dtype}{list(shape_t)} does not end on a byte boundary", "the file is corrupt")
    want = expected_nbytes(dtype, shape_t)
    got = offsets[1] - offsets[0]
    if want != got:
        raise BadInputError(
            f"{path}: tensor {name!r} is {dtype}{list(shape_t)} = {want} bytes but its byte range holds {got}",
            "the file is corrupt",
        )
    return RawEntry(name=name, dtype=dtype, shape=shape_t, begin=offsets[0], end=offsets[1])
