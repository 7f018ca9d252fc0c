"""Hand-made safetensors bytes for tests: valid files and every way of corrupting one."""

from __future__ import annotations

import json
import struct


def make_file(entries: dict, data: bytes, metadata: dict | None = None, header_override: bytes | None = None) -> bytes:
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = header_override if header_override is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def valid_two_tensors() -> bytes:
    """a: F32[2,2] at 0..16, b: I8[4] at 16..20."""
    return make_file(
        {
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "I8", "shape": [4], "data_offsets": [16, 20]},
        },
        struct.pack("<4f", 1.0, 2.0, 3.0, 4.0) + bytes([1, 2, 3, 4]),
    )


def write(path, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return str(path)
