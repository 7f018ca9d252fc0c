"""Tensor level: truncated SVD of ΔW per module, the LoRA factors it gives and the energy they keep.

- ``factor``: the best rank-r approximation of one ΔW [out, in] (Eckart–Young), split as
  B = U·√S, A = √S·Vᵀ so that B·A is it with scale 1; r given, or the smallest rank whose
  share of ‖ΔW‖² (Σ σᵢ² over the kept i, over Σ σᵢ²) reaches ``energy`` — PEFT's
  ``convert_to_lora`` cutoff;
- ``extract``: the streaming loop over the tensors of anything that gives a ΔW per tensor (a
  ``.diff``, a foldable adapter's ``deltas``, a fine-tune minus its base): one ΔW at a time is
  made, factored and let go, so only the LoRA factors accumulate. Linear weights are factored;
  the tensors a LoRA cannot carry (biases, norms, embeddings, output heads) are reported with
  their share of the total ‖ΔW‖². PEFT needs one ``r`` per adapter and peftcli's LoRA reader
  takes no ``rank_pattern``, so modules of a lower chosen rank are padded with zero directions
  (which add nothing to B·A) up to the adapter's rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from peftcli.errors import BadInputError
from peftcli.methods.base import peft_key

# Both sides above this: torch.svd_lowrank (randomized, O(mn·r)) for a fixed rank well below the
# matrix's, since the full SVD costs O(mn·min(m, n)) and makes U, V as large as ΔW itself.
LOWRANK_MIN_SIDE = 4096
OVERSAMPLE = 16  # extra directions svd_lowrank carries so that the top r come out accurate


@dataclass
class Factored:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    rank: int  # the rank chosen for this ΔW
    kept: float  # Σ of the kept σᵢ²
    total: float  # ‖ΔW‖²


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest k with Σ_{i<k} σᵢ² ≥ energy·Σ σᵢ² (``s`` sorted descending); 0 for ΔW = 0."""
    cs = torch.cumsum(s.double().pow(2), dim=0)
    if not len(cs) or float(cs[-1]) == 0.0:
        return 0
    return min(int(torch.searchsorted(cs, energy * cs[-1])) + 1, len(cs))


def factor(w: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Factored:
    """The truncated SVD of ``w`` [out, in] at ``rank`` (at most min(out, in)) or at ``energy``.

    The SVD runs in fp32 (fp64 for an fp64 ΔW); the factors are returned in fp32."""
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.to(work)
    total = squared_norm(w)
    small = min(w.shape)
    if rank is not None and small > LOWRANK_MIN_SIDE and rank + OVERSAMPLE < small // 2:
        u, s, v = torch.svd_lowrank(w, q=rank + OVERSAMPLE, niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if rank is None:
        # σ at the SVD's own rounding level are no direction of ΔW: without this cut, energy 1
        # would keep every such direction of a low-rank ΔW (a fp32 LoRA's B·A: rank r + noise).
        noise = float(s[0]) * max(w.shape) * torch.finfo(work).eps if len(s) else 0.0
        rank = rank_for_energy(torch.where(s > noise, s, torch.zeros_like(s)), energy or 1.0)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    a = (root.unsqueeze(1) * vh[:r]).float().contiguous()
    b = (u[:, :r] * root.unsqueeze(0)).float().contiguous()
    kept = min(float(s[:r].double().pow(2).sum()), total)  # fp32 σ² may overshoot ‖ΔW‖² by rounding
    return Factored(a, b, r, kept, total)


@dataclass
class Extraction:
    """What ``extract`` made: PEFT-keyed LoRA factors (padded to ``rank``) and the energy report."""

    rank: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: list[dict] = field(default_factory=list)  # {name, shape, rank, kept_energy}
    dropped: list[dict] = field(default_factory=list)  # {name, shape, energy_share}
    kept_energy: float = 1.0  # share of Σ‖ΔW‖² over every tensor that the LoRA keeps


Delta = Callable[[], torch.Tensor]

_ROWS = 1 << 20  # elements per fp64 block: a 262 MB embedding's ΔW needs 8 MB of fp64, not 2 × 1 GB


def squared_norm(t: torch.Tensor) -> float:
    """‖t‖² accumulated in fp64, a block at a time (a whole-tensor ``t.double()`` copy of a
    7B model's embedding change is 1 GB, twice with ``pow``)."""
    flat = t.reshape(-1)
    return sum(float(flat[i : i + _ROWS].double().pow(2).sum()) for i in range(0, flat.numel(), _ROWS))  # makes one tensor's ΔW, in the stored tensor's layout


def extract(
    items: Iterable[tuple[str, Delta]], linear: dict, *, rank: int | None, energy: float | None, where: str,
    skip_unchanged: bool = False,
) -> Extraction:
    """Factor each ``linear`` weight's ΔW (``linear``: tensor name → ``targets.LinearModule``), one at a time.

    ``skip_unchanged``: leave out tensors whose ΔW is exactly 0 (a fine-tune's untouched weights)."""
    out, factors, total, kept = Extraction(), {}, 0.0, 0.0
    for name, make in items:
        phi = make()
        if not bool(torch.isfinite(phi).all()):
            raise BadInputError(f"{where}: ΔW of {name!r} holds NaN or Inf", "the source is corrupt: recompute it")
        if skip_unchanged and not bool(phi.any()):  # a fine-tune's untouched weight: no fp64 pass over it
            continue
        energy_of = squared_norm(phi)
        total += energy_of
        m = linear.get(name)
        if m is None:
            out.dropped.append({"name": name, "shape": list(phi.shape), "energy": energy_of})
            continue
        w = phi.reshape(m.shape[::-1]).T if m.transposed else phi.reshape(m.shape)  # [out, in]
        # A weight narrower than the rank is kept whole at its own min(out, in), exactly, and
        # padded with zero directions like an --energy choice: one small projection (a GQA
        # k_proj) must not refuse the rank the others want.
        f = factor(w, rank=min(rank, min(m.shape)) if rank is not None else None, energy=energy)
        del phi, w
        factors[m.name] = f
        kept += f.kept
        share = f.kept / f.total if f.total else 1.0
        out.modules.append({"name": name, "shape": list(m.shape), "rank": f.rank, "kept_energy": share})
    for d in out.dropped:
        d["energy_share"] = d.pop("energy") / total if total else 0.0
    out.kept_energy = kept / total if total else 1.0
    out.rank = rank if rank is not None else max([f.rank for f in factors.values()] + [1])
    for module, f in factors.items():
        a, b = _padded(f, out.rank)
        out.tensors[peft_key(module, "lora_A.weight")] = a
        out.tensors[peft_key(module, "lora_B.weight")] = b
    return out


def _padded(f: Factored, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B with zero directions added up to ``rank``: B·A is unchanged."""
    if f.rank == rank:
        return f.a, f.b
    a = torch.cat([f.a, torch.zeros(rank - f.rank, f.a.shape[1])])
    b = torch.cat([f.b, torch.zeros(f.b.shape[0], rank - f.rank)], dim=1)
    return a.contiguous(), b.contiguous()
