"""The sparse task-diff format ``.diff``, version 1: reading, validating, writing, applying.

A ``.diff`` holds φ = θ_ft − θ₀ for some tensors of a base checkpoint. It is one safetensors file
(8-byte little-endian header length, JSON header, data buffer), so any safetensors reader opens it.

Tensors. Every *covered* base tensor ``W`` (a floating-point tensor: F16, BF16, F32 or F64) appears
in exactly one of two forms, and the file holds nothing else:

- sparse: ``W.idx`` and ``W.val``. ``W.idx`` is 1-D, dtype I32 when ``numel(W) < 2**31`` and I64
  otherwise (readers accept either), holding flat indices into ``W.flatten()`` (row-major), sorted
  strictly increasing, each in ``[0, numel(W))``. ``W.val`` is 1-D of the same length, the values
  of φ at those indices, in a floating dtype: the base dtype by default, or F32. φ is 0 elsewhere.
- dense: ``W`` with the base tensor's shape, in a floating dtype (base dtype or F32): the whole φ.

peftcli writes a tensor dense when it is not selected from (by default the 0-D and 1-D tensors:
biases, norms) or whenever the dense form takes no more bytes than ``idx`` + ``val``; it writes the
tensors in sorted name order, ``W.idx`` before ``W.val`` (readers must not rely on the order). No two
covered tensors may be named ``W`` and ``W.idx`` (or ``W.val``): the stored names would be ambiguous.

``__metadata__`` (string → string; JSON values are compact, keys sorted):

- ``format`` (required): ``"peftcli.sparse-diff"``.
- ``version`` (required): ``"1"``. Readers refuse other versions.
- ``method`` (required): how entries were chosen: ``"magnitude"`` (the top-K entries by |φ|),
  ``"full"`` (every entry); other producers name theirs (``"diff-pruning"``, ``"lt-sft"``).
- ``density`` (required): a decimal, kept entries / numel summed over the covered tensors that are
  not in ``dense_tensors`` (``1.0`` for ``full``). Tensors stored dense only because that is smaller
  count their kept entries, not their numel.
- ``shapes`` (required): JSON ``{W: [dtype, shape]}`` for every covered tensor: the *base* tensor's
  dtype and shape (the stored values may be F32).
- ``base_fingerprint`` (required): JSON ``{"tensors": {name: [dtype, shape]} for every tensor of the
  base, "hash": ..., "content": ... or null}``. ``hash`` is the sha256 (hex) of the UTF-8 text
  ``json.dumps([[name, dtype, shape], ...], separators=(",", ":"), ensure_ascii=False)``, the list
  sorted by name; ``content`` the sha256 (hex) of the raw little-endian bytes of the base's covered
  tensors (those in ``shapes``) concatenated in sorted name order.
- ``dense_tensors`` (optional, default ``[]``): JSON list of covered tensors stored whole without
  selection; they are left out of ``density``.
- ``provenance`` (optional): JSON object; peftcli writes ``{"tool", "version", "command",
  "inputs": {role: path}, "input_hashes": {role: {weight file: sha256 of its bytes}}, "options"}``.
  Other keys are free-form; ``inputs`` and ``input_hashes``, when present, must have these types.
- ``task_head`` (optional): JSON ``{"architecture": head class, "tensors": {name: [dtype, shape]},
  "labels": [label names in index order], "problem_type": str or null, "pad_token_id": int or
  null}``: the fine-tune was the base's architecture with a task head (a classifier; see
  ``peftcli.heads``). φ then covers the body under the base's names, and each head tensor is
  stored whole under its name in the head model (``classifier.weight``), with its own values
  (a new head has no θ₀), in the dtype and shape listed; the head is outside ``shapes``,
  ``dense_tensors`` and ``density``. Head names may not be base tensors or stored φ names.
  Readers that predate the key refuse such a file (its head tensors are not accounted for).

Applying to a base: check first that the base's tensors equal ``base_fingerprint.tensors`` (and,
when asked, that their content hash matches); then for each covered ``W``: θ = θ₀ + φ, computed in
fp32 (fp64 for an F64 base) and cast back to the base dtype once, at the listed indices (sparse) or
everywhere (dense). Other tensors are unchanged.

Readers reject, each with one error naming the file and the tensor: a missing or unknown
``format``/``version``; a malformed ``task_head`` or a head tensor missing, clashing or not as
listed; a missing or malformed required key; a fingerprint whose hash does not
match its tensor list, or that disagrees with ``shapes``; a covered tensor with neither form, or
with both; ``idx`` without ``val`` or the reverse; an ``idx`` that is not 1-D I32/I64, or whose
length differs from ``val``'s; values that are not 1-D (sparse) or not of the recorded shape
(dense), or not floating-point; any tensor the metadata does not account for; and, when the
tensor is read, indices that are unsorted, duplicated or outside ``[0, numel)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from peftcli.checkpoint.fingerprint import Fingerprint, content_hash, is_dtype_shape, summarize_differences
from peftcli.checkpoint.reader import Checkpoint, list_tensors_hint, open_checkpoint
from peftcli.checkpoint.safetensors_format import DTYPES, size_problem
from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec
from peftcli.errors import BadInputError, UsageError
from peftcli.heads import TaskHead

if TYPE_CHECKING:
    import torch

FORMAT = "peftcli.sparse-diff"
VERSION = "1"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # the dtypes a covered tensor and stored values may have
INDEX_DTYPES = ("I32", "I64")
VALUES = ("base", "fp32")  # --values: store φ in the base tensor's dtype or in F32
IDX, VAL = ".idx", ".val"
TOP_NORMS = 10  # describe() lists this many tensors with the largest nonzero ‖φ‖
CORRUPT = "the file is corrupt"
VALUES_HINT = "base stores φ in each base tensor's dtype, fp32 in float32"


def index_dtype(numel: int) -> str:
    """I32 while every flat index fits, I64 from 2**31 elements on."""
    return "I32" if numel < 2**31 else "I64"


def value_dtype(base_dtype: str, values: str) -> str:
    return "F32" if values == "fp32" else base_dtype


def _nbytes(dtype: str, n: int) -> int:
    return DTYPES[dtype][0] * n // 8


def stored_dense(numel: int, kept: int, whole: bool, vdtype: str) -> bool:
    """Whole tensors are dense; a selected one is dense when that takes no more bytes than idx + val."""
    if whole:
        return True
    return _nbytes(vdtype, numel) <= _nbytes(index_dtype(numel), kept) + _nbytes(vdtype, kept)


def index_problem(idx: "torch.Tensor", numel: int) -> str | None:
    """Why ``idx`` is not a valid index list for a tensor of ``numel`` elements, or None."""
    if idx.numel() == 0:
        return None
    idx = idx.long()  # int32 differences of corrupt indices could wrap around and look sorted
    steps = idx[1:] - idx[:-1]
    if steps.numel() and not bool((steps > 0).all()):
        pos = int((steps <= 0).nonzero()[0, 0])
        kind = "duplicate" if int(steps[pos]) == 0 else "unsorted"
        return f"{kind} index {int(idx[pos + 1])} at position {pos + 1} (indices must be strictly increasing)"
    if int(idx[0]) < 0 or int(idx[-1]) >= numel:
        bad = int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])
        return f"index {bad} is out of range for {numel} elements"
    return None


# -- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffEntry:
    """One covered tensor to write; ``values`` is called once, in file order, when its turn comes.

    ``values()`` returns ``(idx, val)``, sorted flat indices and the φ values there (``kept`` of
    each), or ``(None, phi)``, the dense φ (only when ``kept`` is the tensor's numel).
    """

    name: str
    dtype: str  # the base tensor's dtype
    shape: tuple[int, ...]
    kept: int  # entries of φ kept
    values: Callable[[], tuple["torch.Tensor | None", "torch.Tensor"]] = field(repr=False, compare=False)
    whole: bool = False  # stored dense without selection: listed in dense_tensors, left out of density

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DiffMetadata:
    method: str
    base_fingerprint: Fingerprint
    provenance: dict
    task_head: "TaskHead | None" = None  # a head stored whole beside φ (its values from ``head_values``)


@dataclass(frozen=True)
class StoredTensor:
    """How one covered tensor went into the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kept: int
    whole: bool
    dense: bool
    value_dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "numel": self.numel,
            "kept": self.kept,
            "density": self.kept / self.numel if self.numel else 0.0,
            "stored": "dense" if self.dense else "sparse",
            "whole": self.whole,
            "value_dtype": self.value_dtype,
            "bytes": self.nbytes,
        }


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def stored_summary(stored: Sequence[StoredTensor]) -> dict:
    """What a report says about written tensors: kept K of N selectable entries, density, which are whole."""
    k = sum(t.kept for t in stored if not t.whole)
    n = sum(t.numel for t in stored if not t.whole)
    return {
        "k": k,
        "n": n,
        "density": k / n if n else 0.0,
        "dense_tensors": [t.name for t in stored if t.whole],
        "tensors": [t.to_json() for t in stored],
    }


