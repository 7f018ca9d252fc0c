"""``breadcrumbs`` and ``breadcrumbs-ties``: drop each φᵢ's largest-magnitude γ share (outliers)
and its smallest, keep the density, then sum (mergekit's ``breadcrumbs``) or elect signs and
sum the agreeing (``breadcrumbs_ties``; neither divides by the weights, mergekit's defaults).

Per tensor of N entries, φᵢ's entries ranked by |φ| from the largest (equal magnitudes by flat
index, the lower index ranked higher): T = ⌊γ·N⌋ and K = max(1, ⌊d·N⌋), both on the decimals as
typed (mergekit's int(γ·N), int(d·N), without the float product's error), T lowered to N − K
where K + T > N; the entries of rank T … T + K − 1 are kept, the others zeroed. d = 1 keeps φ
whole, outliers included (as mergekit: γ applies below d = 1 only). Where mergekit 0.1.5
differs: its ascending torch.sort breaks ties at the two cuts in no documented order, and where
⌊γ·N⌋ = 0 its slice ``indices[n_bot:-0]`` is empty, so it drops the whole task vector (tensors
of fewer than 1/γ entries); peftcli keeps the density's share there.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

import numpy as np

from peftcli.errors import BadInputError, UsageError
from peftcli.merging.methods.base import Density, MergeMethod
from peftcli.merging.methods.ties import check_density
from peftcli.options import option


@dataclass
class BreadcrumbsOptions(Density):
    """Breadcrumbs' parameters: the density kept and the share γ of largest magnitudes dropped."""

    gamma: float = option(0.01, help="breadcrumbs: share of each task vector's largest magnitudes dropped (default 0.01).")


def _floor(fraction: float, n: int) -> int:
    """⌊fraction × n⌋ on the decimal the user typed (0.29 × 100 is 29, not 28)."""
    return int((Decimal(repr(float(fraction))) * n).to_integral_value(ROUND_FLOOR))


def crumb_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(T, K): the largest entries dropped, then the entries kept, of an n-entry tensor."""
    k = min(n, max(1, _floor(density, n)))
    return min(_floor(gamma, n), n - k), k


def crumbs(phi: np.ndarray, density: float, gamma: float) -> None:
    """φ (flat, in place) with all but its entries of magnitude rank T … T + K − 1 zeroed."""
    n = phi.size
    if density >= 1 or n == 0:
        return
    t, k = crumb_counts(density, gamma, n)
    part = np.abs(phi)
    if np.isnan(part.max()):
        raise BadInputError("a task vector holds NaN", "check the inputs with peftcli check")
    # The T-th and the (T + K)-th largest magnitudes, and how many entries lie above each.
    kth = sorted({i for i in (n - t, n - t - k) if 0 <= i < n})
    part.partition(kth)
    cuts = {}  # "hi": entries above it are dropped, "lo": entries below it; [value, entries above it, equal ones seen]
    if t > 0:
        cuts["hi"] = [part[n - t], int(np.count_nonzero(part > part[n - t])), 0]
    if t + k < n:
        cuts["lo"] = [part[n - t - k], int(np.count_nonzero(part > part[n - t - k])), 0]
    del part
    for start, stop in _ranges(n):
        _keep_range(phi[start:stop], t, k, cuts)


def _ranges(n: int):
    from peftcli.merging.pipeline import chunks
    from peftcli.merging.ranged import RANGE

    return chunks(n, RANGE)


def _keep_range(phi: np.ndarray, t: int, k: int, cuts: dict) -> None:
    """Zero one range's entries outside ranks [T, T + K) (``crumbs``' cuts; their counts advance)."""
    mag = np.abs(phi)
    keep = np.ones(mag.shape, dtype=bool)
    if "hi" in cuts:
        keep &= mag < cuts["hi"][0]
    if "lo" in cuts:
        keep &= mag > cuts["lo"][0]
    for cut in cuts.values():
        value, above, seen = cut
        equal = mag == value
        count = int(np.count_nonzero(equal))
        if count:
            # The equal entries' ranks, in flat order, continue from the earlier ranges'.
            rank = above + seen + np.cumsum(equal) - 1
            keep |= equal & (rank >= t) & (rank < t + k)
            cut[2] = seen + count
    phi[~keep] = 0.0


class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    summary = "drop the γ largest and the smallest magnitudes, keep the density, Σ λᵢ φ̃ᵢ"
    options = BreadcrumbsOptions
    rate = "crumbs"
    elect = False  # breadcrumbs-ties: elect a sign, sum the agreeing

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        check_density(self.name, cfg.density)
        if not 0.0 <= cfg.gamma < 1.0:
            raise UsageError(f"gamma must be in [0, 1), got {cfg.gamma}", "e.g. 0.01 drops each task vector's largest 1%")
        if cfg.density < 1 and Decimal(repr(float(cfg.density))) + Decimal(repr(float(cfg.gamma))) > 1:
            raise UsageError(
                f"density {cfg.density} plus gamma {cfg.gamma} exceeds 1",
                "keep density + gamma ≤ 1: gamma drops the largest entries, density keeps the next ones",
            )

    def _sparsify(self, cfg):
        return lambda flat, shape, i: crumbs(flat, cfg.density, cfg.gamma)

    def _mix(self):
        from peftcli.merging.arithmetic import consensus, weighted_sum

        if self.elect:
            return lambda phis, weights: consensus(phis, weights, normalize=False)
        return weighted_sum

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._sparse_kernel import sparse_whole

        return sparse_whole(phis, list(range(len(phis))), weights, self._sparsify(cfg), self._mix())

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.methods._sparse_kernel import SparseTask

        opened = [(i, w, opener()) for i, w, opener in streams]
        return SparseTask(name, info, out_dtype, opened, self._sparsify(cfg), self._mix())

    def peak_bytes(self, n, touching, w):
        return (touching + 1) * w * n  # the k φ held whole and the partitioned |φ|


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs-ties"
    summary = "drop the γ largest and the smallest magnitudes, keep the density, elect signs, Σ of the agreeing"
    elect = True


BREADCRUMBS = Breadcrumbs()
BREADCRUMBS_TIES = BreadcrumbsTies()
