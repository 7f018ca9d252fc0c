"""``della`` and ``della-linear``: drop each φᵢ's entries at random with keep probabilities ranked
by magnitude (DELLA's MagPrune), rescale the survivors by 1/p, then elect signs and average the
agreeing (mergekit's ``della``: ties' sign election, divided by the agreeing weights) or sum
(``della_linear``); the merged task vector is then multiplied by ``--scale`` (mergekit's ``lambda``).

Per tensor, as mergekit ranks: along dimension 1 (within each row of a matrix; a 1-D tensor as
one row), entries ranked by |φ|, equal magnitudes by flat index (the lower index ranked higher).
An entry of rank r among the row's B (0 the smallest) is kept with probability
p = (d − ε) + 2ε·r/(B − 1) (d when B = 1) and kept as φ/p, so E[φ̃] = φ; d = 1 keeps φ whole.
The draw is u < p, u uniform in [0, 1) from input i's generator of DARE's seeding
(``arithmetic.dare_generator(seed, key, i)``) in flat order: the mask depends only on
(seed, tensor name, i, shape). A merge streams blocks of whole rows (``_sparse_kernel.RowTask``):
nothing is held whole, but a row longer than a range (a long 1-D tensor), whose φ is held whole.

Where mergekit 0.1.5 differs: its MagPrune rescales the whole masked φ by ‖φ‖₁ / ‖m ⊙ φ‖₁
(one factor per tensor, 1/p only in expectation), draws from torch's global generator, computes
p in fp32 and breaks magnitude ties by an unstable argsort; a row of one entry gives it 0/0.
Its results therefore agree with peftcli's in distribution, not bit for bit (as DARE's).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from peftcli.errors import UsageError
from peftcli.merging.methods.base import Density, MergeMethod
from peftcli.merging.methods.ties import check_density
from peftcli.options import option


@dataclass
class DellaOptions(Density):
    """DELLA's parameters: the mean keep probability, its spread over the ranks, the final scale."""

    epsilon: float = option(0.15, help="della: keep probabilities range over density ± epsilon by magnitude rank (default 0.15).")
    scale: float = option(1.0, help="della: the merged task vector is multiplied by this (mergekit's lambda; default 1).")


class Della(MergeMethod):
    name = "della"
    summary = "drop by magnitude-ranked chance, rescale by 1/p, elect signs, mean of the agreeing, × scale"
    options = DellaOptions
    rate = "della"
    elect = True  # della-linear: Σ λᵢ φ̃ᵢ

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        if self.elect and weights and min(weights) < 0:
            raise UsageError(
                f"della needs weights ≥ 0, got {min(weights)}",
                "della divides by the agreeing weights; negate a task vector with della-linear",
            )
        check_density(self.name, cfg.density)
        d, e = Decimal(repr(float(cfg.density))), Decimal(repr(float(cfg.epsilon)))
        if e < 0 or d < 1 and not (d - e > 0 and d + e < 1):
            raise UsageError(
                f"epsilon {cfg.epsilon} with density {cfg.density} puts keep probabilities outside (0, 1)",
                f"give `epsilon` from 0 to below {min(d, 1 - d)}: probabilities range over density ± epsilon",
            )

    def _sparsify(self, cfg, seed, key):
        from peftcli.merging.arithmetic import dare_generator
        from peftcli.merging.methods._sparse_kernel import della_drop

        def sparsify(flat, shape, i):
            della_drop(flat, shape, dare_generator(seed, key, i), cfg.density, cfg.epsilon)

        return sparsify

    def _mix(self, cfg):
        from peftcli.merging.arithmetic import consensus, weighted_sum

        def mix(phis, weights):
            out = consensus(phis, weights, normalize=True) if self.elect else weighted_sum(phis, weights)
            if cfg.scale != 1:
                out.mul_(cfg.scale)
            return out

        return mix

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._sparse_kernel import sparse_whole

        return sparse_whole(phis, list(range(len(phis))), weights, self._sparsify(cfg, seed, key), self._mix(cfg))

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging import ranged
        from peftcli.merging.arithmetic import dare_generator
        from peftcli.merging.methods._sparse_kernel import RowTask, SparseTask, row_blocks

        opened = [(i, w, opener()) for i, w, opener in streams]
        blocks, _, _ = row_blocks(tuple(info.shape), info.numel)
        if max(stop - start for start, stop in blocks) > ranged.RANGE:  # a row longer than a range: held whole
            return SparseTask(name, info, out_dtype, opened, self._sparsify(cfg, seed, key), self._mix(cfg))
        generators = [dare_generator(seed, key, i) for i, _, _ in opened]
        return RowTask(name, info, out_dtype, opened, generators, cfg.density, cfg.epsilon, self._mix(cfg))

    def peak_bytes(self, n, touching, w):
        return 32 * min(n, 1 << 18)  # a block of rows' ranks, p and u (a row longer than a range: k φ whole)

    def whole_factor(self, k):
        return 3 * k + 4 if self.elect else 2 * k + 3


class DellaLinear(Della):
    name = "della-linear"
    summary = "drop by magnitude-ranked chance, rescale by 1/p, Σ λᵢ φ̃ᵢ, × scale"
    elect = False


DELLA = Della()
DELLA_LINEAR = DellaLinear()