class StoredCounts:
    """The ``k`` and ``n`` of ``stored_summary`` for a report on the ``tensors`` it wrote."""

    tensors: list[StoredTensor]

    @property
    def k(self) -> int:
        return stored_summary(self.tensors)["k"]

    @property
    def n(self) -> int:
        return stored_summary(self.tensors)["n"]


def density_of(stored: Iterable[StoredTensor]) -> float:
    """Kept entries / numel over the tensors that were selected from (see the module docstring)."""
    selected = [s for s in stored if not s.whole]
    n = sum(s.numel for s in selected)
    return sum(s.kept for s in selected) / n if n else 0.0


def _plan(entries: Sequence[DiffEntry], values: str) -> list[StoredTensor]:
    out = []
    for e in entries:
        if e.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{e.name}: only floating-point tensors can be in a diff, not {e.dtype}")
        if not 0 <= e.kept <= e.numel or (e.whole and e.kept != e.numel):
            raise ValueError(f"{e.name}: kept={e.kept} is impossible for {e.numel} elements")
        vdt = value_dtype(e.dtype, values)
        dense = stored_dense(e.numel, e.kept, e.whole, vdt)
        nbytes = _nbytes(vdt, e.numel) if dense else _nbytes(index_dtype(e.numel), e.kept) + _nbytes(vdt, e.kept)
        out.append(StoredTensor(e.name, e.dtype, tuple(e.shape), e.kept, e.whole, dense, vdt, nbytes))
    return out


