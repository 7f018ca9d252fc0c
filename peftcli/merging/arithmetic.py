"""Tensor arithmetic of merging: combine the task vectors φ_i = θ_i − θ₀ of ONE base tensor.

Pure functions over torch tensors; the streaming merge calls ``combine`` once per base tensor and
adds the result to θ₀. Inputs may be any floating dtype: each φ_i is converted once to ``dtype``
(fp32 by default; the merge passes fp64 for F64 base tensors), the arithmetic is in it and so is
the result. Definitions follow mergekit's methods of the same names
with their default options (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``),
but for the details below:

=========  ==================================  ===========================================================
method     per-input φ̃_i                       result
=========  ==================================  ===========================================================
linear     φ_i                                 Σ_i λ_i φ̃_i
ties       trim_d(φ_i)                         Σ_{i∈A} λ_i φ̃_i / Σ_{i∈A} λ_i   (0 where A is empty)
dare       m_i ⊙ φ_i / d,  m_i ~ Bernoulli(d)  Σ_i λ_i φ̃_i
dare-ties  m_i ⊙ φ_i / d,  m_i ~ Bernoulli(d)  Σ_{i∈A} λ_i φ̃_i                  (0 where A is empty)
=========  ==================================  ===========================================================

Where mergekit 0.1.5 differs (benchmarks/README.md compares the outputs): its trim keeps
K = max(1, int(d × N)), the float product truncated, and breaks ties at the cut by an
unstable argsort; its DARE rescales each masked φ_i by ‖φ_i‖₁ / ‖m_i ⊙ φ_i‖₁, which is 1/d
only in expectation. peftcli rounds K on the decimal d as typed, keeps the lowest flat
indices at the cut and divides by d, so its results depend on no sort implementation and
E[φ̃_i] = φ_i exactly.

Per entry, with λ_i the weights and d the density:

- trim_d keeps the K = round(d × N) (half up, on the decimal d as typed; at least 1) entries of
  φ_i with the largest |φ_i| among its N entries and zeroes the rest. Equal magnitudes are ordered
  by flat index (the lower index is kept), so the kept set is unique.
- Election (mergekit's "sum" consensus): γ = +1 where Σ_i λ_i φ̃_i ≥ 0, else −1.
  A = {i : sign(λ_i φ̃_i) = γ}: the inputs whose weighted value is non-zero and has the elected
  sign. Weights enter before the election, so a negative λ_i votes with the flipped sign.
- ties divides by the weights of the agreeing inputs (mergekit's default ``normalize: true``
  for ties), so only the ratios of the λ_i matter and equal weights give the TIES paper's
  disjoint mean; ties therefore needs λ_i ≥ 0. dare-ties does not divide (mergekit's default
  ``normalize: false`` for dare_ties): it is the sum of the agreeing weighted values.
- m_i: each entry survives with probability d (u < d for u uniform in [0, 1)), survivors are
  divided by d, so E[φ̃_i] = φ_i (the DARE paper's 1/(1 − p) rescale). u is drawn on the CPU from a torch.Generator seeded with the
  first 8 bytes (little endian) of sha256(f"{seed}\\0{key}\\0{i}"), i the input's position: the
  mask depends only on (seed, key, i, shape), not on the device, on other tensors or their order.
"""

from __future__ import annotations

import hashlib
import math
from decimal import ROUND_HALF_UP, Decimal

import torch

from peftcli.errors import BadInputError, UsageError

def __getattr__(name: str):
    # METHODS: the registry's methods that combine task vectors alone (no θ₀), looked up late:
    # the registry's modules import this one.
    if name == "METHODS":
        from peftcli.merging.methods import REGISTRY

        return tuple(n for n, m in REGISTRY.items() if not m.needs_base)
    raise AttributeError(name)


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    *,
    density: float | None = None,
    seed: int = 0,
    key: str = "",
    dtype: torch.dtype = torch.float32,
    base: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """The merged task vector of one tensor (in ``dtype``, a new tensor): see the module docstring.

    ``key`` names the tensor (its checkpoint name), so DARE draws an independent mask per tensor.
    ``options`` are the method's other parameters (``peftcli.merging.methods``); a method that
    ``needs_base`` takes θ₀ as ``base`` and returns the merged tensor itself.
    """
    m, cfg = prepare(method, len(deltas), weights, dict(options, density=density), key)
    _check_tensors(deltas, key)
    phis = [d.to(dtype) for d in deltas]  # no copy when already in dtype: never written to
    return m.combine(phis, weights, cfg, seed=seed, key=key, dtype=dtype, base=base)


