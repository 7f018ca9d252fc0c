"""SLERP's arithmetic (``slerp.py``): a two-pass ranged kernel and its whole-tensor twin.

Pass 1 reads θ₀ and both inputs' φ a range at a time and accumulates ‖a‖², ‖b‖² and a·b in
fp64 (a = θ₀ + φ_A, b = θ₀ + φ_B in the work dtype); the two coefficients follow in fp64; pass 2
reads them again and writes s_a·a + s_b·b, cast once. The whole-tensor path (adapters, pickles,
``arithmetic.combine``) runs the same steps over the same ranges, so both write the same bytes.
Memory: a few ranges; nothing is held whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.merging.methods.slerp import DOT_THRESHOLD, EPS
from peftcli.merging.pipeline import chunks
from peftcli.merging.ranged import RANGE, Context, Task, base_range, stream_phi, two_pass_requests


def coefficients(aa: float, bb: float, ab: float, t: float) -> tuple[float, float]:
    """(s_a, s_b) from ‖a‖², ‖b‖², a·b: mergekit's slerp, its linear fallback near parallel."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return math.sin(omega - omega * t) / sin_omega, math.sin(omega * t) / sin_omega


def _sums(a: torch.Tensor, b: torch.Tensor, acc: list[float]) -> None:
    a64, b64 = a.double(), b.double()
    acc[0] += float(torch.dot(a64, a64))
    acc[1] += float(torch.dot(b64, b64))
    acc[2] += float(torch.dot(a64, b64))


def _mix(a: torch.Tensor, b: torch.Tensor, s: tuple[float, float]) -> torch.Tensor:
    return a.mul_(s[0]).add_(b, alpha=s[1])  # in place in a


def slerp_whole(base: torch.Tensor, phi_a, phi_b, t: float, work: torch.dtype) -> torch.Tensor:
    """θ = slerp(t, θ₀ + φ_A, θ₀ + φ_B) of one whole tensor (φ None: 0), in ``work``."""
    flat = base.reshape(-1)
    zero = torch.zeros_like(flat)
    pa = phi_a.reshape(-1) if phi_a is not None else zero
    pb = phi_b.reshape(-1) if phi_b is not None else zero
    acc = [0.0, 0.0, 0.0]
    for start, stop in chunks(flat.numel(), RANGE):
        _sums(flat[start:stop] + pa[start:stop], flat[start:stop] + pb[start:stop], acc)
    s = coefficients(*acc, t)
    out = torch.empty(flat.numel(), dtype=work)
    for start, stop in chunks(flat.numel(), RANGE):
        a = flat[start:stop] + pa[start:stop]
        out[start:stop] = _mix(a, flat[start:stop] + pb[start:stop], s)
    return out.view(base.shape)


@dataclass
class SlerpTask(Task):
    """θ = slerp(t, θ_A, θ_B) of one tensor by ranges, in two passes (the norms, then the result)."""

    name: str
    info: TensorInfo
    out_dtype: str
    openers: list  # (i, opener): the touching inputs' φ streams, i 0 (A) or 1 (B)
    t: float
    changed = True

    def __post_init__(self) -> None:
        self.reads = [(i, opener().read) for i, opener in self.openers]

    def requests(self) -> Iterator:
        return two_pass_requests(self.info, [read for _, read in self.reads])

    def _pass(self, ctx: Context, work: torch.dtype, each) -> None:
        streams = [(i, opener()) for i, opener in self.openers]  # a fresh stream per pass
        for start, stop in chunks(self.info.numel, RANGE):
            n = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            ab = [ctx.scratch(f"x{j}", n, work) for j in range(2)]
            ab[0].zero_()
            ab[1].zero_()
            for i, stream in streams:
                stream_phi(ctx, stream, start, stop, base, ab[i])
            a, b = ab[0].add_(base), ab[1].add_(base)  # θ₀ + φ, as slerp_whole adds them
            ctx.reads.give(bbuf)
            each(start, stop, a, b)

    def run(self, ctx: Context) -> None:
        work, out_dtype = work_dtype(torch_dtype(self.info.dtype)), torch_dtype(self.out_dtype)
        acc = [0.0, 0.0, 0.0]
        self._pass(ctx, work, lambda start, stop, a, b: _sums(a, b, acc))
        s = coefficients(*acc, self.t)

        def put(start: int, stop: int, a: torch.Tensor, b: torch.Tensor) -> None:
            buf, result = ctx.take(stop - start, work)
            result.copy_(_mix(a, b, s))
            ctx.put(self.name, result, buf, out_dtype)

        self._pass(ctx, work, put)
        self.openers = []
