"""The sparsify-then-combine methods' arithmetic (breadcrumbs, della): a two-pass ranged task.

These methods sparsify each task vector by a rule over the whole tensor (ranks of magnitude),
then combine the sparsified φ̃ᵢ entry by entry (a weighted sum, or TIES' sign election):

- pass 1 reads θ₀ and the touching inputs' φᵢ a range at a time into whole work-dtype buffers,
  then each φᵢ is sparsified in place (``sparsify(flat, shape, i)``, numpy over the whole
  buffer, its own scratch a range or a row block at a time, except breadcrumbs' |φ|, whole);
- pass 2 reads θ₀ again and writes, range by range, ``mix(φ̃ slices, weights)`` + θ₀, cast once.

The whole-tensor path (adapters, pickles, ``arithmetic.combine``) runs the same ``sparsify`` on a
copy of each whole φ and the same ``mix`` on whole tensors; ``mix`` is element-wise, so both
paths write the same bytes (tests/test_merge_methods_more.py compares them).
Memory: the k touched φ whole in the work dtype, plus breadcrumbs' |φ| (one more), plus ranges.
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
from peftcli.merging.pipeline import chunks
from peftcli.merging import ranged
from peftcli.merging.ranged import Context, Task, _base, _phi, _ranged, _read

# sparsify(flat φ as a numpy array, written in place; the tensor's shape; the input's position i)
Sparsify = Callable[[np.ndarray, tuple, int], None]
# mix(the sparsified φ̃ of the inputs, their weights) -> the merged task vector, a new tensor
Mix = Callable[[list, list], torch.Tensor]


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
            yield _read(self.info, start, stop)
            for _, _, stream in self.streams:
                if stream.read is not None:
                    yield _ranged(stream.read, start, stop)
        for start, stop in chunks(self.info.numel, ranged.RANGE):  # pass 2: θ₀ again, to add
            yield _read(self.info, start, stop)

    def run(self, ctx: Context) -> None:
        n = self.info.numel
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        phis = [ctx.scratch(f"ties{j}", n, work) for j in range(len(self.streams))]
        for start, stop in chunks(n, ranged.RANGE):
            bbuf, raw = ctx.reads.next()
            base = _base(ctx, raw, self.info)
            for (_, _, stream), phi in zip(self.streams, phis):
                _phi(ctx, stream, start, stop, base, phi[start:stop])
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
            ctx.plus_base(result, _base(ctx, raw, self.info))
            ctx.reads.give(bbuf)
            ctx.put(self.name, result, buf, out_dtype)
        self.streams = []
