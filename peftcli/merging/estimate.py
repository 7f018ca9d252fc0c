"""What ``peftcli merge`` would do, from headers alone: tensors changed, bytes moved, peak memory, time.

``peftcli check`` reports it. Nothing is read but headers; the formulas follow the engine:

- Bytes: the base and every input's weight files are read once (diffs and adapters whole,
  checkpoints in lockstep), the inputs' files hashed once more for the provenance metadata, and
  the output written once: every base tensor in its output dtype.
- Peak memory, an upper bound: ``RUNTIME_BYTES`` (interpreter, torch, peftcli) + the buffers a
  ranged merge allocates once (``ranged.buffers_total``) + the most that one tensor needs at once,
  over the tensors the merge changes. Per tensor of N elements, touched by k inputs:

  ==========================================  =================================================
  inputs diffs or checkpoints (ranges)         the diffs' stored values of it, plus the method's
                                               ``peak_bytes``: (k + 1) × wN for ties (the k φ
                                               and the ranked |φ|), wN for breadcrumbs (one |φ|
                                               at a time), a block of rows' ranks for della, 0
                                               for linear, dare, dare-ties, slerp, model-stock,
                                               karcher, nuslerp, multislerp
  anything else, done whole (adapters)         its base and output bytes, plus wN × the method's
                                               ``whole_factor``: 3 for linear, 2k + 3 for dare and
                                               della-linear, 3k + 4 for ties, dare-ties,
                                               breadcrumbs and della, k + 4 for model-stock, karcher
                                               and multislerp, 5 for slerp and nuslerp
  ==========================================  =================================================

  Each method declares its terms (``peftcli.merging.methods``).

  w is the work dtype's size: 8 for F64 tensors (fp64), else 4 (fp32).

- Time, assuming an otherwise idle machine at the rates in ``RATES`` (measured on the project's
  2-core machine, see benchmarks/README.md): the start-up (importing torch, overlapped with
  hashing), then reading, computing (TIES' ranking, DARE's random draws) and writing in turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from peftcli.checkpoint.reader import Checkpoint
from peftcli.checkpoint.safetensors_format import DTYPES, expected_nbytes

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
RUNTIME_BYTES = 300 * 10**6  # a merge of a tiny model peaks at ~230 MB resident: python, torch, peftcli
RATES = {
    "startup_s": 2.5,  # importing torch and peftcli, s
    "hash": 1.0e9,  # sha256, bytes/s
    "read": 4.0e9,  # page-cache reads, bytes/s (a cold disk is slower)
    "write": 1.0e9,  # writes including the closing fsync, bytes/s: the low end measured (1.0-1.4 GB/s)
    "merge": 1.0e9,  # ranged arithmetic, output elements/s per input
    "rank": 7.0e7,  # TIES beyond a linear merge (ranking |φ|, selecting by range), elements/s per input
    "draw": 6.0e7,  # DARE by ranges (the mask's random draw, drop, rescale, sum), elements/s per input
    "crumbs": 2.0e7,  # Breadcrumbs beyond a linear merge (two cuts of |φ|, a selection by ranges), elements/s per input: one rough run
    "della": 5.0e6,  # DELLA beyond a linear merge (ranking each row's |φ|, the draw, 1/p), elements/s per input: one rough run
    "whole": 1.5e8,  # whole-tensor arithmetic (adapter folds), elements/s per input
}


@dataclass
class Input:
    """What one merge input touches, as ``check`` found it."""

    kind: str  # "diff" | "adapter" | "checkpoint"
    touches: set[str]  # base tensor names it changes
    files: list[str]  # its weight files (read and hashed)
    stored: dict[str, int] = field(default_factory=dict)  # a diff's bytes per tensor (values and indices)

    @property
    def ranged(self) -> bool:  # the kinds the engine merges by ranges (ranged.py)
        return self.kind in ("diff", "checkpoint")


@dataclass
class MergeEstimate:
    method: str
    tensors: int
    changed: int
    read_bytes: int
    hash_bytes: int
    write_bytes: int
    peak_bytes: int
    peak_tensor: str | None  # the tensor that needs the most memory at once
    seconds: float

    def to_json(self) -> dict:
        return {
            "method": self.method, "tensors": self.tensors, "changed_tensors": self.changed,
            "read_bytes": self.read_bytes, "hash_bytes": self.hash_bytes, "write_bytes": self.write_bytes,
            "peak_bytes": self.peak_bytes, "peak_tensor": self.peak_tensor, "seconds": round(self.seconds, 2),
            "rates": RATES, "runtime_bytes": RUNTIME_BYTES,
        }


def estimate(ckpt: Checkpoint, inputs: list[Input], method: str = "linear", dtype: str | None = None) -> MergeEstimate:
    """The estimate for merging ``inputs`` into ``ckpt`` with ``method`` (and ``--dtype``)."""
    from peftcli.merging.methods import get_merge_method
    from peftcli.merging.ranged import buffers_total

    m = get_merge_method(method)
    k = len(inputs)
    out_dtype = {n: (dtype if dtype and t.dtype in FLOAT_DTYPES else t.dtype) for n, t in ckpt.tensors.items()}
    write = sum(expected_nbytes(out_dtype[n], t.shape) for n, t in ckpt.tensors.items())
    hashed = sum(os.path.getsize(f) for i in inputs for f in i.files)
    read = sum(os.path.getsize(f) for f in ckpt.files) + hashed
    peak, peak_tensor, changed, seconds = 0, None, 0, 0.0
    pickle = ckpt.storage == "pickle"
    for name, info in ckpt.tensors.items():
        touching = [i for i in inputs if name in i.touches]
        if not touching:
            continue
        changed += 1
        n = info.numel
        w = 8 if info.dtype == "F64" else 4  # the work dtype's bytes: fp64 for F64 tensors
        stored = sum(i.stored.get(name, 0) for i in touching)
        if info.begin is not None and all(i.ranged for i in touching) and info.dtype in FLOAT_DTYPES:
            need = stored + m.peak_bytes(n, len(touching), w)
            extra = RATES[m.rate] if m.rate else None
            seconds += n * len(touching) / RATES["merge"] + (n * len(touching) / extra if extra else 0)
        else:
            factor = m.whole_factor(k)
            need = stored + info.nbytes + expected_nbytes(out_dtype[name], info.shape) + factor * w * n
            seconds += n * k / RATES["whole"]
        if need > peak:
            peak, peak_tensor = need, name
    if pickle:  # torch.load holds the whole base
        peak += sum(t.nbytes for t in ckpt.tensors.values())
    dtypes = [t.dtype for t in ckpt.tensors.values()] + list(out_dtype.values())
    peak += RUNTIME_BYTES + buffers_total(k, [d for d in dtypes if d in DTYPES])
    seconds += max(RATES["startup_s"], hashed / RATES["hash"]) + read / RATES["read"] + write / RATES["write"]
    return MergeEstimate(method, len(ckpt.tensors), changed, read, hashed, write, peak, peak_tensor, seconds)