def _specs(plan: list[StoredTensor], head: "TaskHead | None" = None, base_names: Iterable[str] = ()):
    specs = []
    for p in plan:
        if p.dense:
            specs.append(TensorSpec(p.name, p.value_dtype, p.shape))
        else:
            specs.append(TensorSpec(p.name + IDX, index_dtype(p.numel), (p.kept,)))
            specs.append(TensorSpec(p.name + VAL, p.value_dtype, (p.kept,)))
    recorded = {p.name for p in plan}
    clashes = sorted(n for n in recorded if n + IDX in recorded or n + VAL in recorded)
    if clashes:  # a reader could not tell W.idx the tensor from W's indices
        other = clashes[0] + (IDX if clashes[0] + IDX in recorded else VAL)
        raise BadInputError(
            f"tensors {clashes[0]!r} and {other!r} cannot both be in a diff",
            f"their names would be ambiguous next to {IDX}/{VAL} entries",
        )
    if head is not None:
        stored, base_names = {s.name for s in specs}, set(base_names)
        clash = sorted(n for n in head.tensors if n in stored or n in base_names)
        if clash:
            raise BadInputError(
                f"task head tensor {clash[0]!r} has the name of a base tensor or of a stored φ",
                "a head model's head must have names of its own",
            )
        specs += [TensorSpec(n, d, s) for n, (d, s) in sorted(head.tensors.items())]
    return specs


