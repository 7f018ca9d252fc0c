"""What ``peftcli merge`` reports, torch-free: the report of a merged checkpoint and the bytes it
takes on disk, shared by the torch engine (``engine``), the numpy path (``fast_linear``) and the
passthrough stacker."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class MergeReport:
    output: str
    method: str
    inputs: list[dict]
    tensors: int
    changed: int
    bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)  # the head models written, one per task

    def to_json(self) -> dict:
        return {
            "schema": "peftcli.merge/1", "output": self.output, "method": self.method, "inputs": self.inputs,
            "tensors": self.tensors, "changed_tensors": self.changed, "bytes": self.bytes, "tasks": self.tasks,
        }


def output_size(out: str | None) -> int:
    """Bytes of the output on disk (a file with several names counts once)."""
    if out and os.path.isfile(out):
        return os.path.getsize(out)
    seen, size = set(), 0
    for root, _, files in os.walk(out) if out and os.path.isdir(out) else ():
        for f in files:
            st = os.stat(os.path.join(root, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    return size
