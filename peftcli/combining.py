"""Tensor level: arithmetic on sparse diffs of one base, φ = Σ cᵢ·φᵢ, written as a sparse ``.diff``.

Operations, each a list of coefficients cᵢ over the inputs:

- ``add``: Σ φᵢ over two or more inputs, or Σ wᵢ·φᵢ with ``weights`` (one per input);
- ``subtract``: φ_a − φ_b (two inputs; for w_a·φ_a − w_b·φ_b use ``add`` with weights ``w_a,-w_b``);
- ``scale``: c·φ (one input, c = ``by``; ``by=-1`` negates, e.g. to forget a task).

Inputs must carry the same base fingerprint (tensor names, dtypes, shapes and their hash). They
may cover different tensors: an input that does not cover a tensor contributes 0 there.

Per covered tensor (the union of the inputs' covered tensors, in sorted name order):

- values: ``acc += cᵢ · φᵢ`` over the inputs in the order given, in fp32 (fp64 for F64 tensors;
  cᵢ is rounded to that precision first), at each input's entries; then cast once to the stored
  value dtype. By default that is F32 when any input stores F32 values for a tensor whose base
  dtype is not F32 (nothing is rounded away), and otherwise the base tensor's dtype; ``values``
  ("base" or "fp32") chooses. Inputs holding NaN/Inf, and sums that overflow it, are refused.
- entries: the union of the inputs' entries, less those that are exactly 0 after the cast; so
  ``a − a`` and ``a + (−a)`` keep no entry (k = 0). The output covers every tensor some input
  covers, even one left with no entry, so the covered set (and with it the content hash) is kept.
- whole tensors: a tensor that every input covering it stores whole (``dense_tensors``: biases,
  norms) stays whole: all its entries, zeros included, left out of the density, as in the inputs
  (in ``a − a`` they are all zero). Otherwise it is selected from, and a dense input contributes
  its nonzero entries.
- storage: dense or sparse by the format's own rule (dense when that takes no more bytes).

Metadata: ``method`` is ``"combined"`` whatever the inputs' methods (a sum of two top-K
selections is no top-K selection; the inputs are named and hashed in the provenance);
``density`` is recomputed exactly from the kept counts; ``base_fingerprint`` is the inputs'
one. Its ``content`` hash (of the base's covered tensors, which combine never reads) is kept
when every input has the same one over the same covered tensors; otherwise it is null. Inputs with the same covered tensors but different content hashes
come from different bases of one architecture and are refused.

Streaming: the header lists every tensor's kept count before any data, so pass 1 computes each
tensor's combined values only to count them, and pass 2 computes them again as it writes. One
tensor of each input is in memory at a time; the merge works on index lists, so a sparse tensor
costs O(its entries), not O(numel).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from peftcli import __version__
from peftcli.artifacts.sparse_diff import (
    VAL, VALUES, VALUES_HINT, DiffEntry, DiffMetadata, SparseDiff, StoredCounts, StoredTensor, read_diff, recorded_inputs, stored_summary, write_diff,
)
from peftcli.checkpoint.atomic import check_output_path
from peftcli.checkpoint.fingerprint import Fingerprint, file_hashes
from peftcli.errors import BadInputError, UsageError
from peftcli.options import ascii_float, check_declared, option

if TYPE_CHECKING:
    import torch

OPS = ("add", "subtract", "scale")
METHOD = "combined"


def parse_weights(text: str) -> list[float]:
    """``"1.0,0.5"`` -> ``[1.0, 0.5]`` (ASCII digits only)."""
    weights = [ascii_float(w) for w in text.split(",")]
    if any(w is None for w in weights):
        raise UsageError(f"`weights` must be comma-separated numbers, got {text!r}", "e.g. `weights` 1.0,0.5")
    return weights


@dataclass
class CombineOptions:
    """The options of ``peftcli combine`` (and of a recipe's combine step); ``coefficients`` checks
    them against the number of inputs."""

    op: str | None = option(None, help="add (Σ φᵢ), subtract (a − b) or scale (c·φ).", choices=OPS, required=True)
    by: float | None = option(None, help="The factor of --op scale (-1 negates).", metavar="C", finite=False)
    weights: list[float] | str | None = option(None, help="One weight per input for --op add: Σ wᵢ·φᵢ.", metavar="W1,W2,...")
    values: str | None = option(
        None, choices=VALUES,
        help="Dtype of the stored values: the base tensor's or fp32 (default: fp32 when an input stores fp32, else base).",
    )
    force: bool = option(False, help="Replace OUTPUT if it exists.")

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise UsageError(f"`op` must be one of {', '.join(OPS)}, got {self.op!r}", "add sums the diffs, subtract takes a − b, scale multiplies one")
        if isinstance(self.weights, str):
            self.weights = parse_weights(self.weights)
        if self.values is not None and self.values not in VALUES:
            raise UsageError(f"`values` must be one of {', '.join(VALUES)}, got {self.values!r}", VALUES_HINT)
        check_declared(self)


def coefficients(op: str, n: int, by: float | None = None, weights: Sequence[float] | None = None) -> list[float]:
    """The cᵢ of Σ cᵢ·φᵢ for ``op`` on ``n`` inputs, after checking the options fit the operation."""
    if op not in OPS:
        raise UsageError(f"`op` must be one of {', '.join(OPS)}, got {op!r}", "add sums the diffs, subtract takes a − b, scale multiplies one")
    if op != "scale" and by is not None:
        raise UsageError("`by` only applies to `op` scale", "use `weights` with `op` add")
    if op != "add" and weights is not None:
        raise UsageError("`weights` only applies to `op` add", "e.g. `op` add `weights` 1,-0.5 for a − 0.5·b")
    if op == "scale":
        if n != 1:
            raise UsageError(f"`op` scale takes one input, got {n}", "use `op` add `weights` for several")
        if by is None:
            raise UsageError("`op` scale needs `by`", "e.g. `by` -1 to negate")
        coeffs = [float(by)]
    elif op == "subtract":
        if n != 2:
            raise UsageError(f"`op` subtract takes two inputs (a − b), got {n}", "pass exactly two diffs, or use `op` add `weights` for more")
        coeffs = [1.0, -1.0]
    else:
        if n < 2:
            raise UsageError(f"`op` add takes two or more inputs, got {n}", "use `op` scale for one")
        if weights is not None and len(weights) != n:
            raise UsageError(f"`weights` gives {len(weights)} weights for {n} inputs", "give one weight per input")
        coeffs = [float(w) for w in weights] if weights is not None else [1.0] * n
    bad = [c for c in coeffs if not math.isfinite(c)]
    if bad:
        raise UsageError(
            f"{'`by`' if op == 'scale' else '`weights`'} must be finite numbers, got {bad[0]}",
            "e.g. `by` -1" if op == "scale" else "e.g. `weights` 1.0,0.5",
        )
    return coeffs


@dataclass(frozen=True)
class CombineReport(StoredCounts):
    output: str
    op: str
    inputs: list[str]
    coefficients: list[float]
    values: str  # "base" or "fp32"
    tensors: list[StoredTensor]
    bytes: int

    def to_json(self) -> dict:
        return {
            "schema": "peftcli.combine/1",
            "output": self.output,
            "op": self.op,
            "inputs": self.inputs,
            "coefficients": self.coefficients,
            "method": METHOD,
            "values": self.values,
            "bytes": self.bytes,
            **stored_summary(self.tensors),
        }


def combine(inputs: Sequence[str], op: str | CombineOptions, out: str, **keywords) -> CombineReport:
    """Write Σ cᵢ·φᵢ of the ``.diff`` files ``inputs`` (cᵢ from ``op``, ``by``, ``weights``) to ``out``.

    ``op``: a ``CombineOptions``, or the operation with the other options as ``keywords``
    (``by=``, ``weights=``, ``values=``, ``force=``). ``values`` ("base" or "fp32") is the stored
    value dtype; by default fp32 when any input stores fp32 values for a narrower (or wider)
    base tensor, else the base dtype.
    """
    opts = op if isinstance(op, CombineOptions) else CombineOptions(op, **keywords)
    if keywords and op is opts:
        raise TypeError(f"combine() takes options or keywords, not both: {sorted(keywords)}")
    inputs = list(inputs)
    coeffs = coefficients(opts.op, len(inputs), opts.by, opts.weights)
    values, force = opts.values, opts.force
    if not out.endswith(".diff"):
        raise UsageError(f"output {out} must be a .diff file", "name it e.g. combined.diff")
    check_output_path(out, inputs, force)  # fail before any work
    diffs: list[SparseDiff] = []
    try:
        for path in inputs:
            diffs.append(read_diff(path))
        fingerprint = _common_fingerprint(diffs)
        if values is None:
            values = "fp32" if any(_stores_fp32(d) for d in diffs) else "base"
        plan = _plan(diffs, coeffs, values)
        provenance = {
            "tool": "peftcli",
            "version": __version__,
            "command": "combine",
            "inputs": recorded_inputs({f"input{i + 1}": p for i, p in enumerate(inputs)}, out),
            "input_hashes": {f"input{i + 1}": file_hashes(d.ckpt) for i, d in enumerate(diffs)},
            "options": {"op": opts.op, "by": opts.by, "weights": _listed(opts.weights), "coefficients": coeffs},
        }
        stored = write_diff(out, plan, DiffMetadata(METHOD, fingerprint, provenance), values=values, force=force, inputs=inputs)
    finally:
        for d in diffs:
            d.close()
    return CombineReport(out, opts.op, inputs, coeffs, values, stored, os.path.getsize(out))


def _listed(weights: Sequence[float] | None) -> list[float] | None:
    return list(weights) if weights is not None else None


# -- checks on the inputs ----------------------------------------------------------------------


def _common_fingerprint(diffs: list[SparseDiff]) -> Fingerprint:
    """The inputs' shared base fingerprint; refuses inputs made from different bases."""
    first = diffs[0]
    for d in diffs[1:]:
        if d.fingerprint.hash != first.fingerprint.hash:
            raise BadInputError(
                f"{first.path} and {d.path} were made from different bases "
                f"(base fingerprints {first.fingerprint.hash[:12]}… and {d.fingerprint.hash[:12]}…)",
                "combine only diffs of one base checkpoint",
            )
    seen: dict[frozenset, SparseDiff] = {}  # covered tensors -> the first input with a content hash over them
    for d in diffs:
        if d.fingerprint.content is None:
            continue
        other = seen.setdefault(frozenset(d.names), d)
        if other.fingerprint.content != d.fingerprint.content:
            raise BadInputError(
                f"{other.path} and {d.path} were made from bases with the same tensors but different values "
                "(their content hashes differ)",
                "combine only diffs of one base checkpoint",
            )
    contents = {d.fingerprint.content for d in diffs}
    covers = {frozenset(d.names) for d in diffs}
    content = first.fingerprint.content if len(contents) == 1 and len(covers) == 1 else None
    return Fingerprint(first.fingerprint.tensors, first.fingerprint.hash, content)


def _stores_fp32(d: SparseDiff) -> bool:
    """Whether ``d`` keeps F32 values for some tensor whose base dtype is narrower or wider."""
    for name, (dtype, _) in d.shapes.items():
        stored = d.ckpt.tensors[name if d.is_dense(name) else name + VAL].dtype
        if stored == "F32" and dtype != "F32":
            return True
    return False


# -- the combined tensors ----------------------------------------------------------------------


def _plan(diffs: list[SparseDiff], coeffs: list[float], values: str) -> list[DiffEntry]:
    """Pass 1: each covered tensor's kept count, and how to produce its values in pass 2."""
    names = sorted({n for d in diffs for n in d.names})
    entries = []
    for name in names:
        dtype, shape = next(d.shapes[name] for d in diffs if name in d.shapes)
        parts = [(d, c) for d, c in zip(diffs, coeffs) if name in d.shapes]
        whole = all(name in d.dense_tensors for d, _ in parts)
        vdt = "F32" if values == "fp32" else dtype
        produce = functools.partial(_combined, name, parts, dtype, shape, whole, vdt)
        entries.append(DiffEntry(name, dtype, tuple(shape), produce()[1].numel(), produce, whole=whole))
    return entries


def _combined(
    name: str, parts: list[tuple[SparseDiff, float]], dtype: str, shape: tuple[int, ...], whole: bool, vdt: str
) -> tuple["torch.Tensor | None", "torch.Tensor"]:
    """Σ cᵢ·φᵢ for one tensor: ``(None, dense φ)`` for a whole tensor, else ``(idx, val)`` without zeros."""
    import torch

    work = torch.float64 if dtype == "F64" else torch.float32
    if whole:  # every entry, zeros included
        acc = torch.zeros(math.prod(shape), dtype=work)
        for d, c in parts:
            idx, val = d.get(name)  # dense as peftcli writes whole tensors; a sparse form is read as such
            val = _scaled(_finite(d, name, val.reshape(-1)), c, work)
            if idx is None:
                acc += val
            else:
                acc[idx.long()] += val
        return None, _cast(acc, vdt, name).view(shape)
    sparse = [_entries(d, name) + (c,) for d, c in parts]
    union = torch.unique(torch.cat([idx for idx, _, _ in sparse]))  # sorted
    acc = torch.zeros(union.numel(), dtype=work)
    for idx, val, c in sparse:  # in input order: the same sum on every run
        acc[torch.searchsorted(union, idx)] += _scaled(val, c, work)  # an input's indices are distinct
    result = _cast(acc, vdt, name)
    keep = result != 0
    return union[keep], result[keep]


def _entries(d: SparseDiff, name: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One input's entries of a tensor as (int64 indices, values); a dense one gives its nonzeros."""
    idx, val = d.get(name)
    val = _finite(d, name, val.reshape(-1))
    if idx is None:
        idx = val.nonzero().view(-1)
        return idx, val[idx]
    return idx.long(), val


def _finite(d: SparseDiff, name: str, val: "torch.Tensor") -> "torch.Tensor":
    import torch

    finite = torch.isfinite(val)
    if not bool(finite.all()):
        raise BadInputError(
            f"{d.path}: tensor {name!r} holds NaN or Inf at {val.numel() - int(finite.sum())} of {val.numel()} stored values",
            "a diff with NaN or Inf cannot be combined; peftcli check finds them",
        )
    return val


def _scaled(val: "torch.Tensor", c: float, work: "torch.dtype") -> "torch.Tensor":
    import torch

    v = val.to(work)
    return v if c == 1.0 else v * torch.tensor(c, dtype=work)  # c rounded to the working precision once


def _cast(acc: "torch.Tensor", vdt: str, name: str) -> "torch.Tensor":
    """The sum in the stored value dtype, refused where it overflows that dtype."""
    import torch

    from peftcli.checkpoint.dtypes import torch_dtype

    out = acc.to(torch_dtype(vdt))
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        raise BadInputError(
            f"tensor {name!r}: the combined φ overflows {vdt} at {out.numel() - int(finite.sum())} of {out.numel()} entries",
            "pass `values` fp32, or use smaller weights",
        )
    return out