def _to_stored(p: StoredTensor, idx: "torch.Tensor | None", val: "torch.Tensor") -> list[tuple[str, "torch.Tensor"]]:
    """Check what a producer returned and convert it to the planned form."""
    import torch

    from peftcli.checkpoint.dtypes import torch_dtype

    vdt = torch_dtype(p.value_dtype)
    if idx is None:
        if tuple(val.shape) != p.shape or p.kept != p.numel:
            raise ValueError(f"{p.name}: dense values of shape {list(val.shape)} for {p.kept} kept of {list(p.shape)}")
        return [(p.name, val.to(vdt).contiguous())]
    idx, val = idx.reshape(-1), val.reshape(-1)
    if idx.numel() != p.kept or val.numel() != p.kept:
        raise ValueError(f"{p.name}: {idx.numel()} indices and {val.numel()} values, but {p.kept} were planned")
    problem = index_problem(idx, p.numel)
    if problem:
        raise ValueError(f"{p.name}: {problem}")
    if p.dense:
        dense = torch.zeros(p.numel, dtype=vdt)
        dense[idx.long()] = val.to(vdt)
        return [(p.name, dense.view(p.shape))]
    return [(p.name + IDX, idx.to(torch_dtype(index_dtype(p.numel)))), (p.name + VAL, val.to(vdt))]


