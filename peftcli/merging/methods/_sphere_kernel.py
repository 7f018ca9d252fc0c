"""The arithmetic shared by ``nuslerp`` and ``multislerp``: per-vector Gram sums, then a weighted sum.

Both methods write, for each vector v of a tensor (the whole tensor, or each row or column of
it), θ_v = Σᵢ wᵥᵢ xᵥᵢ (+ θ₀ with ``origin`` base), where xᵢ is input i's point (its task vector
φᵢ with ``origin`` base, its model θ₀ + φᵢ with ``origin`` zero) and the coefficients wᵥᵢ
follow from the fp64 Gram matrix xᵥᵢ·xᵥⱼ alone (``nuslerp.py``, ``multislerp.py``). So each
tensor streams in two passes over ranges: pass 1 accumulates the Gram sums of every vector in
fp64, pass 2 writes Σ wᵥᵢ xᵥᵢ in the work dtype, θ₀ added last, cast once.

The tensor is seen as an R × C matrix: ``tensor`` is one row (R = 1, C = N); ``rows`` are its
vectors along the last dimension (C = shape[-1]); ``columns`` its vectors along the first
(R = shape[0], C = N/R). A range is a block of whole rows (C ≤ RANGE) or a piece of one row,
so every range adds to known vectors. The whole-tensor path (``sphere_whole``: adapters,
pickles, ``arithmetic.combine``) runs the same steps over the same ranges: the same bytes.
Memory: a few ranges and the Gram sums (V × k × k fp64 for V vectors); nothing is held whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from peftcli.checkpoint.dtypes import plus_base, torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.merging import ranged
from peftcli.merging.pipeline import chunks
from peftcli.merging.ranged import Context, Task, base_range, read_at, stream_phi, tensor_read

# (R × k × k Gram sums in fp64) -> (V × k coefficients); the tensor's name for errors
Coefficients = Callable[[np.ndarray, str], np.ndarray]


@dataclass(frozen=True)
class Layout:
    """A tensor as an R × C matrix whose vectors are its rows or its columns."""

    rows: int  # R
    cols: int  # C
    by_rows: bool  # the vectors are the rows (else the columns)

    @property
    def vectors(self) -> int:
        return self.rows if self.by_rows else self.cols

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Flat [start, stop) ranges of at most ``ranged.RANGE``: whole rows, or pieces of one row."""
        size, c = ranged.RANGE, self.cols
        if c <= size:
            step = size // c
            for r0 in range(0, self.rows, step):
                yield r0 * c, min(self.rows, r0 + step) * c
            return
        for r in range(self.rows):
            for c0, c1 in chunks(c, size):
                yield r * c + c0, r * c + c1

    def where(self, start: int, stop: int) -> tuple[slice, tuple[int, int]]:
        """The vectors a range adds to (a slice of 0..V) and the range's shape as a matrix."""
        c = self.cols
        if c <= ranged.RANGE:  # whole rows r0 .. r1
            r0, r1 = start // c, stop // c
            return (slice(r0, r1) if self.by_rows else slice(0, c)), (r1 - r0, c)
        r, c0 = divmod(start, c)  # a piece of row r, columns c0 .. c0 + n
        return (slice(r, r + 1) if self.by_rows else slice(c0, c0 + stop - start)), (1, stop - start)


