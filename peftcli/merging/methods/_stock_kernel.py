"""Model Stock's arithmetic (``model_stock.py``): a two-pass ranged kernel and its whole-tensor twin.

Pass 1 reads θ₀ and the touching inputs' φ a range at a time and accumulates the Gram sums
φᵢ·φⱼ in fp64; t/k follows in fp64; pass 2 reads them again and writes θ₀ + Σ (t/k)·φᵢ, cast
once. The whole-tensor path runs the same steps over the same ranges, so both write the same
bytes. Memory: a few ranges; nothing is held whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from peftcli.checkpoint.dtypes import plus_base, torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.errors import BadInputError
from peftcli.merging import ranged
from peftcli.merging.pipeline import chunks
from peftcli.merging.ranged import Context, Task, base_range, stream_phi

NORM_FLOOR = 1e-6  # mergekit's clamp of ‖φᵢ‖·‖φⱼ‖


def _gram(xs: list, gram: dict) -> None:
    """Add one range's φᵢ·φⱼ (i ≤ j, positions in ``xs``) to ``gram``, in fp64."""
    x64 = [x.double() for x in xs]
    for a in range(len(x64)):
        for b in range(a, len(x64)):
            gram[a, b] = gram.get((a, b), 0.0) + float(torch.dot(x64[a], x64[b]))


def coefficient(gram: dict, k: int, name: str) -> float:
    """t/k from the Gram sums of the touching inputs (the other k − m have φ = 0: cosine 0)."""
    m = max((a for a, _ in gram), default=-1) + 1
    total = 0.0
    for a in range(m):
        for b in range(a + 1, m):
            norms = math.sqrt(gram[a, a]) * math.sqrt(gram[b, b])
            total += min(1.0, max(-1.0, gram[a, b] / max(norms, NORM_FLOOR)))
    cos = total / (k * (k - 1) / 2)
    denominator = 1 + (k - 1) * cos
    if denominator == 0:
        raise BadInputError(
            f"model-stock: the task vectors of {name!r} have mean cosine {cos:.6g}, where t = k·cos/(1 + (k − 1)·cos) is undefined",
            "merge task vectors that do not point in opposite directions, or use `method` linear",
        )
    return k * cos / denominator / k


def stock_whole(stored: torch.Tensor, phis: list, k: int, work: torch.dtype, name: str) -> torch.Tensor:
    """θ of one whole tensor (``phis``: the touching inputs' φ in the work dtype), as the ranged task."""
    flat = [phi.reshape(-1) for phi in phis]
    gram: dict = {}
    n = stored.numel()
    for start, stop in chunks(n, ranged.RANGE):
        _gram([x[start:stop] for x in flat], gram)
    s = coefficient(gram, k, name)
    out = torch.zeros(n, dtype=work)
    for start, stop in chunks(n, ranged.RANGE):
        acc = out[start:stop]
        for x in flat:
            acc.add_(x[start:stop], alpha=s)
    return plus_base(out.view(stored.shape), stored)


@dataclass
class StockTask(Task):
    """θ₀ + (t/k)·Σ φᵢ of one tensor by ranges, in two passes (the Gram sums, then the result)."""

    name: str
    info: TensorInfo
    out_dtype: str
    openers: list  # the touching inputs' φ stream openers, in input order
    k: int  # every input of the merge
    key: str  # the base tensor's name, for errors
    changed = True

    def __post_init__(self) -> None:
        self.reads = [opener().read for opener in self.openers]

    def requests(self) -> Iterator:
        return ranged.two_pass_requests(self.info, self.reads)

    def _pass(self, ctx: Context, work: torch.dtype, each) -> None:
        streams = [opener() for opener in self.openers]  # a fresh stream per pass
        for start, stop in chunks(self.info.numel, ranged.RANGE):
            n = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            xs = [ctx.scratch(f"x{j}", n, work) for j in range(len(streams))]
            for stream, x in zip(streams, xs):
                stream_phi(ctx, stream, start, stop, base, x)
            each(start, stop, base, xs)
            ctx.reads.give(bbuf)

    def run(self, ctx: Context) -> None:
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        gram: dict = {}
        self._pass(ctx, work, lambda start, stop, base, xs: _gram(xs, gram))
        s = coefficient(gram, self.k, self.key)

        def put(start: int, stop: int, base: torch.Tensor, xs: list) -> None:
            buf, acc = ctx.take(stop - start, work)
            acc.zero_()
            for x in xs:
                acc.add_(x, alpha=s)
            ctx.plus_base(acc, base)
            ctx.put(self.name, acc, buf, out_dtype)

        self._pass(ctx, work, put)
        self.openers = []