def write_diff(
    path: str,
    entries: Sequence[DiffEntry],
    metadata: DiffMetadata,
    *,
    values: str = "base",
    force: bool = False,
    inputs: Iterable[str] = (),
    head_values: "Callable[[str], torch.Tensor] | None" = None,
) -> list[StoredTensor]:
    """Write ``entries`` (in the order given) as a ``.diff`` at ``path``, atomically.

    The header comes from the entries' kept counts, so it is written first and each entry's
    values are then produced, converted and written one at a time; then the task head's
    tensors (``metadata.task_head``), each from ``head_values(name)``.
    """
    if values not in VALUES:
        raise UsageError(f"`values` must be one of {', '.join(VALUES)}, got {values!r}", VALUES_HINT)
    plan = _plan(entries, values)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": metadata.method,
        "density": repr(density_of(plan)),
        "shapes": _dumps({p.name: [p.dtype, list(p.shape)] for p in plan}),
        "base_fingerprint": _dumps(metadata.base_fingerprint.to_json()),
        "dense_tensors": _dumps([p.name for p in plan if p.whole]),
        "provenance": _dumps(metadata.provenance),
    }
    head = metadata.task_head
    if head is not None:
        meta["task_head"] = _dumps(head.to_json())
    specs = _specs(plan, head, metadata.base_fingerprint.tensors)
    with CheckpointWriter(path, specs, metadata=meta, inputs=inputs, force=force, single_file=True) as w:
        for p, entry in zip(plan, entries):
            idx, val = entry.values()
            for name, tensor in _to_stored(p, idx, val):
                w.write(name, tensor)
            del idx, val  # one tensor's values alive at a time
        if head is not None:
            from peftcli.checkpoint.dtypes import torch_dtype

            for name, (dtype, _) in sorted(head.tensors.items()):
                w.write(name, head_values(name).to(torch_dtype(dtype)).contiguous())
    return plan


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    dtype: str
    shape: tuple[int, ...]
    dense: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SparseDiff:
    """A validated, lazily read ``.diff``: the header is checked on opening, each tensor when read."""

    def __init__(self, ckpt: Checkpoint, owns: bool = False):
        self.ckpt = ckpt
        self.path = ckpt.path
        self._owns = owns
        meta = ckpt.metadata
        self.version = _check_format(self.path, meta)
        self.method = _required(self.path, meta, "method")
        self.density = _parse_density(self.path, _required(self.path, meta, "density"))
        self.shapes = _parse_shapes(self.path, _json(self.path, meta, "shapes"))
        self.fingerprint = Fingerprint.from_json(_json(self.path, meta, "base_fingerprint"), self.path)
        self.dense_tensors = _parse_name_list(self.path, _json(self.path, meta, "dense_tensors", []), self.shapes)
        self.provenance = _parse_provenance(self.path, _json(self.path, meta, "provenance", {}))
        self.task_head = _parse_task_head(self.path, meta)
        self._check_fingerprint_covers_shapes()
        self._layout = self._check_tensors()

    # -- metadata ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def is_dense(self, name: str) -> bool:
        return self._layout[self._known(name)].dense

    def _known(self, name: str) -> str:
        if name not in self._layout:
            raise BadInputError(f"{self.path}: the diff has no tensor {name!r}", list_tensors_hint(self.path))
        return name

    def _check_fingerprint_covers_shapes(self) -> None:
        for name, (dtype, shape) in self.shapes.items():
            base = self.fingerprint.tensors.get(name)
            if base is None or base[0] != dtype or tuple(base[1]) != shape:
                raise BadInputError(
                    f"{self.path}: tensor {name!r} is {dtype}{list(shape)} in 'shapes' but "
                    f"{'absent' if base is None else base[0] + str(list(base[1]))} in base_fingerprint",
                    CORRUPT,
                )

    def _check_tensors(self) -> dict[str, _Layout]:
        stored = self.ckpt.tensors
        claimed: set[str] = set()
        layout = {}
        for name, (dtype, shape) in self.shapes.items():
            has_dense, has_idx, has_val = name in stored, name + IDX in stored, name + VAL in stored
            where = f"{self.path}: tensor {name!r}"
            if has_dense and (has_idx or has_val):
                raise BadInputError(f"{where} is stored both dense and as {name}{IDX}/{VAL}", CORRUPT)
            if not (has_dense or has_idx or has_val):
                raise BadInputError(
                    f"{where} is recorded in the metadata but missing (neither {name!r} nor {name + IDX!r} is in the file)",
                    CORRUPT,
                )
            if has_idx != has_val:
                have, lack = (IDX, VAL) if has_idx else (VAL, IDX)
                raise BadInputError(f"{where}: {name + have!r} has no matching {name + lack!r}", CORRUPT)
            parts = [name] if has_dense else [name + IDX, name + VAL]
            if claimed & set(parts):
                raise BadInputError(f"{where}: stored name {parts[0]!r} is claimed by two recorded tensors", CORRUPT)
            claimed.update(parts)
            if has_dense:
                self._check_dense(name, dtype, shape)
            else:
                self._check_sparse(name, shape)
            layout[name] = _Layout(dtype, shape, has_dense)
        claimed |= self._check_head(claimed)
        extra = sorted(set(stored) - claimed)
        if extra:
            raise BadInputError(
                f"{self.path}: tensor {extra[0]!r} is not accounted for by the 'shapes' metadata ({len(extra)} such)",
                CORRUPT,
            )
        return layout

    def _check_head(self, claimed: set[str]) -> set[str]:
        """The task head's tensors: stored as listed, with names of their own."""
        if self.task_head is None:
            return set()
        for name, (dtype, shape) in sorted(self.task_head.tensors.items()):
            where = f"{self.path}: task head tensor {name!r}"
            if name in claimed or name in self.fingerprint.tensors:
                raise BadInputError(f"{where} has the name of a base tensor or of a stored φ", CORRUPT)
            info = self.ckpt.tensors.get(name)
            if info is None:
                raise BadInputError(f"{where} is listed in task_head but missing", CORRUPT)
            if info.dtype != dtype or info.shape != shape:
                raise BadInputError(f"{where} is {info.dtype}{list(info.shape)}, task_head lists {dtype}{list(shape)}", CORRUPT)
        return set(self.task_head.tensors)

    def _check_dense(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        info = self.ckpt.tensors[name]
        if info.shape != shape:
            raise BadInputError(
                f"{self.path}: tensor {name!r}: dense values have shape {list(info.shape)}, recorded {list(shape)}", CORRUPT
            )
        if info.dtype not in FLOAT_DTYPES:
            raise BadInputError(f"{self.path}: tensor {name!r}: dense values are {info.dtype}, not floating-point", CORRUPT)

    def _check_sparse(self, name: str, shape: tuple[int, ...]) -> None:
        idx, val = self.ckpt.tensors[name + IDX], self.ckpt.tensors[name + VAL]
        where = f"{self.path}: tensor {name!r}"
        if idx.dtype not in INDEX_DTYPES or len(idx.shape) != 1:
            raise BadInputError(f"{where}: {name + IDX!r} must be 1-D I32 or I64, not {idx.dtype}{list(idx.shape)}", CORRUPT)
        if val.dtype not in FLOAT_DTYPES or len(val.shape) != 1:
            raise BadInputError(
                f"{where}: {name + VAL!r} must be 1-D floating-point, not {val.dtype}{list(val.shape)}", CORRUPT
            )
        if idx.shape != val.shape:
            raise BadInputError(f"{where}: {idx.shape[0]} indices but {val.shape[0]} values", CORRUPT)
        if idx.shape[0] > math.prod(shape):
            raise BadInputError(f"{where}: {idx.shape[0]} indices for {math.prod(shape)} elements", CORRUPT)

    # -- tensors ----------------------------------------------------------------------------
    def get(self, name: str) -> tuple["torch.Tensor | None", "torch.Tensor"]:
        """``(idx, val)`` for a sparse tensor (indices checked here), ``(None, phi)`` for a dense one."""
        lay = self._layout[self._known(name)]
        if lay.dense:
            return None, self.ckpt.get(name)
        idx, val = self.ckpt.get(name + IDX), self.ckpt.get(name + VAL)
        problem = index_problem(idx, lay.numel)
        if problem:
            raise BadInputError(f"{self.path}: tensor {name!r}: {problem}", CORRUPT)
        return idx, val

    def get_head(self, name: str) -> "torch.Tensor":
        """A task head tensor's values (named as in the head model)."""
        if self.task_head is None or name not in self.task_head.tensors:
            raise BadInputError(f"{self.path}: the diff has no task head tensor {name!r}", f"see its head with peftcli inspect {self.path}")
        return self.ckpt.get(name)

    def validate(self) -> None:
        """Read every tensor once, so that a corrupt index list anywhere is found now."""
        for name in self.names:
            self.get(name)

    def apply_to(self, name: str, base: "torch.Tensor") -> "torch.Tensor":
        """θ₀ + φ for tensor ``name``, in the base dtype (a new tensor; ``base`` is not changed)."""
        from peftcli.checkpoint.dtypes import safetensors_dtype

        lay = self._layout[self._known(name)]
        if tuple(base.shape) != lay.shape or safetensors_dtype(base.dtype) != lay.dtype:
            raise BadInputError(
                f"{self.path}: tensor {name!r} is {lay.dtype}{list(lay.shape)} in the diff but "
                f"{safetensors_dtype(base.dtype)}{list(base.shape)} in the base",
                "apply the diff to the base it was made from",
            )
        from peftcli.checkpoint.dtypes import plus_base, work_dtype

        work = work_dtype(base.dtype)  # fp32, fp64 for F64: holds the base exactly; cast once
        idx, val = self.get(name)
        if idx is None:  # where φ is 0, the base's own bits (−0.0 included)
            return plus_base(val.to(work, copy=True).view(base.shape), base).to(base.dtype)
        out = base.clone().contiguous()
        flat = out.view(-1)
        where = idx.long()
        flat[where] = plus_base(val.to(work, copy=True), flat[where]).to(base.dtype)
        return out

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns:
            self.ckpt.close()

    def __enter__(self) -> "SparseDiff":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_diff(path: str) -> SparseDiff:
    """Open and validate the header of the ``.diff`` at ``path`` (tensors are read on demand)."""
    ckpt = open_checkpoint(path)
    try:
        return SparseDiff(ckpt, owns=True)
    except BaseException:
        ckpt.close()
        raise


def check_base(diff: SparseDiff, base: Checkpoint, content: bool = False) -> None:
    """Refuse a base whose tensors (and, with ``content``, bytes) differ from the diff's fingerprint."""
    differences = diff.fingerprint.differences(base)
    if differences:
        raise BadInputError(
            f"{base.path} is not the base {diff.path} was made from: {summarize_differences(differences)}",
            "use the base checkpoint the diff was computed from",
        )
    if content:
        if diff.fingerprint.content is None:
            raise BadInputError(f"{diff.path}: the fingerprint has no content hash to check", "check names and shapes only")
        if content_hash(base, diff.names) != diff.fingerprint.content:
            raise BadInputError(
                f"{base.path}: the covered tensors' bytes differ from those {diff.path} was made from",
                "the base has the right shapes but other values: use the exact base checkpoint",
            )


def describe(ckpt: Checkpoint) -> dict:
    """What ``peftcli inspect`` adds for a ``.diff``: method, densities, fingerprint, largest ‖φ‖.

    Reads every stored tensor once (a diff is small next to its base), so it also validates them.
    """
    diff = SparseDiff(ckpt)
    rows = []
    for name in diff.names:
        idx, val = diff.get(name)
        dtype, shape = diff.shapes[name]
        numel = math.prod(shape)
        nonzero = int(val.count_nonzero())
        rows.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": list(shape),
                "stored": "dense" if idx is None else "sparse",
                "value_dtype": ckpt.tensors[name if idx is None else name + VAL].dtype,
                "entries": numel if idx is None else int(idx.numel()),
                "nonzero": nonzero,
                "density": nonzero / numel if numel else 0.0,
                "norm": float(val.double().norm()),
            }
        )
    largest = sorted((r for r in rows if r["norm"] > 0), key=lambda r: (-r["norm"], r["name"]))[:TOP_NORMS]
    fp = diff.fingerprint
    return {
        "method": diff.method,
        "version": diff.version,
        "density": diff.density,
        "num_tensors": len(rows),
        "covered_params": sum(math.prod(s) for _, s in diff.shapes.values()),
        "dense_tensors": diff.dense_tensors,
        "base_fingerprint": {"num_tensors": len(fp.tensors), "hash": fp.hash, "content": fp.content},
        "tensors": rows,
        "largest": [{"name": r["name"], "norm": r["norm"]} for r in largest],
        "provenance": diff.provenance,
        "task_head": diff.task_head.to_json() if diff.task_head is not None else None,
    }


