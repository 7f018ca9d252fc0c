"""The CheckpointWriter starts the kernel's writeback as it writes (sync_file_range on Linux):
the file is still complete and byte-identical, the no-op fallback writes the same bytes, and
the fsync before the rename still happens (writeback saves time, never replaces durability)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from peftcli.checkpoint import writer as writer_mod
from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec, build_header

CHUNK = 4096  # small, so a few hundred kB of tensors cross many writeback starts


def _tensors() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {f"t{i}": rng.standard_normal(n, dtype=np.float32).tobytes() for i, n in enumerate((7000, 1, 0, 33333, 2049))}


def _expected(tensors: dict[str, bytes]) -> bytes:
    """The file built independently: the header of build_header, then the tensors' bytes in order."""
    specs = [TensorSpec(n, "F32", (len(b) // 4,)) for n, b in tensors.items()]
    return build_header(specs, {"format": "pt"}) + b"".join(tensors.values())


def _write(path: str, tensors: dict[str, bytes], parts: int = 3) -> None:
    specs = [TensorSpec(n, "F32", (len(b) // 4,)) for n, b in tensors.items()]
    with CheckpointWriter(path, specs) as w:
        for name, data in tensors.items():
            if not data:
                w.write(name, data)
                continue
            step = -(-len(data) // parts)
            for i in range(0, len(data), step):  # in parts, as the fast merge path writes
                w.write_partial(name, data[i : i + step])


def test_writeback_file_is_complete_and_identical(tmp_path, monkeypatch):
    calls = []
    real = writer_mod.start_writeback

    def recording(fd, offset, nbytes):
        calls.append((offset, nbytes))
        real(fd, offset, nbytes)  # the real call, whatever this file system answers
        return True

    monkeypatch.setattr(writer_mod, "WRITEBACK_CHUNK", CHUNK)
    monkeypatch.setattr(writer_mod, "start_writeback", recording)
    tensors = _tensors()
    out = tmp_path / "out.safetensors"
    _write(str(out), tensors)
    expected = _expected(tensors)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert len(calls) >= 5  # writeback was started along the way
    ends = [o + n for o, n in calls]
    assert [o for o, _ in calls] == [0, *ends[:-1]]  # contiguous ranges from the start, none twice
    assert ends[-1] <= len(expected)


def test_fallback_without_sync_file_range(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "WRITEBACK_CHUNK", CHUNK)
    monkeypatch.setattr(writer_mod, "_sync_file_range", False)  # as on a system without it
    assert writer_mod.start_writeback(0, 0, 1) is False
    tensors = _tensors()
    out = tmp_path / "out.safetensors"
    _write(str(out), tensors)
    assert out.read_bytes() == _expected(tensors)


def test_refused_writeback_stops_asking(tmp_path, monkeypatch):
    """A file system that refuses sync_file_range: asked once, then the writer stops asking."""
    calls = []
    monkeypatch.setattr(writer_mod, "WRITEBACK_CHUNK", CHUNK)
    monkeypatch.setattr(writer_mod, "start_writeback", lambda fd, off, n: calls.append(off) or False)
    tensors = _tensors()
    out = tmp_path / "out.safetensors"
    _write(str(out), tensors)
    assert out.read_bytes() == _expected(tensors)
    assert calls == [0]


@pytest.mark.parametrize("available", [True, False])
def test_final_fsync_still_happens(tmp_path, monkeypatch, available):
    """The fsync of the finished file comes after every byte is written, before it appears at the target."""
    monkeypatch.setattr(writer_mod, "WRITEBACK_CHUNK", CHUNK)
    if not available:
        monkeypatch.setattr(writer_mod, "_sync_file_range", False)
    out = tmp_path / "out.safetensors"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        size = os.fstat(fd).st_size
        synced.append((size, out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tensors = _tensors()
    _write(str(out), tensors)
    assert (len(_expected(tensors)), False) in synced  # the whole file, fsynced before the rename
