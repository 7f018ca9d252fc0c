"""Training some of the base's own tensors in place (BitFit, layers): selecting them by layer,
attaching their φ, folding it.

φ is the difference Δθ = θ − θ₀ of the selected base tensors, keyed by the base tensor's
name (``encoder.layer.0.attention.self.query.bias``) so that merging is a plain add. Zeros at
init. PEFT lacks these methods: their ``adapter_config.json`` is ``peftcli_section``'s.
"""

from __future__ import annotations

from typing import Callable

from peftcli.methods.base import Attached, mismatch_error
from peftcli.targets import layer_index, parse_layers, require_layers


def in_layers(names: list[str], all_names, spec: str | None) -> list[str]:
    """``names`` restricted to the layers of ``spec`` (all when None); absent layers are an error."""
    layer_set = parse_layers(spec)
    if layer_set is None:
        return names
    require_layers(layer_set, {i for i in map(layer_index, all_names) if i is not None})
    return [n for n in names if layer_index(n) in layer_set]


def attach_in_place(model, tensors: dict, selected: Callable[[str], bool], selection: str) -> Attached:
    """Make the base tensors named by ``tensors`` trainable, set θ = θ₀ + Δθ, export θ − θ₀.

    ``selected`` says whether the config selects a tensor name (``selection`` describes the
    config, for the error message).
    """
    import torch

    from peftcli import modules as mod

    problems: list[str] = []
    found: dict[str, torch.nn.Parameter] = {}
    owners: dict[int, str] = {}
    for key, delta in tensors.items():
        module_path, _, attr = key.rpartition(".")
        real = mod.resolve(model, module_path) if module_path else None
        param = model.get_submodule(real)._parameters.get(attr) if real is not None else None
        if param is None:
            problems.append(f"{key}: no such parameter in the base")
        elif tuple(delta.shape) != tuple(param.shape):
            problems.append(f"{key}: Δ {list(delta.shape)} but the base has {list(param.shape)}")
        elif not selected(key):
            problems.append(f"{key}: not selected by the config ({selection})")
        elif id(param) in owners:  # tied: one base tensor cannot take two differences
            problems.append(f"{key}: the same parameter as {owners[id(param)]}")
        else:
            owners[id(param)] = key
            found[key] = param
    if problems:
        raise mismatch_error(problems)
    theta0 = {}
    with torch.no_grad():
        for key, param in found.items():
            theta0[key] = param.detach().float().clone()  # a copy of just these tensors, for export
            param.copy_((theta0[key] + tensors[key].float().to(param.device)).to(param.dtype))

    phi = dict(found)

    def export() -> dict[str, torch.Tensor]:
        # Differences for our tensors; a parameter the caller added to phi (a new head) as itself.
        return {key: p.detach().float() - theta0[key] if key in theta0 else p for key, p in phi.items()}

    return Attached(phi=phi, export=export)


def stored_deltas(tensors: dict, ckpt) -> dict:
    """φ = θ − θ₀ keyed by base tensor name: each folds as itself."""

    problems = []
    for name, t in tensors.items():
        info = ckpt.tensors.get(name)
        if info is None:
            problems.append(f"{name}: no such tensor in the base")
        elif tuple(info.shape) != tuple(t.shape):
            problems.append(f"{name}: shape {list(t.shape)}, the base has {list(info.shape)}")
    if problems:
        raise mismatch_error(problems)
    return {name: (lambda stored, t=t: t.float()) for name, t in tensors.items()}