# -- metadata parsing --------------------------------------------------------------------------


def _check_format(path: str, meta: dict[str, str]) -> str:
    fmt = meta.get("format")
    if fmt != FORMAT:
        found = "no 'format' in its metadata" if fmt is None else f"its metadata says format={fmt!r}"
        raise BadInputError(
            f"{path}: not a peftcli sparse diff ({found})", f"expected format={FORMAT!r}; write one with peftcli diff"
        )
    version = meta.get("version")
    if version is None:
        raise BadInputError(f"{path}: sparse diff without a 'version' in its metadata", CORRUPT)
    if version != VERSION:
        raise BadInputError(
            f"{path}: sparse diff version {version!r} is not supported (this peftcli reads version {VERSION})",
            "upgrade peftcli",
        )
    return version


def _required(path: str, meta: dict[str, str], key: str) -> str:
    if key not in meta:
        raise BadInputError(f"{path}: sparse diff without {key!r} in its metadata", CORRUPT)
    return meta[key]


def _json(path: str, meta: dict[str, str], key: str, default: object = None) -> object:
    if key not in meta and default is not None:
        return default
    text = _required(path, meta, key)
    try:
        return json.loads(text)
    except ValueError as exc:  # not JSON, or an integer of over 4300 digits
        raise BadInputError(f"{path}: metadata {key!r} is not valid JSON: {exc}", CORRUPT) from None
    except RecursionError:
        raise BadInputError(f"{path}: metadata {key!r} is JSON nested too deeply", CORRUPT) from None


