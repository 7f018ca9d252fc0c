"""Overlapping a streaming merge's reads, arithmetic and writes: a reader and a writer thread.

Merging is bound by moving bytes, so the merge computes on the calling thread while
``ReadAhead`` reads the next ranges of the input files and ``WriteBehind`` writes finished
ranges of the output. Both work on a fixed set of reusable buffers (no allocation, hence no
page faults, per range), which also bounds the memory they hold: ``ReadAhead`` blocks when
all its buffers are in use and ``WriteBehind`` holds a bounded queue. The file reads and
writes release the GIL, so the three threads run on separate cores where there are any.

An exception on either thread is raised on the calling thread at its next call; closing
either one (as a context manager) stops its thread, on success or failure.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

from peftcli.checkpoint.reader import read_file_range

Read = tuple[str, int, int]  # (file, offset, bytes)


class Buffers:
    """``count`` uint8 buffers of ``nbytes`` each, handed out and given back; ``take`` waits for one."""

    def __init__(self, count: int, nbytes: int):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8))

    def take(self) -> torch.Tensor:
        return self._free.get()

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class ReadAhead:
    """Reads ``requests`` in order on a thread, as far ahead as its ``count`` buffers allow.

    ``next()`` returns the next request's bytes (a uint8 tensor of its length, a view of a
    buffer); the caller hands the buffer back with ``give`` once done with it, which lets the
    reader go on. A consumer that holds ``count`` buffers at once would wait forever, so
    ``count`` must exceed the reads it holds together.
    """

    def __init__(self, requests: Iterable[Read], count: int, nbytes: int):
        self._requests = requests
        self._pool = Buffers(count, nbytes)
        self._nbytes = nbytes
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._files: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, name="peftcli-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for path, offset, n in self._requests:
                buf = self._pool.take()
                if self._stopping:
                    return
                f = self._files.get(path)
                if f is None:
                    f = self._files[path] = open(path, "rb", buffering=0)
                self._ready.put((buf, read_file_range(f, path, offset, n, buf)))
            self._ready.put(RuntimeError("the merge read past its plan of reads"))  # a bug, not a hang
        except BaseException as exc:  # raised again on the consumer's thread
            self._ready.put(exc)
        finally:
            for f in self._files.values():
                f.close()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buffer, data)``: give ``buffer`` back when done with ``data``."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def give(self, buf: torch.Tensor) -> None:
        self._pool.give(buf)

    def close(self) -> None:
        self._stopping = True
        self._pool.give(torch.empty(0, dtype=torch.uint8))  # wakes a reader waiting for a buffer
        self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteBehind:
    """Calls ``write(name, data)`` or ``write_partial(name, data)`` of ``writer`` on a thread, in order.

    ``put`` queues one write and the function to call once its data is written (to hand a
    buffer back). The queue holds at most ``limit`` bytes, or one write larger than that: a
    whole tensor waits until the writes before it are done, so at most one is queued while
    the next is computed.
    """

    def __init__(self, writer, limit: int = 64 << 20):
        self._writer = writer
        self._limit = limit
        self._items: collections.deque = collections.deque()
        self._queued = 0  # bytes queued or being written
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="peftcli-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items)
                item = self._items[0]
            if item is None:
                return
            name, data, whole, done, size = item
            try:
                if self._error is None:  # after a failure, only hand the buffers back
                    (self._writer.write if whole else self._writer.write_partial)(name, data)
            except BaseException as exc:
                self._error = exc
            finally:
                if done is not None:
                    done()
                with self._cond:
                    self._items.popleft()
                    self._queued -= size
                    self._cond.notify_all()
                item = data = None  # a whole tensor goes as soon as it is written

    def put(self, name: str, data, *, whole: bool = False, done: Callable[[], None] | None = None) -> None:
        size = data.nbytes if hasattr(data, "nbytes") else len(data)
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or not self._items or self._queued + size <= self._limit)
            if self._error is not None:
                raise self._error
            self._items.append((name, data, whole, done, size))
            self._queued += size
            self._cond.notify_all()

    def _join(self) -> None:
        if self._thread.is_alive():
            with self._cond:
                self._items.append(None)
                self._cond.notify_all()
            self._thread.join()

    def close(self) -> None:
        """Wait for every queued write; raise what failed."""
        self._join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # failing already: that error is the one to raise, and the rest is not written
            self._error = self._error or exc
            self._join()


def chunks(numel: int, size: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` element ranges of at most ``size`` covering ``range(numel)``."""
    for start in range(0, numel, size):
        yield start, min(numel, start + size)
