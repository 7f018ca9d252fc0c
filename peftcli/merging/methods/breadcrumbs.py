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

A merge holds one input's |φ| of a tensor at a time, whole (the cuts rank a whole tensor), and
ranges otherwise (``_sparse_kernel.CrumbsTask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from peftcli.errors import UsageError
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
        from peftcli.merging.methods._sparse_kernel import crumbs

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
        from peftcli.merging.methods._sparse_kernel import CrumbsTask

        return CrumbsTask(name, info, out_dtype, list(streams), cfg.density, cfg.gamma, self._mix())

    def peak_bytes(self, n, touching, w):
        return w * n  # one input's |φ| at a time, whole (the cuts rank a whole tensor)


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs-ties"
    summary = "drop the γ largest and the smallest magnitudes, keep the density, elect signs, Σ of the agreeing"
    elect = True


BREADCRUMBS = Breadcrumbs()
BREADCRUMBS_TIES = BreadcrumbsTies()