def prepare(method: str, n: int, weights: list[float], options: dict, key: str = ""):
    """(the method, its options instance) once everything about them is checked: one-line errors."""
    from peftcli.merging.methods import get_merge_method

    m = get_merge_method(method)
    where = f" for {key}" if key else ""
    if not n:
        raise UsageError(f"nothing to merge{where}: no task vectors", "give at least one model to merge")
    if len(weights) != n:
        raise UsageError(f"{len(weights)} weights for {n} task vectors{where}", "give one weight per merged model")
    for w in weights:
        if not math.isfinite(w):
            raise UsageError(f"merge weight {w} is not a finite number", "use weights such as 1.0 or 0.5")
        if abs(w) > FLOAT32_MAX:  # merging computes in fp32, where this weight is inf
            raise UsageError(f"merge weight {w} is beyond the float32 range", "use weights such as 1.0 or 0.5")
    cfg = m.configure(options)
    m.validate(cfg, weights, n)
    return m, cfg


def keep_count(density: float, n: int) -> int:
    """K of trim_d: round(density × n) half up, on the decimal the user typed, in [min(1, n), n]."""
    k = int((Decimal(repr(float(density))) * n).to_integral_value(ROUND_HALF_UP))
    return min(n, max(1, k))


def dare_seed(seed: int, key: str, index: int) -> int:
    """The 64-bit generator seed of input ``index``'s DARE mask for tensor ``key``."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


FLOAT32_MAX = 3.4028234663852886e38


def _check_tensors(deltas, key: str) -> None:
    where = f" for {key}" if key else ""
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) > 1:
        raise BadInputError(
            f"task vectors{where} differ in shape: {', '.join(map(str, sorted(shapes)))}",
            "merge only fine-tunes of the same base model",
        )
    for d in deltas:
        if not d.is_floating_point():
            raise BadInputError(f"task vector{where} has non-floating dtype {d.dtype}", "merge floating tensors only")


def weighted_sum(phis: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(phis[0])
    for phi, w in zip(phis, weights):
        out.add_(phi, alpha=w)
    return out


def trim(phi: torch.Tensor, density: float) -> torch.Tensor:
    """φ with all but its K largest-|φ| entries zeroed; equal magnitudes go by flat index."""
    n = phi.numel()
    k = keep_count(density, n)
    if k == n:
        return phi
    mag = phi.abs().flatten()
    cut = torch.kthvalue(mag, n - k + 1).values  # the K-th largest magnitude
    keep = mag > cut
    at_cut = mag == cut
    del mag
    needed = k - int(keep.sum())  # ≥ 1: the K-th largest itself sits at the cut
    if int(at_cut.sum()) > needed:  # more ties than places: the first `needed` by flat index
        at_cut &= at_cut.cumsum(0) <= needed
    keep |= at_cut
    return torch.where(keep.view(phi.shape), phi, 0.0)


def dare_generator(seed: int, key: str, index: int) -> torch.Generator:
    """The CPU generator that draws input ``index``'s DARE mask for tensor ``key``."""
    return torch.Generator(device="cpu").manual_seed(dare_seed(seed, key, index))


def drop(phi: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry survives with probability ``density``; survivors are divided by it."""
    survive = (torch.rand(phi.shape, generator=generator, dtype=torch.float32) < density).to(phi.device)
    return torch.where(survive, phi / density, 0.0)


def consensus(phis: list[torch.Tensor], weights: list[float], *, normalize: bool) -> torch.Tensor:
    """TIES' elect + disjoint merge of the (sparsified) φ̃_i, weighted before the election."""
    weighted = [phi * w for phi, w in zip(phis, weights)]
    total = torch.zeros_like(weighted[0])
    for x in weighted:
        total += x
    positive = total >= 0  # the elected sign γ; a zero sum elects +1, as mergekit does
    total.zero_()  # reused as the sum over the agreeing inputs
    divisor = torch.zeros_like(total) if normalize else None
    for x, w in zip(weighted, weights):
        agree = torch.where(positive, x > 0, x < 0)  # sign(x) = γ: zero never agrees
        total += x.where(agree, 0.0)
        if divisor is not None:
            divisor.add_(agree.to(total.dtype), alpha=w)
    if divisor is None:
        return total
    divisor[divisor == 0] = 1  # no agreeing input: the sum is already 0 there
    return total / divisor
