"""The Karcher mean's arithmetic (``karcher.py``): mergekit's iteration on coefficients, a
two-pass ranged kernel and its whole-tensor twin.

Pass 1 reads θ₀ and the touching inputs' φ a range at a time and accumulates the Gram matrix
θᵢ·θⱼ in fp64; the iteration runs on u's k coefficients (``karcher_weights``); pass 2 reads them
again and writes Σ wᵢθᵢ, cast once. The whole-tensor path runs the same steps over the same
ranges, so both write the same bytes. Memory: a few ranges; nothing is held whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.errors import BadInputError
from peftcli.merging import ranged
from peftcli.merging.methods.karcher import KarcherOptions
from peftcli.merging.pipeline import chunks
from peftcli.merging.ranged import Context, Task, base_range, stream_phi

OPPOSITE = 1e-6  # sin of an angle within ~1e-6 of π: the step is undefined


def _gram(points: list, gram: np.ndarray) -> None:
    """Add one range's θᵢ·θⱼ to ``gram`` (k × k, fp64)."""
    x64 = [p.double() for p in points]
    for a in range(len(x64)):
        for b in range(a, len(x64)):
            gram[a, b] += float(torch.dot(x64[a], x64[b]))
            if a != b:
                gram[b, a] = gram[a, b]


def _norm(c: np.ndarray, unit: np.ndarray) -> float:
    return math.sqrt(max(0.0, float(c @ unit @ c)))


def karcher_weights(gram: np.ndarray, max_iter: int, tol: float, name: str) -> np.ndarray:
    """wᵢ with θ = Σ wᵢθᵢ: mergekit's iteration (module docstring) on u's coefficients over the ûᵢ."""
    k = len(gram)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    valid = [i for i in range(k) if norms[i] > tol]
    weights = np.zeros(k)
    if not valid:
        return weights
    unit = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])  # ûᵢ·ûⱼ
    a = np.full(len(valid), 1.0 / len(valid))
    c = a.copy()
    size = _norm(c, unit)
    if size < tol:
        c = np.eye(len(valid))[0]
    else:
        c /= size
    for _ in range(max_iter):
        step = np.zeros(len(valid))
        for i in range(len(valid)):
            dot = min(1.0, max(-1.0, float(c @ unit[:, i])))
            angle = math.acos(dot)
            if angle < tol:
                continue
            if math.sin(angle) < OPPOSITE:  # the geodesic to an antipode is not unique; its step unbounded
                raise BadInputError(
                    f"karcher: two models' tensors {name!r} point in opposite directions, where the mean's step is undefined",
                    "merge models whose tensors are not opposite, or use `method` linear",
                )
            step += a[i] * (angle / math.sin(angle)) * (np.eye(len(valid))[i] - dot * c)
        size = _norm(step, unit)
        if size < tol:
            break
        c = math.cos(size) * c + math.sin(size) * step / size
        size = _norm(c, unit)
        if size > tol:
            c /= size
    scale = float(np.sum(norms)) / k  # Σ aᵢnᵢ over every input, aᵢ = 1/k
    weights[valid] = scale * c / norms[valid]
    return weights


def _points(base: torch.Tensor, phis: dict, k: int, xs: list) -> list:
    """θᵢ = θ₀ + φᵢ of one range for every input (θ₀ itself where input i does not touch it)."""
    return [xs[phis[i]].add_(base) if i in phis else base for i in range(k)]


def karcher_whole(stored: torch.Tensor, phis: dict, k: int, cfg, work: torch.dtype, name: str) -> torch.Tensor:
    """θ of one whole tensor (``phis``: input i -> its φ in ``work``), by the ranged task's steps."""
    base = stored.to(work).reshape(-1)
    n = base.numel()
    order = {i: j for j, i in enumerate(phis)}
    flat = [phi.reshape(-1) for phi in phis.values()]
    gram = np.zeros((k, k))
    for start, stop in chunks(n, ranged.RANGE):
        _gram(_points(base[start:stop], order, k, [x[start:stop].clone() for x in flat]), gram)
    w = karcher_weights(gram, cfg.max_iter, cfg.tol, name)
    out = torch.empty(n, dtype=work)
    for start, stop in chunks(n, ranged.RANGE):
        points = _points(base[start:stop], order, k, [x[start:stop].clone() for x in flat])
        out[start:stop] = _mix(points, w, work)
    return out.view(stored.shape)


def _mix(points: list, w: np.ndarray, work: torch.dtype) -> torch.Tensor:
    acc = torch.zeros(points[0].numel(), dtype=work)
    for p, wi in zip(points, w):
        acc.add_(p, alpha=float(wi))
    return acc


@dataclass
class KarcherTask(Task):
    """θ = Σ wᵢθᵢ of one tensor by ranges, in two passes (the Gram sums, then the result)."""

    name: str
    info: TensorInfo
    out_dtype: str
    openers: list  # (i, opener): the touching inputs' φ streams
    k: int  # every input of the merge
    cfg: KarcherOptions
    key: str
    changed = True

    def __post_init__(self) -> None:
        self.reads = [opener().read for _, opener in self.openers]

    def requests(self) -> Iterator:
        return ranged.two_pass_requests(self.info, self.reads)

    def _pass(self, ctx: Context, work: torch.dtype, each) -> None:
        streams = [(i, opener()) for i, opener in self.openers]  # a fresh stream per pass
        order = {i: j for j, (i, _) in enumerate(streams)}
        for start, stop in chunks(self.info.numel, ranged.RANGE):
            n = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            if base.dtype != work:  # an F64 base is already fp64; others are upcast
                base = base.to(work)
            xs = [ctx.scratch(f"x{j}", n, work) for j in range(len(streams))]
            for (_, stream), x in zip(streams, xs):
                stream_phi(ctx, stream, start, stop, base, x)
            each(start, stop, _points(base, order, self.k, xs))
            ctx.reads.give(bbuf)

    def run(self, ctx: Context) -> None:
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        gram = np.zeros((self.k, self.k))
        self._pass(ctx, work, lambda start, stop, points: _gram(points, gram))
        w = karcher_weights(gram, self.cfg.max_iter, self.cfg.tol, self.key)

        def put(start: int, stop: int, points: list) -> None:
            buf, acc = ctx.take(stop - start, work)
            acc.copy_(_mix(points, w, work))
            ctx.put(self.name, acc, buf, out_dtype)

        self._pass(ctx, work, put)
        self.openers = []


