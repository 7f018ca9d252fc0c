"""The linear merge's arithmetic in numpy, bit for bit that of ``ranged.Linear`` (imports no torch).

``ranged.Linear`` computes, per element of an F32, F16 or BF16 tensor: θ₀ upcast to fp32
(exact), each input's φᵢ = fp32(θᵢ) − θ₀ (one fp32 subtraction), ``acc = 0`` then
``acc.add_(φᵢ, alpha=λᵢ)`` in input order, θ₀ added last (its own bits where acc is 0), one
cast back. torch's CPU kernel for ``add_`` with ``alpha`` is a fused multiply-add
(``vec::fmadd``: one rounding of λᵢ·φᵢ + acc, λᵢ as fp32) on AVX2, AVX-512 and NEON builds;
numpy has no FMA, so ``fma32`` computes it exactly: the product of two fp32 values is exact in
fp64, the fp64 sum is rounded once, and where that rounding could make the final fp32 rounding
wrong (a sum landing exactly on an fp32 halfway point, or in fp32's subnormal range) the exact
error of the fp64 sum (TwoSum) decides the direction. The casts back: F16 by numpy's
round-to-nearest-even conversion (as torch's), BF16 by the same bit arithmetic as torch's
``round_to_nearest_even`` on the fp32 bits (uint32). A NaN or Inf anywhere is refused, as
``ranged.check_finite`` refuses it, so no NaN payload is ever written.
"""

from __future__ import annotations

import numpy as np

from peftcli.errors import BadInputError

FAST_DTYPES = ("F32", "F16", "BF16")
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # as check_finite names them
_HALF_ULP32 = np.int64(1 << 28)  # an fp32 halfway point has these low 29 bits in fp64: 1 then 28 zeros
_LOW29 = np.int64((1 << 29) - 1)
_MIN_NORMAL32_BITS = np.int64(np.array(2.0**-126).view(np.int64))  # below: fp32's subnormal grid