def _parse_density(path: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise BadInputError(f"{path}: metadata density {text!r} is not a number in [0, 1]", CORRUPT)
    return value


def _parse_shapes(path: str, obj: object) -> dict[str, tuple[str, tuple[int, ...]]]:
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: metadata 'shapes' must be a JSON object", CORRUPT)
    out = {}
    for name, entry in obj.items():
        if not is_dtype_shape(entry) or entry[0] not in FLOAT_DTYPES:
            raise BadInputError(
                f"{path}: tensor {name!r} has an invalid 'shapes' entry {entry!r}", "expected [F16|BF16|F32|F64, shape]"
            )
        too_large = size_problem(entry[0], tuple(entry[1]))
        if too_large:  # a sparse tensor's shape is only here: nothing else bounds it
            raise BadInputError(f"{path}: tensor {name!r} in 'shapes': {too_large}", CORRUPT)
        out[name] = (entry[0], tuple(entry[1]))
    return out


def recorded_inputs(paths: dict[str, str], out: str) -> dict[str, str]:
    """Input paths as a ``.diff``'s provenance records them: relative to the diff's own
    directory, so the same diff made in two places (same layout) has the same bytes, and a
    reader can still find the base from wherever the diff is (``resolve_recorded``)."""
    where = os.path.dirname(os.path.abspath(out))
    return {k: os.path.relpath(os.path.abspath(p), where) for k, p in paths.items()}


def resolve_recorded(path: str | None, diff_path: str) -> str | None:
    """A path a ``.diff`` recorded, as a path from here (older diffs recorded absolute paths)."""
    if not isinstance(path, str) or not path:
        return None
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(diff_path)), path))


