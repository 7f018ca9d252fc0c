"""``dare`` and ``dare-ties``: drop each φᵢ's entries at random, rescale by 1/density, then
sum (mergekit's ``dare_linear``) or elect signs and sum the agreeing (``dare_ties``)."""

from __future__ import annotations

from peftcli.merging.methods.base import Density, MergeMethod
from peftcli.merging.methods.ties import check_density


class Dare(MergeMethod):
    name = "dare"
    summary = "random drop to the density, rescale, Σ λᵢ φ̃ᵢ"
    options = Density
    rate = "draw"
    elect = False  # dare-ties: elect a sign, sum the agreeing

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        check_density(self.name, cfg.density)

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.arithmetic import consensus, dare_generator, drop, weighted_sum

        dropped = [drop(phi, cfg.density, dare_generator(seed, key, i)) for i, phi in enumerate(phis)]
        return consensus(dropped, weights, normalize=False) if self.elect else weighted_sum(dropped, weights)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.ranged import Dare as Ranged

        return Ranged(name, info, out_dtype, [(i, w, opener()) for i, w, opener in streams], cfg.density, seed, key, ties=self.elect)

    def whole_factor(self, k):
        return 3 * k + 4 if self.elect else 2 * k + 3


class DareTies(Dare):
    name = "dare-ties"
    summary = "random drop to the density, rescale, elect signs, Σ of the agreeing"
    elect = True


DARE = Dare()
DARE_TIES = DareTies()
