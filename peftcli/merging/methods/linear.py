"""``linear``: task arithmetic, θ₀ + Σ λᵢ φᵢ (mergekit's ``task_arithmetic``)."""

from __future__ import annotations

from peftcli.merging.methods.base import MergeMethod


class Linear(MergeMethod):
    name = "linear"
    weighted_sum = True
    summary = "θ₀ + Σ λᵢ φᵢ (task arithmetic)"

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.arithmetic import weighted_sum

        return weighted_sum(phis, weights)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        import torch

        from peftcli.checkpoint.dtypes import plus_base

        # Σ λᵢφᵢ accumulated one input at a time (the same operations, in the same order, as
        # combine's weighted sum), so only one φ is alive at once.
        result = torch.zeros(stored.shape, dtype=work)
        for d, w in zip(deltas, lam):
            if d is not None:
                phi = d(stored)
                result.add_(phi, alpha=w)
                del phi
        plus_base(result, stored)  # θ₀ + Σ λᵢφᵢ in the work dtype; one cast at the end
        return result

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.ranged import Linear as Ranged

        return Ranged(name, info, out_dtype, [(w, opener()) for _, w, opener in streams])

    def whole_factor(self, k):
        return 3


LINEAR = Linear()
