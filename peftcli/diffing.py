"""Tensor level: the task vector φ = θ_ft − θ₀ of a fine-tuned checkpoint over its base, as a ``.diff``.

Covered tensors: every floating-point tensor (F16, BF16, F32, F64), in sorted name order. The two
checkpoints must have the same tensor names, dtypes and shapes, and their other tensors (integer
buffers, FP8) must be byte-identical, since a diff cannot carry them. A fine-tune that is the
base's architecture with a task head (a classifier: ``bert.encoder...`` + ``classifier.*`` over a
base's ``encoder...``; ``peftcli.heads``) is compared on its body, name by name: φ covers the
base tensors the head model keeps, and the head is stored whole beside φ (``task_head``), outside
the selection and the density. 0-D and 1-D tensors (biases,
norms) are stored whole unless ``sparse_small``; the others are *selected* from:

- global (``density`` or ``top_k``): the K = round(density × N) (half up) or ``top_k`` entries with the
  largest |φ| among the N entries of all selected tensors. |φ| is ranked as fp32; equal magnitudes
  are ordered by tensor (sorted names), then flat index. That is a strict total order, so the kept
  set is unique: exactly its first K entries.
- ``per_tensor``: the same K, apportioned to tensors in proportion to their numel (largest
  remainders; equal remainders go to the earlier tensor), each keeping its first entries in that order.
- ``dense``: every entry (method ``full``).

Streaming: one tensor of each checkpoint is read (memory-mapped) at a time, so memory is O(largest
tensor), plus two histograms (32768 and 65536 counts) and 12 bytes per distinct value in the
boundary bin (at most 65536 per tensor); never O(model). The global top-K is an exact radix select
on the bit patterns of |φ| as fp32, which order as the magnitudes do: pass 1 counts the top 16 bits
(exponent and 7 mantissa bits: log-scale bins, 128 per octave) over all tensors, which puts the K-th
largest magnitude in one bin; pass 2 counts the low 16 bits of the entries in that bin, which gives
the K-th magnitude t exactly, how many entries of each tensor exceed it, and how many ties at t are
needed; pass 3 writes, keeping |φ| > t and the first needed ties. The header lists every tensor's
kept count before any data, hence the passes before writing. Per-tensor and dense selection need
only the write pass. Before the passes, every input weight file is hashed (provenance) and so are
the base's covered tensors (fingerprint).

Exactness of θ₀ + φ at kept entries: with F32 values on an F16/BF16 base the difference is exact
in fp32 (unless θ₀ and θ_ft differ by more than 2¹⁶× in magnitude), so θ_ft comes back bit for
bit. On an F32 base it is exact whenever θ_ft − θ₀ is representable, e.g. always when θ_ft is
within a factor 2 of θ₀ (Sterbenz), and otherwise off by at most 2⁻²⁴·(|φ| + |θ_ft|). Values in
the base dtype round φ to its precision (8 significant bits for BF16, 11 for F16).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Callable

from peftcli import __version__
from peftcli.artifacts.sparse_diff import (
    FLOAT_DTYPES, VALUES, VALUES_HINT, DiffEntry, DiffMetadata, StoredCounts, StoredTensor, recorded_inputs, stored_summary, write_diff,
)
from peftcli.checkpoint.atomic import check_output_path
from peftcli.checkpoint.fingerprint import Fingerprint, file_hashes, summarize_differences, table_differences, tensor_table
from peftcli.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint
from peftcli.errors import BadInputError, UsageError
from peftcli.options import option

if TYPE_CHECKING:
    import torch

    from peftcli.heads import HeadCheckpoint

Progress = Callable[[str, int, int], None]  # (phase, done, total): called as work advances

COARSE_BINS = 1 << 15  # |φ| bits >> 16: the sign bit is 0, so 15 bits remain
FINE_BINS = 1 << 16
LOW_MASK = 0xFFFF
NOTHING = 0x7FFFFFFF  # a cut above every magnitude (NaN bit patterns, which φ never holds)


@dataclass
class DiffOptions:
    density: float | None = option(None, metavar="D", help="keep the fraction D (0 < D ≤ 1) of entries with the largest |φ|")
    top_k: int | None = option(None, metavar="K", help="keep the K entries with the largest |φ|")
    dense: bool = option(False, help="keep every entry: the full task vector (method full)")
    per_tensor: bool = option(False, help="keep the same fraction of each tensor instead of a global top-K")
    sparse_small: bool = option(False, help="select from 1-D tensors (biases, norms) too; by default they are stored whole")
    values: str = option("base", metavar="base|fp32", help="dtype of the stored values: the base tensor's (default) or fp32")

    def __post_init__(self) -> None:
        given = [
            f
            for f, on in (
                ("`density`", self.density is not None),
                ("`top_k`", self.top_k is not None),
                ("`dense`", self.dense),
            )
            if on
        ]
        if len(given) != 1:
            got = f" (got {' and '.join(given)})" if given else ""
            raise UsageError(f"give exactly one of `density`, `top_k` or `dense`{got}", "e.g. `density` 0.01")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise UsageError(f"`density` must be in (0, 1], got {self.density}", "it is the fraction of entries kept: `density` 0.01 keeps 1%")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"`top_k` must be at least 1, got {self.top_k}", "it is the number of entries kept, e.g. `top_k` 1000")
        if self.dense and (self.per_tensor or self.sparse_small):
            raise UsageError(
                "`per_tensor` and `sparse_small` only apply with `density` or `top_k`",
                "`dense` keeps every entry of every tensor",
            )
        if self.values not in VALUES:
            raise UsageError(f"`values` must be one of {', '.join(VALUES)}, got {self.values!r}", VALUES_HINT)

    @property
    def method(self) -> str:
        return "full" if self.dense else "magnitude"

    @property
    def selection(self) -> str:
        return "full" if self.dense else "per-tensor" if self.per_tensor else "global"

    def k_for(self, n: int) -> int:
        """The exact number of entries to keep out of ``n``."""
        if self.dense:
            return n
        if self.top_k is not None:
            if self.top_k > n:
                raise UsageError(
                    f"`top_k` {self.top_k} is more than the {n:,} entries to select from", "use `dense` to keep them all"
                )
            return self.top_k
        k = int((Decimal(repr(self.density)) * n).to_integral_value(ROUND_HALF_UP))  # the decimal the user typed
        if k == 0:
            raise UsageError(f"`density` {self.density} keeps no entry of {n:,}", "raise `density` or use `top_k`")
        return k


@dataclass(frozen=True)
class DiffReport(StoredCounts):
    output: str
    method: str
    selection: str
    values: str
    tensors: list[StoredTensor]
    skipped: list[str]  # non-floating-point tensors (equal in both checkpoints)
    bytes: int
    task_head: dict | None = None  # the fine-tune's head, stored whole (TaskHead.to_json())
    dropped: list[str] = dataclasses.field(default_factory=list)  # base tensors the head model has no place for

    def to_json(self) -> dict:
        return {
            "schema": "peftcli.diff/1",
            "output": self.output,
            "method": self.method,
            "selection": self.selection,
            "values": self.values,
            "skipped": self.skipped,
            "bytes": self.bytes,
            "task_head": self.task_head,
            "dropped": self.dropped,
            **stored_summary(self.tensors),
        }


def diff(
    base: str,
    finetuned: str,
    out: str,
    options: DiffOptions,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> DiffReport:
    """Write φ = ``finetuned`` − ``base`` to the ``.diff`` file ``out``, selected as ``options`` say."""
    if not out.endswith(".diff"):
        raise UsageError(f"output {out} must be a .diff file", "name it e.g. task.diff")
    check_output_path(out, [base, finetuned], force)  # fail before any work
    with open_checkpoint(base, allow_pickle=allow_pickle) as b, open_checkpoint(finetuned, allow_pickle=allow_pickle) as f:
        headed = _head_checkpoint(b, f)
        body = headed.body if headed else f  # the fine-tune's tensors under the base's names
        covered, skipped = _match(b, body, headed.dropped if headed else ())
        selected = [t for t in covered if options.dense or options.sparse_small or len(t.shape) >= 2]
        n = sum(t.numel for t in selected)
        if not n and not options.dense:
            raise UsageError(
                f"{base} has no tensor with two or more dimensions to select from", "add `sparse_small`, or use `dense`"
            )
        k = options.k_for(n)
        provenance = {
            "tool": "peftcli",
            "version": __version__,
            "command": "diff",
            "inputs": recorded_inputs({"base": base, "finetuned": finetuned}, out),
            "input_hashes": {"base": file_hashes(b, progress), "finetuned": file_hashes(f, progress)},
            "options": dataclasses.asdict(options),
        }
        fingerprint = Fingerprint.of(b, [t.name for t in covered], progress)
        entries = _entries(b, body, covered, selected, k, options, progress)
        stored = write_diff(
            out,
            entries,
            DiffMetadata(options.method, fingerprint, provenance, headed.head if headed else None),
            values=options.values,
            force=force,
            inputs=[base, finetuned],
            head_values=functools.partial(_head_values, f) if headed else None,
        )
    head = headed.head.to_json() if headed else None
    return DiffReport(
        out, options.method, options.selection, options.values, stored, skipped, os.path.getsize(out), head,
        headed.dropped if headed else [],
    )


# -- which tensors -----------------------------------------------------------------------------


def _head_checkpoint(base: Checkpoint, ft: Checkpoint) -> "HeadCheckpoint | None":
    """``ft`` as the base's architecture with a task head, when its tensors are not the base's."""
    from peftcli.heads import match_head_checkpoint

    if set(ft.tensors) == set(base.tensors):
        return None
    return match_head_checkpoint(base, ft)


def _head_values(ft: Checkpoint, name: str) -> "torch.Tensor":
    """A head tensor as the fine-tune holds it (a new head's own values: no θ₀ to subtract)."""
    import torch

    value = ft.get(name)
    if not bool(torch.isfinite(value).all()):
        raise BadInputError(f"{ft.path}: task head tensor {name!r} holds NaN or inf", "a checkpoint holds NaN or inf")
    return value


def _match(base: Checkpoint, ft: Checkpoint, dropped=()) -> tuple[list[TensorInfo], list[str]]:
    """The covered tensors (sorted by name) and the others, after checking the checkpoints agree.

    ``dropped``: base tensors the fine-tune (a head model) has no place for; neither covered nor compared.
    """
    mine = {n: t for n, t in tensor_table(base).items() if n not in set(dropped)}
    differences = table_differences(mine, tensor_table(ft), base.path, ft.path)
    if differences:
        raise BadInputError(
            f"{base.path} and {ft.path} do not have the same tensors: {summarize_differences(differences)}",
            "diff needs a fine-tuned copy of the base: the same tensor names, dtypes and shapes",
        )
    covered = [base.tensors[n] for n in sorted(mine) if base.tensors[n].dtype in FLOAT_DTYPES]
    others = sorted(n for n in mine if base.tensors[n].dtype not in FLOAT_DTYPES)
    for name in others:
        if not _same_bytes(base, ft, name):
            raise BadInputError(
                f"{ft.path}: tensor {name!r} ({base.tensors[name].dtype}) differs from the base, "
                "but only floating-point tensors can be diffed",
                "a diff cannot carry changed integer or FP8 tensors",
            )
    return covered, others


def _same_bytes(base: Checkpoint, ft: Checkpoint, name: str) -> bool:
    """Whether tensor ``name`` holds the same bytes in both (F4/F6 too, which torch cannot read)."""
    import torch

    if base.tensors[name].begin is not None and ft.tensors[name].begin is not None:  # not pickle or GGUF
        return base.read_bytes(name) == ft.read_bytes(name)
    return torch.equal(base.get(name).reshape(-1).view(torch.uint8), ft.get(name).reshape(-1).view(torch.uint8))


def _phi(base: Checkpoint, ft: Checkpoint, name: str, check: bool = True) -> "torch.Tensor":
    """Flat φ for one tensor, in fp32 (fp64 for F64 tensors); ``check``: refuse NaN/inf.

    A global selection reads every tensor three times; the first pass checks (the scan cost
    27% of a SmolLM2 diff when every pass did it).

    ``ft`` is a fine-tuned checkpoint, or any object with ``path`` and ``phi(name)`` that
    gives φ itself (``peftcli convert`` passes a folded adapter).
    """
    import torch

    if hasattr(ft, "phi"):
        return ft.phi(name)
    a, b = base.get(name), ft.get(name)
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    phi = (b.to(work) - a.to(work)).reshape(-1)
    if check and not bool(torch.isfinite(phi).all()):
        bad = phi.numel() - int(torch.isfinite(phi).sum())
        raise BadInputError(
            f"{ft.path}: tensor {name!r}: φ = finetuned − base is not finite at {bad} of {phi.numel()} entries",
            "a checkpoint holds NaN or inf",
        )
    return phi


def _magnitude_bits(phi: "torch.Tensor") -> "torch.Tensor":
    """|φ| as fp32 bit patterns (int32): for non-negative floats, bits order as values do."""
    import torch

    return phi.abs().to(torch.float32).view(torch.int32)


# -- selection ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Keep the entries whose magnitude bits exceed ``bits``, and the first ``ties`` equal to it."""

    bits: int
    ties: int

    def keep(self, bits: "torch.Tensor") -> "torch.Tensor":
        """Sorted flat indices of the kept entries."""
        mask = bits > self.bits
        if self.ties:
            mask[(bits == self.bits).nonzero().view(-1)[: self.ties]] = True
        return mask.nonzero().view(-1)


def _boundary(hist: "torch.Tensor", k: int) -> tuple[int, int]:
    """(bin b, count above b) with above < k ≤ above + hist[b]: the bin of the k-th largest (1 ≤ k ≤ total)."""
    import torch

    suffix = hist.flip(0).cumsum(0)  # suffix[j]: count in the top j + 1 bins
    j = int(torch.searchsorted(suffix, torch.tensor(k, dtype=suffix.dtype)))
    b = hist.numel() - 1 - j
    return b, int(suffix[j]) - int(hist[b])


def tensor_cut(bits: "torch.Tensor", k: int) -> Cut:
    """The exact cut keeping the top ``k`` entries of one tensor (radix select in memory)."""
    import torch

    if k == 0:
        return Cut(NOTHING, 0)
    hi = bits >> 16
    b, above = _boundary(torch.bincount(hi, minlength=COARSE_BINS), k)
    low = bits[hi == b] & LOW_MASK
    lo, above_in_bin = _boundary(torch.bincount(low, minlength=FINE_BINS), k - above)
    return Cut((b << 16) | lo, k - above - above_in_bin)


def apportion(k: int, sizes: list[int]) -> list[int]:
    """Split ``k`` in proportion to ``sizes`` exactly: largest remainders, earlier first on ties."""
    n = sum(sizes)
    shares = [k * s // n for s in sizes]
    remainders = [k * s % n for s in sizes]
    for i in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[: k - sum(shares)]:
        shares[i] += 1
    return shares


def global_cuts(
    base: Checkpoint, ft: Checkpoint, selected: list[TensorInfo], k: int, progress: Progress | None
) -> list[tuple[Cut, int]]:
    """(cut, kept) per selected tensor for the global top ``k``: passes 1 and 2 of the module docstring."""
    import torch

    total = sum(t.numel for t in selected)
    hist = torch.zeros(COARSE_BINS, dtype=torch.int64)
    for info in _tracked(selected, "pass 1/3: histogram of |φ|", total, progress):
        hist += torch.bincount(_magnitude_bits(_phi(base, ft, info.name)) >> 16, minlength=COARSE_BINS)
    b, above = _boundary(hist, k)
    # What pass 2 keeps is allocated before it: small tensors kept between each tensor's large
    # temporaries would fragment the heap until it grows with the model.
    fine = torch.zeros(FINE_BINS, dtype=torch.int64)
    greater = torch.zeros(len(selected), dtype=torch.int64)  # entries above bin b, per tensor
    pool = min(int(hist[b]), len(selected) * FINE_BINS)
    lows, counts = torch.empty(pool, dtype=torch.int32), torch.empty(pool, dtype=torch.int64)  # distinct low bits in bin b
    spans, used = [], 0
    for i, info in enumerate(_tracked(selected, "pass 2/3: exact threshold", total, progress)):
        bits = _magnitude_bits(_phi(base, ft, info.name, check=False))  # pass 1 checked it
        hi = bits >> 16
        low = bits[hi == b] & LOW_MASK
        fine += torch.bincount(low, minlength=FINE_BINS)
        greater[i] = (hi > b).sum()
        values, n = torch.unique(low, return_counts=True)
        lows[used : used + values.numel()], counts[used : used + values.numel()] = values, n
        spans.append((used, used + values.numel()))
        used += values.numel()
        del bits, hi, low, values, n
    lo, above_in_bin = _boundary(fine, k - above)
    ties = k - above - above_in_bin  # entries equal to the threshold still to take, in tensor then index order
    cuts = []
    for i, (start, end) in enumerate(spans):
        c, v = counts[start:end], lows[start:end]
        take = min(ties, int(c[v == lo].sum()))
        ties -= take
        cuts.append((Cut((b << 16) | lo, take), int(greater[i]) + int(c[v > lo].sum()) + take))
    return cuts


def _tracked(infos: list[TensorInfo], phase: str, total: int, progress: Progress | None):
    """``infos``, reporting progress after each."""
    done = 0
    for info in infos:
        yield info
        done += info.numel
        if progress:
            progress(phase, done, total)


# -- the entries to write ----------------------------------------------------------------------


def _entries(
    base: Checkpoint,
    ft: Checkpoint,
    covered: list[TensorInfo],
    selected: list[TensorInfo],
    k: int,
    options: DiffOptions,
    progress: Progress | None,
) -> list[DiffEntry]:
    if options.dense:
        plan = {t.name: (None, t.numel) for t in covered}
    elif options.per_tensor:
        plan = {t.name: (None, kept) for t, kept in zip(selected, apportion(k, [t.numel for t in selected]))}
    else:
        plan = {t.name: cut_kept for t, cut_kept in zip(selected, global_cuts(base, ft, selected, k, progress))}
    phase = "pass 3/3: writing" if options.selection == "global" else "writing"
    total = sum(t.numel for t in covered)
    entries, done = [], 0
    for info in covered:
        whole = info.name not in plan  # plan: name -> (cut, or None to select while writing; kept)
        cut, kept = (None, info.numel) if whole else plan[info.name]
        done += info.numel
        tick = functools.partial(progress, phase, done, total) if progress else None
        produce = _producer(base, ft, info, cut, kept, whole or options.dense, tick)
        entries.append(DiffEntry(info.name, info.dtype, info.shape, kept, produce, whole=whole))
    return entries


def _producer(
    base: Checkpoint,
    ft: Checkpoint,
    info: TensorInfo,
    cut: Cut | None,
    kept: int,
    dense: bool,
    tick: Callable[[], None] | None,
):
    """The function the writer calls for this tensor's values when its turn comes (``cut`` None: select here)."""

    def values():
        phi = _phi(base, ft, info.name, check=cut is None)  # with a cut, pass 1 checked it
        if tick:
            tick()
        if dense:
            return None, phi.view(info.shape)
        bits = _magnitude_bits(phi)
        idx = (cut or tensor_cut(bits, kept)).keep(bits)
        if idx.numel() != kept:  # passes 1-2 counted other values than this pass reads
            raise BadInputError(
                f"{ft.path}: tensor {info.name!r} changed while peftcli diff was reading it",
                "rerun when nothing writes the checkpoints",
            )
        return idx, phi[idx]

    return values