def _parse_provenance(path: str, obj: object) -> dict:
    """Free-form, except that the keys peftcli writes (and reads back) have their documented types."""
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: metadata 'provenance' must be a JSON object", CORRUPT)
    inputs = obj.get("inputs")
    if inputs is not None and not (isinstance(inputs, dict) and all(isinstance(v, str) for v in inputs.values())):
        raise BadInputError(f"{path}: metadata provenance 'inputs' must map roles to paths", CORRUPT)
    hashes = obj.get("input_hashes")
    if hashes is not None and not (
        isinstance(hashes, dict)
        and all(isinstance(h, dict) and all(isinstance(v, str) for v in h.values()) for h in hashes.values())
    ):
        raise BadInputError(f"{path}: metadata provenance 'input_hashes' must map roles to {{file: sha256}}", CORRUPT)
    return obj


def _parse_task_head(path: str, meta: dict[str, str]) -> "TaskHead | None":
    if "task_head" not in meta:
        return None
    return TaskHead.from_json(_json(path, meta, "task_head"), path, CORRUPT)


def _parse_name_list(path: str, obj: object, shapes: dict) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(n, str) for n in obj):
        raise BadInputError(f"{path}: metadata 'dense_tensors' must be a JSON list of names", CORRUPT)
    unknown = [n for n in obj if n not in shapes]
    if unknown:
        raise BadInputError(f"{path}: tensor {unknown[0]!r} is in 'dense_tensors' but not in 'shapes'", CORRUPT)
    return list(obj)
