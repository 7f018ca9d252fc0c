"""The sha256 of a merge's input weight files, computed on a background thread.

The merged checkpoint records each input file's sha256 in its metadata, and its header is
written before the first tensor, so every hash is needed before the merge writes anything.
Hashing is CPU-bound (about 1 GB/s) and independent of everything else the merge does, so
``Hasher`` starts it at once on its own thread: the CLI starts it before importing torch
(seconds spent in the import, on the other core). ``sha256`` then waits for a file's hash, or
computes it there for a file the hasher was not given. Imports no torch.
"""

from __future__ import annotations

import os
import threading
from typing import Iterable

from peftcli.checkpoint.fingerprint import file_sha256
from peftcli.errors import PeftcliError


def input_weight_files(path: str) -> list[str]:
    """The weight files a merge input's provenance hashes name; [] where unsure (it is hashed later)."""
    from peftcli.checkpoint.reader import ADAPTER_WEIGHTS, open_checkpoint

    # artifacts.adapter_dir.ADAPTER_CONFIG, not imported: it imports every method, which a merge of checkpoints never needs
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json")):
        return [os.path.join(path, ADAPTER_WEIGHTS)]
    if path.endswith(".diff"):
        return [path]
    try:  # headers only; a pickle is never loaded here (allow_pickle=False refuses it)
        with open_checkpoint(path) as ckpt:
            return list(ckpt.files)
    except PeftcliError:
        return []  # the merge itself reports what is wrong with it


class Hasher:
    """Hashes ``files`` in order on a daemon thread; ``sha256(path)`` gives one file's hash."""

    def __init__(self, files: Iterable[str] = ()):
        self._files = list(dict.fromkeys(os.path.realpath(f) for f in files))
        self._done: dict[str, str | BaseException] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="peftcli-hash", daemon=True)
        self._thread.start()

    @classmethod
    def for_inputs(cls, inputs: Iterable[str]) -> "Hasher":
        return cls([f for path in inputs for f in input_weight_files(path)])

    def _run(self) -> None:
        for f in self._files:
            if self._stopped:
                return
            try:
                result: str | BaseException = file_sha256(f)
            except BaseException as exc:  # handed to the caller of sha256, in its thread
                result = exc
            with self._cond:
                self._done[f] = result
                self._cond.notify_all()

    def sha256(self, path: str) -> str:
        key = os.path.realpath(path)
        if key not in self._files:
            return file_sha256(path)
        with self._cond:
            self._cond.wait_for(lambda: key in self._done)
            result = self._done[key]
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        """Hash no further file (a merge that failed needs none); ``sha256`` then hashes in place."""
        with self._cond:
            self._stopped = True
            self._files = [f for f in self._files if f in self._done]