def layout(shape, vectors: str) -> Layout:
    """``vectors``: tensor (one vector), rows (along the last dimension) or columns (along the first)."""
    n = int(np.prod(shape)) if len(shape) else 1
    if vectors == "tensor" or len(shape) == 0:
        return Layout(1, n, True)
    if vectors == "rows":
        c = int(shape[-1])
        return Layout(n // c if c else 0, c, True)
    r = int(shape[0])
    return Layout(r, n // r if r else 0, False)


def _gram(points: list[torch.Tensor], gram: np.ndarray, lay: Layout, start: int, stop: int) -> None:
    """Add one range's xᵢ·xⱼ to the Gram sums of the vectors it holds (fp64)."""
    where, shape = lay.where(start, stop)
    x64 = [p.double().view(shape) for p in points]
    axis = 1 if lay.by_rows else 0
    for a in range(len(x64)):
        for b in range(a, len(x64)):
            gram[where, a, b] += torch.mul(x64[a], x64[b]).sum(axis).numpy()


def _mix(points: list[torch.Tensor], w: np.ndarray, lay: Layout, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` = Σᵢ wᵥᵢ xᵢ over one range, in ``out``'s dtype (the work dtype)."""
    where, shape = lay.where(start, stop)
    acc = out.view(shape).zero_()
    for i, p in enumerate(points):
        coef = torch.from_numpy(np.ascontiguousarray(w[where, i])).to(out.dtype)
        acc.addcmul_(p.view(shape), coef.view(-1, 1) if lay.by_rows else coef.view(1, -1))
    return out


def symmetric(gram: np.ndarray) -> np.ndarray:
    """The full Gram matrices from their upper triangles, in place."""
    k = gram.shape[1]
    for a in range(k):
        for b in range(a + 1, k):
            gram[:, b, a] = gram[:, a, b]
    return gram


def _points(base: torch.Tensor, xs: dict, k: int, around_base: bool, zero: torch.Tensor) -> list[torch.Tensor]:
    """Input i's point over a range: its φ (``around_base``) or θ₀ + φ; 0 or θ₀ where it does not touch."""
    if around_base:
        return [xs[i] if i in xs else zero for i in range(k)]
    return [xs[i].add_(base) if i in xs else base for i in range(k)]


def sphere_whole(stored: torch.Tensor, phis: dict, k: int, vectors: str, around_base: bool, coefficients: Coefficients, work: torch.dtype, name: str) -> torch.Tensor:
    """θ of one whole tensor (``phis``: input i -> its φ), by the ranged task's steps."""
    base = stored.to(work).reshape(-1)
    lay = layout(tuple(stored.shape), vectors)
    flat = {i: p.reshape(-1) for i, p in phis.items()}
    gram = np.zeros((lay.vectors, k, k))
    for start, stop in lay.ranges():
        zero = torch.zeros(stop - start, dtype=work)
        xs = {i: p[start:stop].to(work).clone() for i, p in flat.items()}
        _gram(_points(base[start:stop], xs, k, around_base, zero), gram, lay, start, stop)
    w = coefficients(symmetric(gram), name)
    out = torch.empty(base.numel(), dtype=work)
    for start, stop in lay.ranges():
        zero = torch.zeros(stop - start, dtype=work)
        xs = {i: p[start:stop].to(work).clone() for i, p in flat.items()}
        _mix(_points(base[start:stop], xs, k, around_base, zero), w, lay, start, stop, out[start:stop])
        if around_base:
            plus_base(out[start:stop], base[start:stop])
    return out.view(stored.shape)


@dataclass
class SphereTask(Task):
    """θ of one tensor by ranges, in two passes (the Gram sums of its vectors, then the result)."""

    name: str
    info: TensorInfo
    out_dtype: str
    openers: list  # (i, opener): the touching inputs' φ streams
    k: int  # every input of the merge
    vectors: str
    around_base: bool
    coefficients: Coefficients
    changed = True

    def __post_init__(self) -> None:
        self.reads = [opener().read for _, opener in self.openers]
        self.layout = layout(tuple(self.info.shape), self.vectors)

    def requests(self) -> Iterator:
        for _ in range(2):
            for start, stop in self.layout.ranges():
                yield tensor_read(self.info, start, stop)
                for read in self.reads:
                    if read is not None:
                        yield read_at(read, start, stop)

    def _pass(self, ctx: Context, work: torch.dtype, each) -> None:
        streams = [(i, opener()) for i, opener in self.openers]  # a fresh stream per pass
        for start, stop in self.layout.ranges():
            n = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            if base.dtype != work:
                base = base.to(work)
            xs = {}
            for j, (i, stream) in enumerate(streams):
                xs[i] = ctx.scratch(f"x{j}", n, work)
                stream_phi(ctx, stream, start, stop, base, xs[i])
            zero = ctx.scratch("zero_point", n, work).zero_()
            each(start, stop, base, _points(base, xs, self.k, self.around_base, zero))
            ctx.reads.give(bbuf)

    def run(self, ctx: Context) -> None:
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        lay = self.layout
        gram = np.zeros((lay.vectors, self.k, self.k))
        self._pass(ctx, work, lambda start, stop, base, points: _gram(points, gram, lay, start, stop))
        w = self.coefficients(symmetric(gram), self.name)

        def put(start: int, stop: int, base: torch.Tensor, points: list) -> None:
            buf, acc = ctx.take(stop - start, work)
            _mix(points, w, lay, start, stop, acc)
            if self.around_base:
                ctx.plus_base(acc, base)
            ctx.put(self.name, acc, buf, out_dtype)

        self._pass(ctx, work, put)
        self.openers = []
