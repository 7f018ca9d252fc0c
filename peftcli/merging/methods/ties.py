"""``ties``: trim each φᵢ to its top density, elect a sign, average the agreeing (mergekit's ``ties``)."""

from __future__ import annotations

from peftcli.errors import UsageError
from peftcli.merging.methods.base import Density, MergeMethod


def check_density(name: str, density: float | None) -> None:
    if density is None:
        raise UsageError(f"{name} needs a density", "give a density in (0, 1], e.g. 0.5")
    if not 0.0 < density <= 1.0:
        raise UsageError(f"density must be in (0, 1], got {density}", "e.g. 0.5 keeps half of each task vector")


class Ties(MergeMethod):
    name = "ties"
    summary = "trim to the density, elect signs, mean of the agreeing"
    options = Density
    rate = "rank"

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        if weights and min(weights) < 0:
            raise UsageError(
                f"ties needs weights ≥ 0, got {min(weights)}",
                "ties divides by the agreeing weights; negate a task vector with linear or dare",
            )
        check_density(self.name, cfg.density)

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.arithmetic import consensus, trim

        return consensus([trim(phi, cfg.density) for phi in phis], weights, normalize=True)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.ranged import Ties as Ranged

        return Ranged(name, info, out_dtype, [(w, opener()) for _, w, opener in streams], cfg.density)

    def peak_bytes(self, n, touching, w):
        return (touching + 1) * w * n  # the k φ held whole and the ranked |φ|


TIES = Ties()
