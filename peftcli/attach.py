"""Module level: build a transformers model from a local directory and attach an adapter to it.

``load_base_model`` never passes ``trust_remote_code`` and never reaches a hub: the class is
taken from ``config.json``'s ``architectures`` among transformers' own classes.
``attach_adapter`` freezes the whole model, lets the adapter's method put φ in, and checks
that every tensor of the adapter found its place.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from peftcli import __version__
from peftcli.artifacts.adapter_dir import Adapter, read_adapter, write_adapter
from peftcli.errors import BadInputError
from peftcli.methods import Method, method_for_adapter_config
from peftcli.modules import freeze


def load_base_model(path: str, model_class: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model in directory ``path``, built by transformers from local files only."""
    import transformers

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise BadInputError(f"{path}: no config.json, so no model can be built from it", "pass a Hugging Face model directory")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    name = model_class or next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel  # still local-only; the Auto mapping picks the class from model_type
    try:
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{path}: transformers cannot build this model ({str(exc).splitlines()[0]})") from None
    return model.eval()


class AdaptedModel(nn.Module):
    """A base model with φ attached; exactly φ requires grad.

    ``forward`` takes the base model's keyword arguments (input composition methods rewrite
    them first). ``phi_state_dict`` and ``save`` give φ back in the artifact's layout.
    """

    def __init__(self, model: nn.Module, method: Method, cfg: Any, phi: dict, adapter_config: dict, transform=None, export=None):
        super().__init__()
        self.model = model
        self.method = method
        self.cfg = cfg
        self.adapter_config = adapter_config
        self._phi_names = list(phi)
        self._phi = phi  # artifact key -> parameter registered inside self.model
        self._transform = transform
        self._export = export

    def forward(self, **kwargs):
        if self._transform is not None:
            kwargs = self._transform(kwargs)
        return self.model(**kwargs)

    def phi_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._phi)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self._phi.values())

    def phi_state_dict(self) -> dict[str, torch.Tensor]:
        """φ in the artifact's layout (fp32, CPU), ready for ``write_adapter``."""
        if self._export is not None:
            return {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in self._export().items()}
        return {k: p.detach().to("cpu", torch.float32).contiguous().clone() for k, p in self._phi.items()}

    def save(self, out: str, *, force: bool = False, metadata: dict[str, str] | None = None) -> None:
        meta = {"peftcli.version": __version__, "peftcli.method": self.method.name, **(metadata or {})}
        write_adapter(out, self.adapter_config, self.phi_state_dict(), metadata=meta, force=force)


def attach_adapter(model: nn.Module, adapter: str | Adapter, model_config: dict | None = None) -> AdaptedModel:
    """Attach the adapter directory (or read ``Adapter``) to ``model`` in place."""
    if isinstance(adapter, str):
        adapter = read_adapter(adapter)
    method = method_for_adapter_config(adapter.config, adapter.path)
    cfg = method.config_from_adapter(adapter.config)
    if model_config is None:
        model_config = model.config.to_dict() if hasattr(model, "config") else {}
    freeze(model)
    attached = method.attach(model, cfg, adapter.tensors, model_config)
    unused = sorted(set(adapter.tensors) - set(attached.phi))
    if unused:
        raise BadInputError(
            f"{adapter.path}: {len(unused)} adapter tensor(s) match nothing in the base model, e.g. {unused[0]!r}",
            "was it made for another base model?",
        )
    for p in attached.phi.values():
        p.requires_grad_(True)
    return AdaptedModel(model, method, cfg, attached.phi, adapter.config, attached.input_transform, attached.export)


def load_adapted(base_path: str, adapter_path: str, model_class: str | None = None) -> AdaptedModel:
    """Build the base model from ``base_path`` and attach ``adapter_path`` to it."""
    adapter = read_adapter(adapter_path)
    model = load_base_model(base_path, model_class)
    return attach_adapter(model, adapter)
