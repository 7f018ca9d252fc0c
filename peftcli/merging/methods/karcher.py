"""``karcher``: the Karcher (Riemannian) mean of the models on the sphere, rescaled by their mean
norm, per tensor (mergekit's ``karcher``, parameters ``max_iter`` and ``tol``).

The inputs are full models θᵢ = θ₀ + φᵢ (a fine-tune, a diff or an adapter of the base each; θ₀
itself is not a point, as in mergekit's configuration without ``base_model``), k ≥ 2 of them, equal
weights aᵢ = 1/k. Per tensor, with nᵢ = ‖θᵢ‖ and ûᵢ = θᵢ/nᵢ over the inputs with nᵢ > tol (the
"valid" ones, weights renormalised over them), mergekit's iteration:

- u = Σ aᵢûᵢ normalised (û of the first valid input where ‖Σ aᵢûᵢ‖ < tol);
- up to ``max_iter`` times: T = Σ aᵢ·(θᵢ'/sin θᵢ')·(ûᵢ − (u·ûᵢ)·u) over the inputs whose angle
  θᵢ' = arccos(clamp(u·ûᵢ, −1, 1)) is at least tol; stop when ‖T‖ < tol; else
  u = cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised when its norm exceeds tol;
- θ = (Σ over all inputs of aᵢnᵢ)·u; no valid input gives 0.

u stays in the span of the ûᵢ, so peftcli runs the iteration on u's k coefficients in fp64, every
dot product from the Gram matrix θᵢ·θⱼ (pass 1 over ranges, fp64 sums), and writes θ = Σ wᵢθᵢ
range by range (pass 2): nothing is held whole. An input that does not touch a tensor is the
point θ₀ there. An angle within ~1e-6 of π (u opposite an input) leaves the step undefined:
refused, naming the tensor (mergekit's θ/sin θ is then ±1e7 or more).
Where mergekit 0.1.5 differs: it iterates on whole tensors in the model's dtype (bf16 models in
bf16), rounding u at every step; peftcli's fp64 coefficients agree with it to that rounding
(fp32: ~1e-6 relative), and where a norm or an angle lies within rounding of ``tol`` the two may
stop at a different iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.errors import BadInputError, UsageError
from peftcli.merging import ranged
from peftcli.merging.methods.base import MergeMethod
from peftcli.merging.pipeline import chunks
from peftcli.merging.ranged import Context, Task, _base, _phi, _ranged, _read
from peftcli.options import option

OPPOSITE = 1e-6  # sin of an angle within ~1e-6 of π: the step is undefined


@dataclass
class KarcherOptions:
    """The Karcher mean's iteration: at most ``max_iter`` steps, ``tol`` for norms and angles."""

    max_iter: int = option(10, help="karcher: most iterations of the mean (default 10).", min=0, max=10**6)
    tol: float = option(1e-5, help="karcher: norms, angles and steps below it count as 0 (default 1e-5).")


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
                    "merge models whose tensors are not opposite, or use --method linear",
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


class Karcher(MergeMethod):
    name = "karcher"
    summary = "the models' Karcher mean on the sphere, scaled by their mean norm, per tensor"
    options = KarcherOptions
    needs_base = True
    takes_weights = False
    inputs = (2, None)
    rate = "merge"  # two passes over each tensor: the Gram sums, then the result

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        if not cfg.tol >= 0:
            raise UsageError(f"tol must be ≥ 0, got {cfg.tol}", "e.g. 1e-5, mergekit's default")

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        if base is None:
            raise UsageError("karcher needs the base tensor", "pass base= (θ₀) to combine")
        return karcher_whole(base, dict(enumerate(phis)), len(phis), cfg, dtype, key)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        phis = {i: d(stored).to(work) for i, d in enumerate(deltas) if d is not None}
        return karcher_whole(stored, phis, len(deltas), cfg, work, key)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        return KarcherTask(name, info, out_dtype, [(i, opener) for i, _, opener in streams], n_inputs, cfg, key)

    def whole_factor(self, k):
        return k + 4  # θ₀, the k φ, the result, a range's copies


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
        for _ in range(2):
            for start, stop in chunks(self.info.numel, ranged.RANGE):
                yield _read(self.info, start, stop)
                for read in self.reads:
                    if read is not None:
                        yield _ranged(read, start, stop)

    def _pass(self, ctx: Context, work: torch.dtype, each) -> None:
        streams = [(i, opener()) for i, opener in self.openers]  # a fresh stream per pass
        order = {i: j for j, (i, _) in enumerate(streams)}
        for start, stop in chunks(self.info.numel, ranged.RANGE):
            n = stop - start
            bbuf, raw = ctx.reads.next()
            base = _base(ctx, raw, self.info)
            if base.dtype != work:  # an F64 base is already fp64; others are upcast
                base = base.to(work)
            xs = [ctx.scratch(f"x{j}", n, work) for j in range(len(streams))]
            for (_, stream), x in zip(streams, xs):
                _phi(ctx, stream, start, stop, base, x)
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


KARCHER = Karcher()
