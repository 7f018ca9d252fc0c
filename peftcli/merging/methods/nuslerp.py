"""``nuslerp``: mergekit's NuSLERP, spherical interpolation of two models' tensors with weights.

Two inputs A and B with weights w_A, w_B (``--weights``, default 1 each) interpolate at
t = w_B/(w_A + w_B). Their points are x_A, x_B: with ``--origin base`` (the default; mergekit
with a ``base_model``) the task vectors φ_A, φ_B, the result θ₀ + nuslerp(t, φ_A, φ_B); with
``--origin zero`` (mergekit without ``base_model``) the models θ₀ + φ_A, θ₀ + φ_B themselves.
Per vector of each tensor (``--nuslerp-vectors``: ``tensor``, the whole tensor flattened,
mergekit's ``nuslerp_flatten: true``, its default; ``rows``, each vector along the last
dimension, mergekit's ``nuslerp_flatten: false``; ``columns``, each vector along the first
dimension, mergekit's ``nuslerp_row_wise: true`` with ``nuslerp_flatten: false``), as
mergekit's ``nuslerp``:

- cos θ = (a·b)/(max(‖a‖, 1e-7)·max(‖b‖, 1e-7)) clamped to [−1, 1] (its ``_normalize``);
- where |sin θ| < 1e-8 (parallel, or opposite), the linear (1 − t)a + t b;
- else sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b.

The coefficients are computed in fp64 from fp64 sums (mergekit: in the model's dtype) and
applied in the work dtype (``_sphere_kernel.py``). Where peftcli differs: weights summing to
|w_A + w_B| < 1e-6 are refused (mergekit then takes t = 0.5, "fairly arbitrary" in its words).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import UsageError
from peftcli.merging.methods.base import MergeMethod
from peftcli.options import option

NORM_EPS = 1e-7  # mergekit's _normalize clamps a norm below it to it
SIN_EPS = 1e-8  # mergekit's nuslerp eps: |sin θ| below it interpolates linearly
WEIGHT_SUM = 1e-6  # mergekit's |w_A + w_B| below which t is not w_B / (w_A + w_B)
VECTORS = ("tensor", "rows", "columns")
ORIGINS = ("base", "zero")


@dataclass
class Origin:
    """Where the sphere of nuslerp and multislerp is centred (shared by both)."""

    origin: str = option(
        "base", choices=ORIGINS,
        help="nuslerp, multislerp: base (default) interpolates the task vectors and adds the base back (mergekit's base_model); zero, the models themselves.",
    )


@dataclass
class NuslerpOptions(Origin):
    """NuSLERP's parameters: which vectors of a tensor are interpolated, and the sphere's centre."""

    nuslerp_vectors: str = option(
        "tensor", choices=VECTORS,
        help="nuslerp: tensor (default: each tensor as one vector), rows (vectors along the last dimension) or columns (along the first).",
    )


class Nuslerp(MergeMethod):
    name = "nuslerp"
    summary = "mergekit's NuSLERP: spherical interpolation of two models at t = w_B/(w_A + w_B), per tensor, row or column"
    options = NuslerpOptions
    needs_base = True
    inputs = (2, 2)
    rate = "merge"  # two passes over each tensor: the sums, then the result

    def validate(self, cfg, weights, n):
        super().validate(cfg, weights, n)
        total = weights[0] + weights[1]
        if abs(total) < WEIGHT_SUM:
            raise UsageError(f"nuslerp's weights sum to {total!r}: t = w_B/(w_A + w_B) is undefined", "give `weights` whose sum is not 0, e.g. 0.5,0.5")
        cfg.t = weights[1] / total

    def coefficients(self, cfg):
        return lambda gram, name: nuslerp_coefficients(gram, cfg.t)

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._sphere_kernel import sphere_whole

        if base is None:
            raise UsageError("nuslerp needs the base tensor", "pass base= (θ₀) to combine")
        return sphere_whole(base, dict(enumerate(phis)), 2, cfg.nuslerp_vectors, cfg.origin == "base", self.coefficients(cfg), dtype, key)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        from peftcli.merging.methods._sphere_kernel import sphere_whole

        phis = {i: d(stored).to(work) for i, d in enumerate(deltas) if d is not None}
        return sphere_whole(stored, phis, len(deltas), cfg.nuslerp_vectors, cfg.origin == "base", self.coefficients(cfg), work, key)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.methods._sphere_kernel import SphereTask

        openers = [(i, opener) for i, _, opener in streams]
        return SphereTask(name, info, out_dtype, openers, n_inputs, cfg.nuslerp_vectors, cfg.origin == "base", self.coefficients(cfg))

    def whole_factor(self, k):
        return 5  # θ₀, the two φ, the result, a range's copies


def nuslerp_coefficients(gram, t: float):
    """(s_a, s_b) per vector (V × 2) from its 2 × 2 Gram matrix (V × 2 × 2, fp64): mergekit's
    nuslerp (module docstring), every vector at once."""
    import numpy as np

    na, nb = np.sqrt(np.maximum(gram[:, 0, 0], 0.0)), np.sqrt(np.maximum(gram[:, 1, 1], 0.0))
    cos = gram[:, 0, 1] / (np.maximum(na, NORM_EPS) * np.maximum(nb, NORM_EPS))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    sin = np.sin(theta)
    linear = np.abs(sin) < SIN_EPS
    safe = np.where(linear, 1.0, sin)  # no division by 0 where the linear fallback applies
    out = np.empty((len(gram), 2))
    out[:, 0] = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    out[:, 1] = np.where(linear, t, np.sin(t * theta) / safe)
    return out


NUSLERP = Nuslerp()
