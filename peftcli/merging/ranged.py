"""A merged tensor produced a flat range of elements at a time, in a few reused buffers.

Each output tensor of a streaming merge is one task: ``requests`` lists, in order, the byte
ranges it will read (for ``ReadAhead`` to read ahead), ``run`` consumes them in that order and
hands the output's ranges to ``WriteBehind``. Only ranges are ever in memory, except where a
method needs whole task vectors (TIES' trim ranks all of a tensor's entries).

- ``Copy``: a tensor no input touches, in the base's dtype: its bytes, unchanged (and checked
  equal to those of the full checkpoints among the inputs, where it is not floating-point).
- ``Cast``: a tensor no input touches, in another dtype (``--dtype``).
- ``Linear``: θ₀ + Σ λᵢφᵢ (task arithmetic).
- ``Ties``: θ₀ + TIES(φ₁ … φₖ), the φᵢ held whole for the trim, then combined by ranges.
- ``Dare``: θ₀ + DARE(φ₁ … φₖ) or DARE-TIES, every step by ranges (the masks too).

Each applies, element by element, the same operations in the same order as the whole-tensor
definitions (``produce`` in ``engine.py``, with ``arithmetic.combine``), so the bytes written are the same
(``tests/test_merge_ranged.py`` compares them): accumulate in the work dtype (fp32, or fp64 for
an F64 base: ``dtypes.work_dtype``) from zero, the base added last (its own bits where the sum is
0, ``dtypes.plus_base``), one cast to the output dtype, which must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.reader import TensorInfo
from peftcli.checkpoint.safetensors_format import DTYPES
from peftcli.errors import BadInputError
from peftcli.merging.arithmetic import dare_generator, keep_count
from peftcli.merging.pipeline import Buffers, Read, ReadAhead, WriteBehind, chunks
from peftcli.merging.sources import Stream

RANGE = 1 << 18  # elements per range: 1 MiB of fp32, so a range's working set stays in cache
UPCAST = ("F16", "BF16")  # base dtypes whose fp32 upcast is exact
OUT_BUFFERS = 8  # output ranges being computed or queued for writing
WRITE_LIMIT = 64 << 20  # bytes queued for writing (a larger whole tensor goes alone)
SCRATCH_RANGES = 10  # range-sized scratch buffers besides those of the inputs (x{i}): base, phi, total, ...


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0] // 8


def read_buffers(inputs: int) -> int:
    """Read-ahead buffers for a merge of ``inputs``: a range of the base and of each, twice over."""
    return 2 * (inputs + 1) + 2


def buffer_bytes(dtypes) -> int:
    """The size of one read or output buffer: a range of the widest dtype involved (fp32 at least)."""
    return RANGE * max([4, *(itemsize(d) for d in dtypes if DTYPES[d][0] >= 8)])


def work_itemsize(dtypes) -> int:
    """Bytes per element of the widest work dtype among base dtypes ``dtypes``: 8 with F64, else 4."""
    return 8 if "F64" in dtypes else 4


def buffers_total(inputs: int, dtypes) -> int:
    """Bytes of every buffer a ranged merge allocates once: read-ahead, output and scratch ranges."""
    dtypes = list(dtypes)
    return (read_buffers(inputs) + OUT_BUFFERS) * buffer_bytes(dtypes) + (SCRATCH_RANGES + inputs) * RANGE * work_itemsize(dtypes)


@dataclass
class Context:
    """What every task of one merge shares: the reader, the writer and the reused buffers."""

    reads: ReadAhead
    out: WriteBehind
    pool: Buffers  # output ranges, buffer_bytes() each
    _scratch: dict[str, torch.Tensor] = field(default_factory=dict)

    def scratch(self, key: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reused buffer of ``n`` elements (grown when a larger one is asked for)."""
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            self._scratch.pop(key, None)  # the old one goes before the new one is allocated
            buf = self._scratch[key] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def put(self, name: str, result: torch.Tensor, buf: torch.Tensor, out_dtype: torch.dtype) -> None:
        """Queue ``result`` (work dtype, a view of pool buffer ``buf``) as a range of ``name``, cast once.

        What is written must be finite: checked after the cast, since a finite sum can be Inf
        only in a narrower output dtype (F16 ends at 65504).
        """
        if out_dtype == result.dtype:
            check_finite(name, result)
            self.out.put(name, result, done=lambda: self.pool.give(buf))
            return
        obuf = self.pool.take()
        cast = obuf[: result.numel() * out_dtype.itemsize].view(out_dtype)
        cast.copy_(result)
        self.pool.give(buf)
        check_finite(name, cast)
        self.out.put(name, cast, done=lambda: self.pool.give(obuf))

    def take(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """An output buffer and a view of it as ``n`` elements of ``dtype`` (the work dtype)."""
        buf = self.pool.take()
        return buf, buf[: dtype.itemsize * n].view(dtype)

    def plus_base(self, acc: torch.Tensor, base: torch.Tensor) -> None:
        """``acc += base``, with base's own bits where ``acc`` is 0: ``dtypes.plus_base`` in reused buffers."""
        zero = torch.eq(acc, 0, out=self.scratch("zero", acc.numel(), torch.bool))
        acc.add_(base)
        np.copyto(acc.numpy(), base.numpy(), where=zero.numpy())


def base_range(ctx: Context, raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The base's range as the arithmetic takes it: fp32 (an exact upcast) or F64 as stored."""
    stored = raw.view(torch_dtype(info.dtype))
    if info.dtype in UPCAST:
        return ctx.scratch("base", stored.numel()).copy_(stored)
    return stored


def all_finite(t: torch.Tensor) -> bool:
    # A sum is finite only if every term is: one fast pass (in fp32 at least: an F16 sum of
    # finite values can overflow); the exact test only when it is not.
    total = t.sum(dtype=torch.float32) if t.itemsize < 4 else t.sum()
    return math.isfinite(float(total)) or bool(torch.isfinite(t).all())


def check_cast(name: str, stored: torch.Tensor, cast: torch.Tensor) -> None:
    """Refuse a ``--dtype`` cast that turns finite values into Inf (beyond F16's 65504)."""
    if not all_finite(cast) and all_finite(stored):
        out = str(cast.dtype).removeprefix("torch.")
        raise BadInputError(f"{name!r} holds values beyond the range of {out}", "choose a wider `dtype`, or none")


def check_finite(name: str, result: torch.Tensor) -> None:
    if not all_finite(result):
        raise BadInputError(
            f"merging gives NaN or Inf in {name!r} ({str(result.dtype).removeprefix('torch.')})",
            "check the inputs with peftcli check, or use smaller `weights`",
        )


def unmergeable_change(path: str, name: str, dtype: str) -> BadInputError:
    """The error for a full checkpoint that changes a tensor no merge computes with."""
    return BadInputError(
        f"{path}: tensor {name!r} ({dtype}) differs from the base's, but peftcli merges only F16, BF16, F32 and F64 tensors",
        "a merge cannot carry a changed integer, bool or FP8 tensor: merge checkpoints whose such tensors equal the base's",
    )


class Task:
    name: str
    changed = False

    def requests(self) -> Iterator[Read]:
        return iter(())

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


def tensor_read(info: TensorInfo, start: int, stop: int) -> Read:
    """The read of elements [start, stop) of the tensor ``info`` describes."""
    size = itemsize(info.dtype)
    return info.file, info.begin + start * size, (stop - start) * size


def two_pass_requests(info: TensorInfo, reads) -> Iterator[Read]:
    """The reads of a task that streams its tensor twice (a statistic of the whole tensor, then
    the result: SLERP, Model Stock, Karcher): each range of the base, then of every input that
    stores the tensor (``reads``: its (file, offset, dtype) or None), once per pass."""
    for _ in range(2):
        for start, stop in chunks(info.numel, RANGE):
            yield tensor_read(info, start, stop)
            for read in reads:
                if read is not None:
                    yield read_at(read, start, stop)


@dataclass
class Copy(Task):
    """The base tensor's bytes, unchanged (any dtype, sub-byte ones included).

    ``fixed``: (path, tensor) of the full checkpoints among the inputs, whose bytes of a tensor
    no merge computes with (integers, bool, FP8) must be the base's: each range is compared.
    """

    name: str
    info: TensorInfo
    fixed: list[tuple[str, TensorInfo]] = field(default_factory=list)

    def _byte_ranges(self) -> Iterator[tuple[int, int]]:
        return chunks(self.info.end - self.info.begin, RANGE * 4)

    def requests(self) -> Iterator[Read]:
        for start, stop in self._byte_ranges():
            yield self.info.file, self.info.begin + start, stop - start
            for _, other in self.fixed:
                yield other.file, other.begin + start, stop - start

    def run(self, ctx: Context) -> None:
        if self.info.end == self.info.begin:
            ctx.out.put(self.name, b"", whole=True)
        for _ in self._byte_ranges():
            buf, data = ctx.reads.next()
            for path, _ in self.fixed:
                obuf, other = ctx.reads.next()
                same = torch.equal(data, other)
                ctx.reads.give(obuf)
                if not same:
                    ctx.reads.give(buf)
                    raise unmergeable_change(path, self.name, self.info.dtype)
            ctx.out.put(self.name, memoryview(data.numpy()), done=lambda buf=buf: ctx.reads.give(buf))


@dataclass
class Cast(Task):
    """The base tensor in ``out_dtype``: one conversion per element, as ``Tensor.to``."""

    name: str
    info: TensorInfo
    out_dtype: str

    def requests(self) -> Iterator[Read]:
        for start, stop in chunks(self.info.numel, RANGE):
            yield tensor_read(self.info, start, stop)

    def run(self, ctx: Context) -> None:
        dtype, out = torch_dtype(self.info.dtype), torch_dtype(self.out_dtype)
        for _ in chunks(self.info.numel, RANGE):
            buf, data = ctx.reads.next()
            obuf = ctx.pool.take()
            x = data.view(dtype)
            cast = obuf[: x.numel() * itemsize(self.out_dtype)].view(out)
            cast.copy_(x)
            check_cast(self.name, x, cast)
            ctx.reads.give(buf)
            ctx.out.put(self.name, cast, done=lambda obuf=obuf: ctx.pool.give(obuf))


@dataclass
class Linear(Task):
    """θ₀ + Σ λᵢφᵢ: from zero, each λᵢφᵢ added in input order, then θ₀; one cast."""

    name: str
    info: TensorInfo
    out_dtype: str
    streams: list[tuple[float, Stream]]  # (λᵢ, φᵢ), the inputs touching this tensor, in input order
    changed = True

    def requests(self) -> Iterator[Read]:
        for start, stop in chunks(self.info.numel, RANGE):
            yield tensor_read(self.info, start, stop)
            for _, stream in self.streams:
                if stream.read is not None:
                    yield read_at(stream.read, start, stop)

    def run(self, ctx: Context) -> None:
        out_dtype, work = torch_dtype(self.out_dtype), work_dtype(torch_dtype(self.info.dtype))
        for start, stop in chunks(self.info.numel, RANGE):
            n = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            buf, acc = ctx.take(n, work)
            acc.zero_()
            phi = ctx.scratch("phi", n, work)
            for lam, stream in self.streams:
                stream_phi(ctx, stream, start, stop, base, phi)
                acc.add_(phi, alpha=lam)
            ctx.plus_base(acc, base)
            ctx.reads.give(bbuf)
            ctx.put(self.name, acc, buf, out_dtype)
        self.streams = []  # what a stream loaded (a diff's values) goes with it


def stream_phi(ctx: Context, stream: Stream, start: int, stop: int, base: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = the stream's φ over [start, stop), from the next read of ``ctx`` if it stores one."""
    if stream.read is None:
        stream.phi(start, stop, base, None, out)
        return
    buf, raw = ctx.reads.next()
    stream.phi(start, stop, base, raw, out)
    ctx.reads.give(buf)


def read_at(where: tuple[str, int, str], start: int, stop: int) -> Read:
    """The read of elements [start, stop) of a tensor stored at ``where``: (file, offset, dtype)."""
    file, offset, dtype = where
    size = itemsize(dtype)
    return file, offset + start * size, (stop - start) * size


@dataclass
class _Trim:
    """trim_d of one φ as a rule per entry: keep |φ| > cut, and the first ``ties`` entries at the cut."""

    cut: np.floating | None  # None: keep everything (K = N); in the work dtype
    ties: int  # entries with |φ| == cut still to keep, in flat order
    all_ties: bool  # every entry at the cut is kept: keep |φ| >= cut


def _trim_rule(phi: torch.Tensor, density: float, ctx: Context) -> _Trim:
    """The K-th largest |φ| and how many entries at it are kept (see ``arithmetic._trim``)."""
    n = phi.numel()
    k = keep_count(density, n)
    if k == n:
        return _Trim(None, 0, True)
    mag = ctx.scratch("mag", n, phi.dtype).numpy()
    np.abs(phi.numpy(), out=mag)
    mag.partition(n - k)  # numpy's introselect: several times faster than torch.kthvalue
    cut = mag[n - k]  # the K-th largest; left of it nothing larger, right of it nothing smaller
    above = int(np.count_nonzero(mag[n - k + 1 :] > cut))
    at_cut = 1 + int(np.count_nonzero(mag[n - k + 1 :] == cut)) + int(np.count_nonzero(mag[: n - k] == cut))
    needed = k - above
    return _Trim(cut, needed, at_cut == needed)


@dataclass
class Ties(Task):
    """θ₀ + TIES(φ): the φᵢ of the touching inputs held whole (the trim ranks a whole tensor), then by ranges.

    Inputs that do not touch the tensor are left out: their φ = 0 is trimmed to 0, never
    agrees with the elected sign and adds exact zeros, so leaving them out changes no bit.
    """

    name: str
    info: TensorInfo
    out_dtype: str
    streams: list[tuple[float, Stream]]
    density: float
    changed = True

    def requests(self) -> Iterator[Read]:
        for start, stop in chunks(self.info.numel, RANGE):  # pass 1: the φᵢ
            yield tensor_read(self.info, start, stop)
            for _, stream in self.streams:
                if stream.read is not None:
                    yield read_at(stream.read, start, stop)
        for start, stop in chunks(self.info.numel, RANGE):  # pass 2: θ₀ again, to add
            yield tensor_read(self.info, start, stop)

    def run(self, ctx: Context) -> None:
        n = self.info.numel
        work = work_dtype(torch_dtype(self.info.dtype))
        phis = [ctx.scratch(f"ties{i}", n, work) for i in range(len(self.streams))]
        for start, stop in chunks(n, RANGE):
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            for (_, stream), phi in zip(self.streams, phis):
                stream_phi(ctx, stream, start, stop, base, phi[start:stop])
            ctx.reads.give(bbuf)
        rules = [_trim_rule(phi, self.density, ctx) for phi in phis]
        # torch.where and torch's comparisons ran at ~60 M elements/s here (a random mask defeats
        # branch prediction); numpy's comparisons and a bit mask do the same selection exactly.
        scalar = np.float64 if work == torch.float64 else np.float32
        weights = [scalar(lam) for lam, _ in self.streams]  # as torch takes a Python scalar
        out_dtype = torch_dtype(self.out_dtype)
        for start, stop in chunks(n, RANGE):
            m = stop - start
            sign = ctx.scratch("sign", m, torch.int8).numpy()
            flags = [ctx.scratch(f"flag{j}", m, torch.bool).numpy() for j in range(3)]
            weighted = []
            for i, (phi, rule, w) in enumerate(zip(phis, rules, weights)):
                p = phi[start:stop].numpy()
                x = ctx.scratch(f"x{i}", m, work).numpy()
                np.multiply(p, w, out=x)  # where(keep, φ, 0)·w, with the mask applied after: w ≥ 0
                if rule.cut is not None:
                    _keep(p, rule, ctx.scratch("mag", m, work).numpy(), flags[0], flags[1])
                    _zero_unless(x, flags[0], sign)
                weighted.append(x)
            total = ctx.scratch("total", m, work).numpy()
            total.fill(0)
            for x in weighted:
                np.add(total, x, out=total)
            positive = np.greater_equal(total, 0, out=flags[2])  # the elected sign; a zero sum elects +1
            total.fill(0)
            divisor = ctx.scratch("divisor", m, work).numpy()
            divisor.fill(0)
            term = ctx.scratch("term", m, work).numpy()
            for x, w in zip(weighted, weights):
                agree = np.greater(x, 0, out=flags[0])  # sign(x) = γ; zero and NaN never agree
                np.bitwise_and(agree, positive, out=agree)
                negative = np.less(x, 0, out=flags[1])
                np.greater(negative, positive, out=negative)  # x < 0 where γ = −1
                np.bitwise_or(agree, negative, out=agree)
                np.multiply(agree, w, out=term)  # 0 or w exactly: divisor + term is add_(agree, alpha=w)
                np.add(divisor, term, out=divisor)
                _zero_unless(x, agree, sign)
                np.add(total, x, out=total)
            np.add(divisor, divisor == 0, out=divisor)  # no agreeing input: 1 (the sum is 0 there)
            buf, result = ctx.take(m, work)
            np.divide(total, divisor, out=result.numpy())
            bbuf, raw = ctx.reads.next()
            ctx.plus_base(result, base_range(ctx, raw, self.info))
            ctx.reads.give(bbuf)
            ctx.put(self.name, result, buf, out_dtype)
        self.streams = []


def _zero_unless(x: np.ndarray, keep: np.ndarray, sign: np.ndarray) -> None:
    """x = where(keep, x, +0.0) exactly (NaN and −0.0 too): an AND with all-ones or all-zeros bits."""
    np.negative(keep.view(np.int8), out=sign)  # True → −1, all ones once widened to 32 or 64 bits
    bits = x.view(np.int64 if x.dtype == np.float64 else np.int32)
    np.bitwise_and(bits, sign, out=bits)


def _keep(phi: np.ndarray, rule: _Trim, mag: np.ndarray, keep: np.ndarray, at_cut: np.ndarray) -> None:
    """``keep`` = the entries of one range that trim_d keeps; ``rule.ties`` advances past those at the cut."""
    np.abs(phi, out=mag)
    if rule.all_ties:
        np.greater_equal(mag, rule.cut, out=keep)
        return
    np.greater(mag, rule.cut, out=keep)
    if rule.ties:
        np.equal(mag, rule.cut, out=at_cut)
        count = int(np.count_nonzero(at_cut))
        if count > rule.ties:  # more ties than places left: the first ones by flat index
            np.bitwise_and(at_cut, np.cumsum(at_cut) <= rule.ties, out=at_cut)
            count = rule.ties
        rule.ties -= count
        np.bitwise_or(keep, at_cut, out=keep)


@dataclass
class Dare(Task):
    """θ₀ + DARE(φ₁ … φₖ) (``dare``: Σ λᵢ φ̃ᵢ) or DARE-TIES (``ties``: elect, sum the agreeing), by ranges.

    Input i's mask comes from its own generator, seeded as ``arithmetic.dare_generator``.
    torch.rand fills a CPU tensor from one MT19937 stream element by element, so drawing range
    after range continues the stream where one whole-tensor draw would be: the masks, and so the
    bytes written, are those of ``arithmetic.combine`` (tests/test_merge_ranged.py compares them).
    Inputs that do not touch the tensor are left out: their dropped φ is 0, which adds nothing
    and never agrees with the elected sign, and no other input's mask depends on theirs.
    """

    name: str
    info: TensorInfo
    out_dtype: str
    streams: list[tuple[int, float, Stream]]  # (i, λᵢ, φᵢ): the input's position, its weight, its φ
    density: float
    seed: int
    key: str  # the base tensor's name, which seeds the masks
    ties: bool
    changed = True

    def requests(self) -> Iterator[Read]:
        for start, stop in chunks(self.info.numel, RANGE):
            yield tensor_read(self.info, start, stop)
            for _, _, stream in self.streams:
                if stream.read is not None:
                    yield read_at(stream.read, start, stop)

    def run(self, ctx: Context) -> None:
        generators = [dare_generator(self.seed, self.key, i) for i, _, _ in self.streams]
        out_dtype, work = torch_dtype(self.out_dtype), work_dtype(torch_dtype(self.info.dtype))
        d = self.density
        for start, stop in chunks(self.info.numel, RANGE):
            m = stop - start
            bbuf, raw = ctx.reads.next()
            base = base_range(ctx, raw, self.info)
            u = ctx.scratch("u", m)
            dropped = ctx.scratch("drop", m, torch.bool)
            xs = []
            # Each step is the whole-tensor definition's own torch operation on the range.
            for j, ((_, _lam, stream), generator) in enumerate(zip(self.streams, generators)):
                x = ctx.scratch(f"x{j}", m, work)
                stream_phi(ctx, stream, start, stop, base, x)
                torch.rand(m, generator=generator, out=u)
                torch.ge(u, d, out=dropped)  # survives where u < d
                torch.div(x, d, out=x).masked_fill_(dropped, 0.0)  # where(survive, φ / d, 0)
                xs.append(x)
            buf, acc = ctx.take(m, work)
            acc.zero_()
            if not self.ties:
                for x, (_, lam, _) in zip(xs, self.streams):
                    acc.add_(x, alpha=lam)
            else:
                for x, (_, lam, _) in zip(xs, self.streams):
                    x.mul_(lam)  # weighted before the election
                    acc += x
                positive = torch.ge(acc, 0, out=ctx.scratch("positive", m, torch.bool))
                acc.zero_()
                for x in xs:
                    agree = torch.where(positive, x > 0, x < 0)  # sign(x) = γ: zero never agrees
                    acc += x.where(agree, 0.0)
            ctx.plus_base(acc, base)
            ctx.reads.give(bbuf)
            ctx.put(self.name, acc, buf, out_dtype)
        self.streams = []

