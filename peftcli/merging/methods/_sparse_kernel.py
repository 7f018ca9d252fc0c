"""The sparsify-then-combine methods' arithmetic (breadcrumbs, della): Breadcrumbs' trim,
DELLA's MagPrune, and the ranged tasks that apply them. Each task applies, element by element,
the operations of the whole-tensor path (``sparse_whole``: ``crumbs`` or ``della_drop`` on a
copy of each whole φ, then ``mix``, element-wise), so both write the same bytes
(tests/test_merge_methods_more.py compares them):

- ``CrumbsTask`` (breadcrumbs): a pass per touching input writes its |φ| by ranges into one
  whole buffer and takes the two cuts; a last pass keeps, mixes and writes by ranges. Memory:
  one work-dtype copy of the tensor, plus ranges.
- ``RowTask`` (DELLA): its ranks run within rows, so it reads, prunes, mixes and writes one
  block of whole rows (about a range) at a time, in one pass. Memory: a few ranges.
- ``SparseTask`` (DELLA where a row is longer than a range): the touching φ read whole, each
  sparsified in place, then mixed by ranges. Memory: the k touched φ in the work dtype.

Inputs that do not touch a tensor are left out: their φ̃ = 0 adds exact zeros and never agrees
with an elected sign, and no other input's draw depends on theirs (della seeds each input by its
position ``i``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.errors import BadInputError
from peftcli.merging.pipeline import chunks
from peftcli.merging import ranged
from peftcli.merging.methods.breadcrumbs import crumb_counts
from peftcli.merging.ranged import Context, Task, base_range, read_at, stream_phi, tensor_read

# sparsify(flat φ as a numpy array, written in place; the tensor's shape; the input's position i)
Sparsify = Callable[[np.ndarray, tuple, int], None]
# mix(the sparsified φ̃ of the inputs, their weights) -> the merged task vector, a new tensor
Mix = Callable[[list, list], torch.Tensor]

def crumb_cuts(part: np.ndarray, density: float, gamma: float) -> tuple[int, int, dict]:
    """(T, K, cuts) of Breadcrumbs from |φ| (``part``, reordered here): the T-th and the
    (T + K)-th largest magnitudes, each with how many entries lie above it."""
    n = part.size
    t, k = crumb_counts(density, gamma, n)
    if np.isnan(part.max()):
        raise BadInputError("a task vector holds NaN", "check the inputs with peftcli check")
    part.partition(sorted({i for i in (n - t, n - t - k) if 0 <= i < n}))
    cuts = {}  # "hi": entries above it are dropped, "lo": entries below it; [value, entries above it, equal ones seen]
    if t > 0:
        cuts["hi"] = [part[n - t], int(np.count_nonzero(part > part[n - t])), 0]
    if t + k < n:
        cuts["lo"] = [part[n - t - k], int(np.count_nonzero(part > part[n - t - k])), 0]
    return t, k, cuts


def crumbs(phi: np.ndarray, density: float, gamma: float) -> None:
    """φ (flat, in place) with all but its entries of magnitude rank T … T + K − 1 zeroed."""
    if density >= 1 or phi.size == 0:
        return
    t, k, cuts = crumb_cuts(np.abs(phi), density, gamma)
    for start, stop in chunks(phi.size, ranged.RANGE):
        _keep_range(phi[start:stop], t, k, cuts)


def _keep_range(phi: np.ndarray, t: int, k: int, cuts: dict) -> None:
    """Zero one range's entries outside ranks [T, T + K) (``crumbs``' cuts; their counts advance)."""
    mag = np.abs(phi)
    keep = np.ones(mag.shape, dtype=bool)
    if "hi" in cuts:
        keep &= mag < cuts["hi"][0]
    if "lo" in cuts:
        keep &= mag > cuts["lo"][0]
    for cut in cuts.values():
        value, above, seen = cut
        equal = mag == value
        count = int(np.count_nonzero(equal))
        if count:
            # The equal entries' ranks, in flat order, continue from the earlier ranges'.
            rank = above + seen + np.cumsum(equal) - 1
            keep |= equal & (rank >= t) & (rank < t + k)
            cut[2] = seen + count
    phi[~keep] = 0.0


def row_blocks(shape: tuple, n: int) -> tuple[list[tuple[int, int]], int, int]:
    """DELLA's ranking unit: (flat element blocks of whole rows, about a range each; B; inner size).

    Ranks run along dimension 1 (within each row of a matrix; a 1-D tensor is one row), so a
    block of whole slices of dimension 0 is contiguous and ranked on its own."""
    rows, width = (1, n) if len(shape) < 2 else (shape[0], shape[1])
    inner = n // (rows * width) if rows * width else 1  # the dimensions after 1
    per = width * inner
    step = max(1, ranged.RANGE // per) if per else 1
    return [(r0 * per, min(rows, r0 + step) * per) for r0 in range(0, rows, step)], width, inner


def magprune(block: np.ndarray, width: int, inner: int, generator, density: float, epsilon: float) -> None:
    """MagPrune of one block of whole rows, in place: keep with p by rank, divide by p (della.py)."""
    x = block.reshape(-1, width, inner)
    order = np.argsort(-np.abs(x), axis=1, kind="stable")  # the largest first, ties by index
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(width).reshape(1, width, 1), axis=1)
    if width > 1:
        p = (density - epsilon) + 2 * epsilon * ((width - 1 - position) / (width - 1))
    else:
        p = np.full(x.shape, float(density))
    del order, position
    u = torch.rand(x.size, generator=generator, dtype=torch.float32).numpy().reshape(x.shape)
    x[...] = np.where(u < p, x.astype(np.float64) / p, 0.0).astype(x.dtype)


def della_drop(phi: np.ndarray, shape: tuple, generator, density: float, epsilon: float) -> None:
    """MagPrune of one whole flat φ, in place, block after block (the draws continue one stream)."""
    if density >= 1 or phi.size == 0:
        return
    blocks, width, inner = row_blocks(shape, phi.size)
    for start, stop in blocks:
        magprune(phi[start:stop], width, inner, generator, density, epsilon)


def _put_merged(ctx: Context, name: str, merged: torch.Tensor, base: torch.Tensor, bbuf, work: torch.dtype, out_dtype: torch.dtype) -> None:
    """Write θ₀ + ``merged`` (one range) cast once to ``out_dtype``; the base's read buffer goes
    back first. ``merged`` is the only reference the caller passes, so it is freed before the
    sum is cast: one range of scratch, not two."""
    buf, result = ctx.take(merged.numel(), work)
    result.copy_(merged)
    del merged
    ctx.plus_base(result, base)
    ctx.reads.give(bbuf)
    ctx.put(name, result, buf, out_dtype)


@dataclass
class RowTask(Task):
    """θ₀ + mix(MagPrune(φ₁) … MagPrune(φₖ)) by blocks of whole rows: nothing is held whole.

    Each block is read, pruned (input i's draws continue its own generator, block after block
    as ``della_drop``), mixed and written; rows longer than a range take ``SparseTask`` instead.
    """

    name: str
    info: TensorInfo
    out_dtype: str
    streams: list  # (i, λᵢ, φᵢ stream) of the touching inputs, in input order
    generators: list  # input i's generator, as della_drop draws from it
    density: float
    epsilon: float
    mix: Mix
    changed = True

    def _blocks(self):
        return row_blocks(tuple(self.info.shape), self.info.numel)

    def requests(self) -> Iterator:
        for start, stop in self._blocks()[0]:
            yield tensor_read(self.info, start, stop)
            for _, _, stream in self.streams:
                if stream.read is not None:
                    yield read_at(stream.read, start, stop)

    def run(self, ctx: Context) -> None:
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        blocks, width, inner = self._blocks()
        weights = [lam for _, lam, _ in self.streams]
        for start, stop in blocks:
            m = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            xs = [ctx.scratch(f"x{j}", m, work) for j in range(len(self.streams))]
            for (_, _, stream), x, generator in zip(self.streams, xs, self.generators):
                stream_phi(ctx, stream, start, stop, base, x)
                if self.density < 1:
                    magprune(x.numpy(), width, inner, generator, self.density, self.epsilon)
            _put_merged(ctx, self.name, self.mix(xs, weights), base, bbuf, work, out_dtype)
        self.streams = []


def sparse_whole(phis: list, indices: list[int], weights: list[float], sparsify: Sparsify, mix: Mix) -> torch.Tensor:
    """mix(sparsify(φᵢ)) of whole tensors (``phis`` are never written: each is copied first)."""
    out = []
    for phi, i in zip(phis, indices):
        copy = phi.detach().clone().contiguous()
        sparsify(copy.view(-1).numpy(), tuple(phi.shape), i)
        out.append(copy)
    return mix(out, weights)


@dataclass
class SparseTask(Task):
    """θ₀ + mix(sparsify(φ₁) … sparsify(φₖ)) of one tensor: φ held whole, then combined by ranges."""

    name: str
    info: TensorInfo
    out_dtype: str
    streams: list  # (i, λᵢ, φᵢ stream) of the touching inputs, in input order
    sparsify: Sparsify
    mix: Mix
    changed = True

    def requests(self) -> Iterator:
        for start, stop in chunks(self.info.numel, ranged.RANGE):  # pass 1: θ₀ and the φᵢ
            yield tensor_read(self.info, start, stop)
            for _, _, stream in self.streams:
                if stream.read is not None:
                    yield read_at(stream.read, start, stop)
        for start, stop in chunks(self.info.numel, ranged.RANGE):  # pass 2: θ₀ again, to add
            yield tensor_read(self.info, start, stop)

    def run(self, ctx: Context) -> None:
        n = self.info.numel
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        phis = [ctx.scratch(f"ties{j}", n, work) for j in range(len(self.streams))]
        for start, stop in chunks(n, ranged.RANGE):
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            for (_, _, stream), phi in zip(self.streams, phis):
                stream_phi(ctx, stream, start, stop, base, phi[start:stop])
            ctx.reads.give(bbuf)
        for (i, _, _), phi in zip(self.streams, phis):
            self.sparsify(phi.numpy(), tuple(self.info.shape), i)
        weights = [lam for _, lam, _ in self.streams]
        for start, stop in chunks(n, ranged.RANGE):
            merged = self.mix([phi[start:stop] for phi in phis], weights)
            buf, result = ctx.take(stop - start, work)
            result.copy_(merged)
            del merged
            bbuf, raw = ctx.reads.next()
            ctx.plus_base(result, base_range(ctx, raw, self.info))
            ctx.reads.give(bbuf)
            ctx.put(self.name, result, buf, out_dtype)
        self.streams = []


@dataclass
class CrumbsTask(Task):
    """θ₀ + mix(trim(φ₁) … trim(φₖ)) for Breadcrumbs, holding one tensor's |φ| and ranges only.

    One pass per touching input writes its |φ| by ranges into one whole buffer and takes the
    cuts from it (``crumb_cuts``, the buffer reused by the next input); a last pass reads θ₀ and
    every φ again by ranges, keeps what the cuts keep (``_keep_range``, in flat order as
    ``crumbs``), mixes and writes. The same cuts and the same ranges as ``crumbs`` over a whole φ:
    the same bytes. Memory: one work-dtype copy of the tensor, plus ranges.
    """

    name: str
    info: TensorInfo
    out_dtype: str
    openers: list  # (i, λᵢ, opener) of the touching inputs, in input order
    density: float
    gamma: float
    mix: Mix
    changed = True

    def __post_init__(self) -> None:
        self.reads = [opener().read for _, _, opener in self.openers]

    def _ranges(self):
        return chunks(self.info.numel, ranged.RANGE)

    def requests(self) -> Iterator:
        for read in self.reads if self.density < 1 else []:  # a cut pass per input
            for start, stop in self._ranges():
                yield tensor_read(self.info, start, stop)
                if read is not None:
                    yield read_at(read, start, stop)
        for start, stop in self._ranges():
            yield tensor_read(self.info, start, stop)
            for read in self.reads:
                if read is not None:
                    yield read_at(read, start, stop)

    def _cuts(self, ctx: Context, work: torch.dtype, opener) -> tuple[int, int, dict]:
        mag = ctx.scratch("mag", self.info.numel, work)
        stream = opener()
        for start, stop in self._ranges():
            bbuf, raw = ctx.reads.next()
            stream_phi(ctx, stream, start, stop, base_range(ctx, raw, self.info), mag[start:stop])
            ctx.reads.give(bbuf)
        part = mag.numpy()
        np.abs(part, out=part)
        return crumb_cuts(part, self.density, self.gamma)

    def run(self, ctx: Context) -> None:
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        rules = [self._cuts(ctx, work, opener) for _, _, opener in self.openers] if self.density < 1 else []
        streams = [opener() for _, _, opener in self.openers]
        weights = [lam for _, lam, _ in self.openers]
        for start, stop in self._ranges():
            m = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            xs = [ctx.scratch(f"x{j}", m, work) for j in range(len(streams))]
            for j, (stream, x) in enumerate(zip(streams, xs)):
                stream_phi(ctx, stream, start, stop, base, x)
                if rules:
                    _keep_range(x.numpy(), *rules[j])
            _put_merged(ctx, self.name, self.mix(xs, weights), base, bbuf, work, out_dtype)
        self.openers = []
