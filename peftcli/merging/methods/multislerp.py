"""``multislerp``: mergekit's Multi-SLERP, barycentric interpolation of k ≥ 2 models on the sphere.

Input i's point xᵢ is its task vector φᵢ with ``--origin base`` (the default; mergekit with a
``base_model``, the result θ₀ + x) or its model θ₀ + φᵢ with ``--origin zero`` (mergekit without
``base_model``). Weights wᵢ (``--weights``, default 1 each) are divided by their sum unless
``--weights-as-given`` (mergekit's ``normalize_weights: false``). Per tensor, flattened, as
mergekit's ``multislerp`` with ``eps`` (``--eps``, default 1e-8):

- nᵢ = ‖xᵢ‖, uᵢ = xᵢ/(nᵢ + eps); m = Σ wᵢuᵢ;
- where ‖m‖ < eps: with two inputs the linear w₁x₁ + w₂x₂, with more refused naming the tensor
  (mergekit raises: the weighted directions cancel);
- else m̂ = m/‖m‖, the tangent τ = Σ wᵢ(uᵢ − (uᵢ·m̂)m̂), s = ‖τ‖ + eps, and
  x = (Σ wᵢnᵢ)·(cos s · m̂ + sin s/s · τ).

Every vector here is a combination of the xᵢ, so the coefficients follow in fp64 from the Gram
matrix xᵢ·xⱼ (pass 1 over ranges), and pass 2 writes Σ cᵢxᵢ (``_sphere_kernel.py``): nothing
is held whole. mergekit computes in the model's dtype; peftcli's fp64 sums agree with it to
that rounding. Tensors no input changes are copied (the engine's rule for every method):
mergekit's formula gives θ₀ there too with ``--origin base`` and two inputs, but raises with
three or more (every xᵢ = 0), and with ``--origin zero`` scales θ₀ by Σwᵢ·n/(n + eps) — so
``--origin zero`` with ``--weights-as-given`` needs Σwᵢ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import BadInputError, UsageError
from peftcli.merging.methods.base import MergeMethod
from peftcli.merging.methods.nuslerp import Origin
from peftcli.options import option


@dataclass
class MultislerpOptions(Origin):
    """Multi-SLERP's parameters: the weights' normalisation, eps, and the sphere's centre."""

    weights_as_given: bool = option(False, help="multislerp: take --weights as given instead of dividing them by their sum (mergekit's normalize_weights: false).")
    eps: float = option(1e-8, help="multislerp: added to norms before dividing, and the smallest mean norm (default 1e-8, mergekit's).")


class Multislerp(MergeMethod):
    name = "multislerp"
    summary = "mergekit's Multi-SLERP: weighted barycentric interpolation of the models on the sphere, per tensor"
    options = MultislerpOptions
    needs_base = True
    inputs = (2, None)
    rate = "merge"  # two passes over each tensor: the Gram sums, then the result

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        if not cfg.eps > 0:
            raise UsageError(f"eps must be > 0, got {cfg.eps}", "e.g. 1e-8, mergekit's default")
        total = sum(weights)
        if not cfg.weights_as_given and total == 0:
            raise UsageError("multislerp's weights sum to 0: they cannot be divided by their sum", "give `weights` whose sum is not 0, or `weights_as_given`")
        if cfg.weights_as_given and cfg.origin == "zero" and abs(total - 1.0) > 1e-6:
            # mergekit would scale every tensor by Σw, those no input changes too, which peftcli copies
            raise UsageError(
                f"multislerp with `origin` zero and `weights_as_given` needs weights summing to 1, got {total!r}",
                "drop `weights_as_given`, or give weights that sum to 1",
            )
        cfg.w = [w / total for w in weights] if not cfg.weights_as_given else list(weights)

    def coefficients(self, cfg):
        return lambda gram, name: multislerp_coefficients(gram, cfg.w, cfg.eps, name)

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._sphere_kernel import sphere_whole

        if base is None:
            raise UsageError("multislerp needs the base tensor", "pass base= (θ₀) to combine")
        return sphere_whole(base, dict(enumerate(phis)), len(phis), "tensor", cfg.origin == "base", self.coefficients(cfg), dtype, key)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        from peftcli.merging.methods._sphere_kernel import sphere_whole

        phis = {i: d(stored).to(work) for i, d in enumerate(deltas) if d is not None}
        return sphere_whole(stored, phis, len(deltas), "tensor", cfg.origin == "base", self.coefficients(cfg), work, key)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.methods._sphere_kernel import SphereTask

        openers = [(i, opener) for i, _, opener in streams]
        return SphereTask(name, info, out_dtype, openers, n_inputs, "tensor", cfg.origin == "base", self.coefficients(cfg))

    def whole_factor(self, k):
        return k + 4  # θ₀, the k φ, the result, a range's copies


def multislerp_coefficients(gram, weights: list[float], eps: float, name: str):
    """cᵢ with x = Σ cᵢxᵢ (1 × k) from the Gram matrix (1 × k × k, fp64): mergekit's multislerp."""
    import numpy as np

    g = gram[0]
    w = np.asarray(weights, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    c = w / (norms + eps)  # m = Σ wᵢuᵢ = Σ cᵢxᵢ
    m_norm = float(np.sqrt(max(0.0, c @ g @ c)))
    if m_norm < eps:
        if len(w) == 2:
            return w.reshape(1, -1)  # mergekit's linear fallback for two inputs
        raise BadInputError(
            f"multislerp: the weighted directions of {name!r} cancel (their mean is 0), where the interpolation is undefined",
            "give other `weights`, or use `method` linear",
        )
    m = c / m_norm
    dots = (g @ m) / (norms + eps)  # uᵢ·m̂
    tau = c - float(w @ dots) * m  # Σ wᵢ(uᵢ − (uᵢ·m̂)m̂)
    s = float(np.sqrt(max(0.0, tau @ g @ tau))) + eps
    scale = float(norms @ w)
    return (scale * (np.cos(s) * m + np.sin(s) / s * tau)).reshape(1, -1)


MULTISLERP = Multislerp()
