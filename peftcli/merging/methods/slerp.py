"""``slerp``: spherical interpolation between two models, θ = slerp(t, θ_A, θ_B), per tensor.

θ_A = θ₀ + φ_A and θ_B = θ₀ + φ_B are the two inputs as full models (a fine-tune, a diff or an
adapter of the base each); mergekit's ``slerp`` with ``base_model`` the first model is the case
φ_A = 0. Per tensor, with a = θ_A, b = θ_B flattened (``_slerp_kernel.py``):

- â = a/‖a‖, b̂ = b/‖b‖ (each only when its norm exceeds 1e-8, as mergekit's ``normalize``),
  d = â·b̂; where |d| > 0.9995 (mergekit's DOT_THRESHOLD: nearly parallel) θ = (1 − t)a + t b;
- else ω = arccos d, θ = sin((1 − t)ω)/sin ω · a + sin(tω)/sin ω · b.

``t`` is a value or a list interpolated across the layers, as mergekit's gradients: layer i of L
sits at position p = i/(L − 1) (p = 1 when L = 1), and a list v of n values gives
(1 − f)·v[j] + f·v[j + 1] at p·(n − 1) = j + f. ``--t-attention`` and ``--t-mlp`` replace ``--t``
for the attention and MLP tensors of the layers (mergekit's ``filter: self_attn`` / ``mlp``);
tensors outside numbered layers (embeddings, final norm, head) take ``--t`` at position 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peftcli.errors import UsageError
from peftcli.merging.methods.base import MergeMethod
from peftcli.options import option

DOT_THRESHOLD = 0.9995  # mergekit's: |â·b̂| above it interpolates linearly
EPS = 1e-8  # mergekit's: a norm at most this is not divided by
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
ATTENTION = {"self_attn", "attn", "attention", "self_attention"}
MLP = {"mlp", "feed_forward", "ffn"}
_T = "T[,T...]"


@dataclass
class SlerpOptions:
    """SLERP's parameters: t schedules, each one value or comma-separated values across layers."""

    t: str | None = option(None, help="slerp: 0 is the first model, 1 the second; a list (0,0.5,1) is interpolated across layers.", metavar=_T)
    t_attention: str | None = option(None, help="slerp: t of the layers' attention tensors (default --t).", metavar=_T)
    t_mlp: str | None = option(None, help="slerp: t of the layers' MLP tensors (default --t).", metavar=_T)
    layers: int | None = field(default=None, init=False, repr=False)  # the base's, once planned

    def __post_init__(self) -> None:
        if self.t is None:
            raise UsageError("slerp needs `t`", "give `t` 0.5, or a list across layers such as `t` 0,0.5,1")
        self.schedules = {k: _schedule(k, getattr(self, k)) for k in ("t", "t_attention", "t_mlp") if getattr(self, k) is not None}


def _schedule(key: str, value) -> tuple[float, ...]:
    """A t value or list, each in [0, 1]; the error names the key (`t`, `t_attention`, `t_mlp`)."""
    flag = f"`{key}`"
    parts = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value).split(",")
    try:
        values = tuple(float(p) if isinstance(p, (int, float)) else float(p.strip()) for p in parts)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a number or comma-separated numbers", f"give {flag} such as 0.5 or 0,0.5,1") from None
    bad = next((v for v in values if not 0.0 <= v <= 1.0), None)  # nan too
    if bad is not None:
        raise UsageError(f"{flag} value {bad} is outside [0, 1]", f"give {flag} values from 0 (the first model) to 1 (the second)")
    return values


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation of two models, t per layer for attention and MLP"
    options = SlerpOptions
    needs_base = True
    takes_weights = False
    inputs = (2, 2)
    rate = "merge"  # two passes over each tensor: the norms, then the result

    def plan(self, cfg: SlerpOptions, names) -> None:
        """Bind the schedules to the base's layers; a list longer than the layers is an error."""
        indices = [int(m.group(1)) for n in names if (m := LAYER.search(n))]
        cfg.layers = max(indices) + 1 if indices else 0
        for key, values in cfg.schedules.items():
            if len(values) > 1 and len(values) > cfg.layers:
                flag = f"`{key}`"
                raise UsageError(
                    f"{flag} has {len(values)} values but the base has {cfg.layers} layers",
                    f"give {flag} one value, or 2 to {cfg.layers} values interpolated across the layers" if cfg.layers > 1 else f"give {flag} one value",
                )

    def t_for(self, cfg: SlerpOptions, name: str) -> float:
        """The t of tensor ``name`` (see the module docstring)."""
        match = LAYER.search(name)
        schedule, position = cfg.schedules["t"], 0.0
        if match:
            parts = set(name.split("."))
            family = "t_attention" if parts & ATTENTION else "t_mlp" if parts & MLP else "t"
            schedule = cfg.schedules.get(family, schedule)
            if cfg.layers is None and len(schedule) > 1:
                raise UsageError("a t list needs the model's layers", "merge with peftcli merge, which reads them from the base")
            position = int(match.group(1)) / (cfg.layers - 1) if (cfg.layers or 0) > 1 else 1.0
        return gradient(schedule, position)

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._slerp_kernel import slerp_whole

        if base is None:
            raise UsageError("slerp needs the base tensor", "pass base= (θ₀) to combine")
        return slerp_whole(base.to(dtype), phis[0], phis[1], self.t_for(cfg, key), dtype)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        from peftcli.merging.methods._slerp_kernel import slerp_whole

        phis = [d(stored).to(work) if d is not None else None for d in deltas]
        return slerp_whole(stored.to(work), phis[0], phis[1], self.t_for(cfg, key), work)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.methods._slerp_kernel import SlerpTask

        return SlerpTask(name, info, out_dtype, [(i, opener) for i, _, opener in streams], self.t_for(cfg, key))

    def whole_factor(self, k):
        return 5  # θ₀, a, b, the result, a scratch range


def gradient(values: tuple[float, ...], position: float) -> float:
    """mergekit's ``evaluate_setting`` of a numeric list at ``position`` in [0, 1]."""
    scaled = position * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


SLERP = Slerp()
