"""``karcher``: the Karcher (Riemannian) mean of the models on the sphere, rescaled by their mean
norm, per tensor (mergekit's ``karcher``, parameters ``max_iter`` and ``tol``).

The inputs are full models θᵢ = θ₀ + φᵢ (a fine-tune, a diff or an adapter of the base each; θ₀
itself is not a point, as in mergekit's configuration without ``base_model``), k ≥ 2 of them, equal
weights aᵢ = 1/k. Per tensor, with nᵢ = ‖θᵢ‖ and ûᵢ = θᵢ/nᵢ over the inputs with nᵢ > tol (the
"valid" ones, weights renormalised over them), mergekit's iteration:

- u = Σ aᵢûᵢ normalised (û of the first valid input where ‖Σ aᵢûᵢ‖ < tol);
- up to ``max_iter`` times: T = Σ aᵢ·(θᵢ'/sin θᵢ')·(ûᵢ − (u·ûᵢ)·u) over the inputs whose angle
  θᵢ' = arccos(clamp(u·ûᵢ, −1, 1)) is at least tol; stop when ‖T‖ < tol; else
  u = cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised when its norm exceeds tol;
- θ = (Σ over all inputs of aᵢnᵢ)·u; no valid input gives 0.

u stays in the span of the ûᵢ, so peftcli runs the iteration on u's k coefficients in fp64, every
dot product from the Gram matrix θᵢ·θⱼ (pass 1 over ranges, fp64 sums), and writes θ = Σ wᵢθᵢ
range by range (pass 2; ``_karcher_kernel.py``): nothing is held whole. An input that does not
touch a tensor is the point θ₀ there. An angle within ~1e-6 of π (u opposite an input) leaves the step undefined:
refused, naming the tensor (mergekit's θ/sin θ is then ±1e7 or more).
Where mergekit 0.1.5 differs: it iterates on whole tensors in the model's dtype (bf16 models in
bf16), rounding u at every step; peftcli's fp64 coefficients agree with it to that rounding
(fp32: ~1e-6 relative), and where a norm or an angle lies within rounding of ``tol`` the two may
stop at a different iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import UsageError
from peftcli.merging.methods.base import MergeMethod
from peftcli.options import option


@dataclass
class KarcherOptions:
    """The Karcher mean's iteration: at most ``max_iter`` steps, ``tol`` for norms and angles."""

    max_iter: int = option(10, help="karcher: most iterations of the mean (default 10).", min=0, max=10**6)
    tol: float = option(1e-5, help="karcher: norms, angles and steps below it count as 0 (default 1e-5).")


class Karcher(MergeMethod):
    name = "karcher"
    summary = "the models' Karcher mean on the sphere, scaled by their mean norm, per tensor"
    options = KarcherOptions
    needs_base = True
    takes_weights = False
    inputs = (2, None)
    rate = "merge"  # two passes over each tensor: the Gram sums, then the result

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        if not cfg.tol >= 0:
            raise UsageError(f"tol must be ≥ 0, got {cfg.tol}", "e.g. 1e-5, mergekit's default")

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._karcher_kernel import karcher_whole

        if base is None:
            raise UsageError("karcher needs the base tensor", "pass base= (θ₀) to combine")
        return karcher_whole(base, dict(enumerate(phis)), len(phis), cfg, dtype, key)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        from peftcli.merging.methods._karcher_kernel import karcher_whole

        phis = {i: d(stored).to(work) for i, d in enumerate(deltas) if d is not None}
        return karcher_whole(stored, phis, len(deltas), cfg, work, key)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.methods._karcher_kernel import KarcherTask

        return KarcherTask(name, info, out_dtype, [(i, opener) for i, _, opener in streams], n_inputs, cfg, key)

    def whole_factor(self, k):
        return k + 4  # θ₀, the k φ, the result, a range's copies


KARCHER = Karcher()