def to_f32(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """The fp32 values of ``raw`` (uint8 bytes of ``dtype``): F32 as it is, F16/BF16 upcast exactly."""
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        np.copyto(out, raw.view(np.float16))
    else:  # bf16 is the top half of an fp32
        np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def fma32(phi: np.ndarray, lam: np.float32, acc: np.ndarray, scratch: np.ndarray, bits: np.ndarray, flags: np.ndarray | None = None) -> None:
    """``acc = fp32(λ·φ + acc)`` rounded once, as torch's ``acc.add_(phi, alpha=λ)``.

    ``scratch``/``bits``: fp64/int64 work buffers of ``len(acc)`` elements; ``flags``: bool, 2 × that.
    """
    s = scratch
    np.multiply(phi, np.float64(lam), out=s, dtype=np.float64)  # exact: 24 × 24 bits
    np.add(s, acc, out=s)  # rounded once to fp64
    b: np.ndarray = s.view(np.int64)
    flags = np.empty(2 * len(s), bool) if flags is None else flags
    suspect, below = flags[: len(s)], flags[len(s) : 2 * len(s)]
    np.bitwise_and(b, _LOW29, out=bits)
    np.equal(bits, _HALF_ULP32, out=suspect)
    np.bitwise_and(b, np.int64(0x7FFFFFFFFFFFFFFF), out=bits)
    bits -= 1  # an exact 0 wraps to the largest unsigned value: it needs no care
    np.less(bits.view(np.uint64), np.uint64(_MIN_NORMAL32_BITS - 1), out=below)
    suspect |= below
    if suspect.any():
        _round_to_odd(s, phi, lam, acc, np.flatnonzero(suspect))
    np.copyto(acc, s, casting="same_kind")


def _round_to_odd(s: np.ndarray, phi: np.ndarray, lam: np.float32, acc: np.ndarray, where: np.ndarray) -> None:
    """Where the fp64 sum was inexact, move it to its odd neighbour toward the exact value.

    Rounding to odd at 53 bits, then to nearest at 24, is the correctly rounded result (53 ≥ 24 + 2).
    """
    p = phi[where].astype(np.float64) * np.float64(lam)
    c = acc[where].astype(np.float64)
    t = s[where]
    v = t - p  # TwoSum: the exact error of t = p + c
    err = (p - (t - v)) + (c - v)
    tb = t.view(np.int64)
    move = (err != 0) & ((tb & 1) == 0) & np.isfinite(t)
    away = (err > 0) == (t > 0)  # toward the exact value: larger magnitude when err has t's sign
    tb[move] += np.where(away[move], 1, -1)
    s[where] = t


def to_bf16(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``x`` (finite fp32) rounded to nearest even bf16, as uint16 bits: torch's ``round_to_nearest_even``."""
    u: np.ndarray = x.view(np.uint32)
    lsb = np.right_shift(u, 16)
    np.bitwise_and(lsb, 1, out=lsb)
    lsb += 0x7FFF
    lsb += u  # no overflow: |x| <= FLT_MAX keeps u + 0x8000 below 2**32
    np.right_shift(lsb, 16, out=lsb)
    np.copyto(out, lsb, casting="unsafe")
    return out


def not_finite(name: str, dtype: str) -> BadInputError:
    """``ranged.check_finite``'s error, word for word."""
    return BadInputError(
        f"merging gives NaN or Inf in {name!r} ({TORCH_NAMES[dtype]})",
        "check the inputs with peftcli check, or use smaller `weights`",
    )


def all_finite32(x: np.ndarray) -> bool:
    # One pass in fp64 (no overflow of a sum of fp32 values); the exact test only when it fails.
    return bool(np.isfinite(x.sum(dtype=np.float64))) or bool(np.isfinite(x).all())


class LinearKernel:
    """θ₀ + Σ λᵢφᵢ over ranges of up to ``n`` elements, in buffers allocated once."""

    def __init__(self, n: int, lams: list[float]):
        self.lams = [np.float32(w) for w in lams]  # torch casts alpha to the fp32 op's type
        self.base: np.ndarray = np.empty(n, np.float32)
        self.ft: np.ndarray = np.empty(n, np.float32)
        self.phi: np.ndarray = np.empty(n, np.float32)
        self.acc: np.ndarray = np.empty(n, np.float32)
        self.scratch: np.ndarray = np.empty(n, np.float64)
        self.bits: np.ndarray = np.empty(n, np.int64)
        self.flags: np.ndarray = np.empty(2 * n, np.bool_)
        self.out16: np.ndarray = np.empty(n, np.uint16)

    def run(self, name: str, dtype: str, base_raw: np.ndarray, ft_raws: list[np.ndarray]) -> memoryview:
        """The output bytes of one range: ``base_raw`` and ``ft_raws`` are its bytes in each checkpoint."""
        with np.errstate(all="ignore"):  # Inf and NaN are refused by name, not warned about
            return self._run(name, dtype, base_raw, ft_raws)

    def _run(self, name: str, dtype: str, base_raw: np.ndarray, ft_raws: list[np.ndarray]) -> memoryview:
        m = base_raw.nbytes // np.dtype(np.float32 if dtype == "F32" else np.uint16).itemsize
        base = to_f32(base_raw, dtype, self.base[:m])
        acc, phi = self.acc[:m], self.phi[:m]
        for i, (lam, raw) in enumerate(zip(self.lams, ft_raws)):
            np.subtract(to_f32(raw, dtype, self.ft[:m]), base, out=phi)
            if i == 0:  # fma(φ, λ, +0) = fp32(λ·φ): its sign of zero aside, replaced by θ₀ below
                np.multiply(phi, lam, out=acc)
            elif lam == 1:
                acc += phi
            elif lam == -1:
                acc -= phi
            else:
                fma32(phi, lam, acc, self.scratch[:m], self.bits[:m], self.flags[: 2 * m])
        zero = acc == 0  # θ₀'s own bits where no input changes it (−0.0 included)
        acc += base
        np.copyto(acc, base, where=zero)
        if not all_finite32(acc):
            raise not_finite(name, dtype)
        if dtype == "F32":
            return acc.data.cast("B")
        out = self.out16[:m]
        if dtype == "F16":
            np.copyto(out.view(np.float16), acc, casting="same_kind")
            if not np.isfinite(out.view(np.float16)).all():  # beyond 65504
                raise not_finite(name, dtype)
        else:
            to_bf16(acc, out)
            if np.any((out & 0x7F80) == 0x7F80):  # rounded up to Inf
                raise not_finite(name, dtype)
        return out.data.cast("B")
