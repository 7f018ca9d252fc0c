"""C3A (Chen et al., 2025; PEFT's C3A), read and folded only: per adapted ``nn.Linear`` a kernel
``base_model.model.<module>.c3a_kernel`` [out/b, in/b, b] of block-circulant blocks of size b
(``block_size``), and ΔW = C(kernel) / in, C the [out, in] block-circulant matrix PEFT's
``get_circulant_fast`` builds with FFTs (the same float32 operations here, so ΔW is PEFT's).

Refused, naming the key: ``block_size_pattern``, ``bias`` other than ``"none"``, a config key
PEFT 0.21 does not write, a kernel of another shape or missing for a targeted layer, a block
size that does not divide a layer, a GPT-2 Conv1D target (PEFT's C3A adapts ``nn.Linear``
only), a ΔW that could leave float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from peftcli.methods.base import PEFT_PREFIX, lazy_zeros, peft_key, targeted_module
from peftcli.methods.read_fold.base import ReadFoldBase, checked_folds, positive_int, refuse_options, require_targets
from peftcli.methods.vera import FP32_MAX, refuse_unknown, target_fields
from peftcli.targets import linear_modules

if TYPE_CHECKING:
    import torch

KERNEL = "c3a_kernel"
_KEYS = ("block_size", "block_size_pattern", "bias")


@dataclass(frozen=True)
class C3aConfig:
    targets: str | None
    layers: str | None
    block_size: int


class C3a(ReadFoldBase):
    name = "c3a"
    config_cls = C3aConfig
    summary = "Block-circulant ΔW from trained kernels, a circular convolution per block (PEFT's C3A)."
    peft_type = "C3A"

    def config_from_adapter(self, d: dict) -> C3aConfig:
        refuse_unknown(d, "C3A", _KEYS)
        refuse_options(d, "C3A", "C3A", {"block_size_pattern": {}, "bias": "none"})
        require_targets(d, "C3A")
        return C3aConfig(**target_fields(d, "C3A"), block_size=positive_int(d, "C3A", "block_size", 256))

    def init(self, ckpt, cfg: C3aConfig, generator: "torch.Generator") -> dict:
        """The kernels PEFT saves for this config on ``ckpt`` (shapes only matter: check compares them)."""
        selected, unfit = self._selected(ckpt, cfg)
        if unfit is not None:
            raise unfit
        b = cfg.block_size
        return {peft_key(m.name, KERNEL): lazy_zeros(m.shape[0] // b, m.shape[1] // b, b) for m in selected.values()}

    def deltas(self, cfg: C3aConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: PEFT's get_delta_weight, C(kernel) / in."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(ckpt, cfg)
        problems, out = [], {}
        for key, t in sorted(tensors.items()):
            if not key.startswith(PEFT_PREFIX) or not key.endswith("." + KERNEL):
                problems.append(f"unexpected key {key}")
                continue
            path = key[len(PEFT_PREFIX) : -len(KERNEL) - 1]
            name, problem = targeted_module(path, linear, selected, "a C3A kernel")
            problem = problem or (_problem(key, t, cfg.block_size, linear[name]) if name else None)
            if problem:
                problems.append(problem)
            elif name is not None:
                out[name + ".weight"] = partial(_fold, kernel=t)
        return checked_folds(out, problems, selected, unfit, KERNEL)


def _problem(key: str, t, b: int, m) -> str | None:
    out_f, in_f = m.shape
    if m.transposed:
        return f"{key}: a GPT-2 Conv1D layer, which PEFT's C3A does not adapt"
    if out_f % b or in_f % b:
        return f"{key}: block_size {b} does not divide the {out_f}×{in_f} layer"
    if tuple(t.shape) != (out_f // b, in_f // b, b):
        return f"{key} is {list(t.shape)}, not [{out_f // b}, {in_f // b}, {b}] (block_size {b} on a {out_f}×{in_f} layer)"
    # C's entries are the kernel's; the FFTs on the way sum b of them (float32 must hold that too)
    if not float(t.float().abs().max()) * b <= FP32_MAX / 2:
        return f"{key}: ΔW is not finite in float32 (NaN/Inf or absurd values)"
    return None


def circulant(w: "torch.Tensor") -> "torch.Tensor":
    """PEFT's c3a ``get_circulant_fast``: the [m·b, n·b] block-circulant matrix of kernel w [m, n, b]."""
    import torch
    from torch.fft import fft, ifft

    _, n, b = w.shape
    x = torch.eye(n * b, dtype=w.dtype, device=w.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(w))
    return fft(x).real.flatten(start_dim=1).T


def _fold(stored: "torch.Tensor", *, kernel) -> "torch.Tensor":
    """PEFT's get_delta_weight: C(kernel in float32), rounded to the base weight's dtype, over in."""
    return circulant(kernel.float()).to(stored.dtype).float() / stored.shape[-1]
