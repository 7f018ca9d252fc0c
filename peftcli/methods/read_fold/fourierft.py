"""FourierFT (Gao et al., 2024; PEFT's FOURIERFT), read and folded only: per adapted linear layer
(``nn.Linear`` or GPT-2's Conv1D) n trained spectral coefficients
``base_model.model.<module>.fourierft_spectrum`` [n] at n fixed frequencies, and
ΔW = real(ifft2(S)) · scaling with S the [out, in] spectrum holding the coefficients there.

PEFT does not save the frequencies: each layer draws them on load, the first n of
``torch.randperm(out·in, generator=torch.Generator().manual_seed(random_loc_seed))`` as (row,
column) = (i // in, i % in). peftcli draws them with the same call of the same torch, so they
are PEFT's (tests/test_read_fold_types.py compares them with PEFT's layers). Refused, by name:
``n_frequency_pattern``, ``exclude_modules``, ``bias`` other than ``"none"``, ``layers_pattern``,
a config key PEFT 0.21 does not write; a spectrum of another length, missing for a targeted
layer, or whose ΔW could leave float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from peftcli.checkpoint.model_config import is_json_number
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import PEFT_PREFIX, lazy_zeros, peft_key, targeted_module
from peftcli.methods.read_fold.base import CORRUPT, ReadFoldBase, checked_folds, positive_int, refuse_options, require_targets
from peftcli.methods.vera import FP32_MAX, is_int, refuse_unknown, target_fields
from peftcli.targets import LinearModule, linear_modules, resolve_targets

if TYPE_CHECKING:
    import torch

SUFFIX = "fourierft_spectrum"
_KEYS = ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "bias", "n_frequency_pattern", "exclude_modules")


@dataclass(frozen=True)
class FourierFtConfig:
    targets: str | None
    layers: str | None
    n_frequency: int
    scaling: float
    random_loc_seed: int


class FourierFt(ReadFoldBase):
    name = "fourierft"
    config_cls = FourierFtConfig
    summary = "Trained spectral coefficients at fixed random frequencies, ΔW = real(ifft2(S))·scaling (PEFT's FOURIERFT)."
    peft_type = "FOURIERFT"

    def config_from_adapter(self, d: dict) -> FourierFtConfig:
        what = "FOURIERFT"
        refuse_unknown(d, what, _KEYS)
        refuse_options(d, what, "FourierFT", {"n_frequency_pattern": {}, "exclude_modules": None, "bias": "none"})
        require_targets(d, what)
        n, scaling, seed = positive_int(d, what, "n_frequency", 1000), d.get("scaling", 150.0), d.get("random_loc_seed", 777)
        if not is_json_number(scaling) or not abs(scaling) <= FP32_MAX:
            raise BadInputError(f"FOURIERFT adapter config: 'scaling' must be a finite number, not {scaling!r}", CORRUPT)
        if not is_int(seed):
            raise BadInputError(f"FOURIERFT adapter config: 'random_loc_seed' must be an integer, not {seed!r}", CORRUPT)
        return FourierFtConfig(**target_fields(d, what), n_frequency=n, scaling=float(scaling), random_loc_seed=seed)

    def init(self, ckpt, cfg: FourierFtConfig, generator: "torch.Generator") -> dict:
        """The spectra PEFT saves for this config on ``ckpt`` (zero at PEFT's init), for check."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        try:
            modules = resolve_targets(shapes, ckpt.config, cfg.targets, cfg.layers)
        except UsageError as exc:
            raise BadInputError(f"the FOURIERFT adapter config selects no valid set of modules on this base: {exc.message}",
                                "was it made for another base model?") from None
        return {peft_key(m.name, SUFFIX): lazy_zeros(cfg.n_frequency) for m in modules}

    def deltas(self, cfg: FourierFtConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: PEFT's get_delta_weight, in the stored orientation."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(ckpt, cfg)
        problems, out = [], {}
        for key, t in sorted(tensors.items()):
            if not key.startswith(PEFT_PREFIX) or not key.endswith("." + SUFFIX):
                problems.append(f"unexpected key {key}")
                continue
            path = key[len(PEFT_PREFIX) : -len(SUFFIX) - 1]
            name, problem = targeted_module(path, linear, selected, "a FourierFT spectrum")
            problem = problem or (_spectrum_problem(key, t, cfg, linear[name]) if name else None)
            if problem:
                problems.append(problem)
            elif name is not None:
                out[name + ".weight"] = partial(_fold, spectrum=t, cfg=cfg, transposed=linear[name].transposed)
        return checked_folds(out, problems, selected, unfit, SUFFIX)


def _spectrum_problem(key: str, t, cfg: FourierFtConfig, m: LinearModule) -> str | None:
    out_f, in_f = m.shape
    if tuple(t.shape) != (cfg.n_frequency,):
        return f"{key} is {list(t.shape)}, not [{cfg.n_frequency}] (n_frequency)"
    if cfg.n_frequency > out_f * in_f:
        return f"{key}: n_frequency {cfg.n_frequency} is more than the {out_f}×{in_f} layer's {out_f * in_f} frequencies"
    # |real(ifft2(S))| ≤ Σ|S| / (out·in): a bound that decides float32's range without the transform
    if not float(t.float().abs().sum()) * abs(cfg.scaling) / (out_f * in_f) <= FP32_MAX / 2:
        return f"{key}: ΔW = real(ifft2(S))·scaling is not finite in float32 (NaN/Inf or absurd values)"
    return None


def frequencies(out_f: int, in_f: int, n: int, seed: int) -> "torch.Tensor":
    """PEFT's FourierFTLayer.update_layer: the (row, column) of each of the n coefficients, [2, n]."""
    import torch

    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_f, flat % in_f], dim=0)


def _fold(stored: "torch.Tensor", *, spectrum, cfg: FourierFtConfig, transposed: bool) -> "torch.Tensor":
    """PEFT's get_delta_weight: a float32 [out, in] spectrum, ifft2, real part times scaling."""
    import torch

    out_f, in_f = (stored.shape[1], stored.shape[0]) if transposed else tuple(stored.shape)
    idx = frequencies(out_f, in_f, cfg.n_frequency, cfg.random_loc_seed)
    dense = torch.zeros(out_f, in_f)
    dense[idx[0, :], idx[1, :]] = spectrum.float()
    delta = (torch.fft.ifft2(dense).real * cfg.scaling).to(spectrum.dtype).float()  # PEFT rounds ΔW to φ's dtype
    return delta.T if transposed else delta
