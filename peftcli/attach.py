"""Module level: build a transformers model from a local directory and attach an adapter to it.

``load_base_model`` never passes ``trust_remote_code`` and never reaches a hub: the class is
taken from ``config.json``'s ``architectures`` among transformers' own classes.
``attach_adapter`` freezes the whole model, lets the adapter's method put φ in, and checks
that every tensor of the adapter found its place.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from peftcli import __version__
from peftcli import modules
from peftcli.artifacts.adapter_dir import Adapter, read_adapter, write_adapter, write_adapter_files
from peftcli.errors import BadInputError
from peftcli.methods import Method, method_for_adapter_config
from peftcli.methods.base import PEFT_PREFIX
from peftcli.modules import freeze


def load_base_model(
    path: str, model_class: str | None = None, dtype: torch.dtype = torch.float32, with_info: bool = False, **kwargs
):
    """The model in directory ``path``, built by transformers from local files only (or from
    the llama GGUF file ``path``, see ``peftcli.checkpoint.gguf_model``).

    ``model_class`` names a transformers class (e.g. ``AutoModelForSequenceClassification``);
    by default the checkpoint's own architecture. ``with_info`` also returns transformers'
    loading info (``missing_keys`` are the freshly initialised parameters, e.g. a new head).
    """
    import transformers

    from peftcli.checkpoint.gguf_model import is_gguf, load_gguf_model

    if is_gguf(path):  # built in memory from the GGUF, dequantised tensor by tensor
        model, info = load_gguf_model(path, model_class, dtype, **kwargs)
        return (model, info) if with_info else model
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise BadInputError(f"{path}: no config.json, so no model can be built from it", "pass a Hugging Face model directory")
    from peftcli.checkpoint.model_config import check_model_config
    from peftcli.checkpoint.reader import load_json

    # One line, not a traceback, for a broken config.json; a pre-quantized one is refused here
    # before transformers would reach for its quantizer.
    config = check_model_config(load_json(config_path, "config"), config_path)
    name = model_class or next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel  # still local-only; the Auto mapping picks the class from model_type
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(
            f"{path}: transformers cannot build this model: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}",
            "check that config.json's model_type and architectures match the weights",
        ) from None
    model.eval()
    return (model, info) if with_info else model


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load bars and reports ("score.weight MISSING") are expected here, not news."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class AdaptedModel(nn.Module):
    """A base model with φ attached; exactly φ requires grad.

    ``forward`` takes the base model's keyword arguments (input composition methods rewrite
    them first). ``phi_state_dict`` and ``save`` give φ back in the artifact's layout.
    """

    # Base tensors carry φ's gradient (a sparse φ: LT-SFT, diff-pruning), set by ``attach``:
    # hooks fill φ's gradients after backward, which distributed training averages by hand.
    grad_carriers: bool = False

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
        self._head_keys = {k for k in phi if any(k.startswith(f"{PEFT_PREFIX}{h}.") for h in adapter_config.get("modules_to_save") or [])}

    def forward(self, **kwargs):
        if self._transform is not None:
            kwargs = self._transform(kwargs)
        return self.model(**kwargs)

    def phi_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._phi)

    @property
    def rewrites_inputs(self) -> bool:
        """Whether φ enters through the inputs of each call (prompt and prefix tuning), so a
        key/value cache of earlier tokens cannot be reused across calls."""
        return self._transform is not None

    def head_parameter_names(self) -> set[str]:
        """The keys of ``phi_parameters`` that are a task head trained with φ (``modules_to_save``)."""
        return set(self._head_keys)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self._phi.values())

    def phi_state_dict(self) -> dict[str, torch.Tensor]:
        """φ in the artifact's layout (fp32, CPU), ready for ``write_adapter``. Sharded φ
        (``train --shard``) is gathered whole: then every worker must call this."""
        tensors = self._phi
        if self._export is not None:  # a trained head is saved as itself beside the exported φ
            tensors = {**self._export(), **{k: self._phi[k] for k in self._head_keys}}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from peftcli.training.sharding import full

            tensors = {k: full(t) for k, t in tensors.items()}
        # Integer tensors (a sparse φ's indices) keep their dtype; values are saved as fp32.
        return {
            self._model_key(k): t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()
            for k, t in tensors.items()
        }

    def _apply(self, fn, recurse=True):
        # A move that cannot convert in place (to or from the meta device) registers new
        # parameter objects: φ's map must follow them, or it holds (and counts) the old ones.
        owners = {id(p): (m, n) for m in self.modules() for n, p in m.named_parameters(recurse=False)}
        out = super()._apply(fn, recurse)
        self._phi.update({k: getattr(*owners[id(p)]) for k, p in self._phi.items() if id(p) in owners})
        return out

    def rebind_phi(self, params: dict[str, nn.Parameter]) -> None:
        """Hold these parameters as φ under the same keys: a wrapper that registers new ones
        (FSDP2's sharded parameters) replaces them here too."""
        unknown = set(params) - set(self._phi)
        if unknown:
            raise KeyError(f"not φ: {sorted(unknown)[:3]}")
        self._phi.update(params)

    def _model_key(self, key: str) -> str:
        """PEFT keys name module paths in the model they are used with: a BertModel checkpoint's
        ``encoder.layer.0...`` is ``bert.encoder.layer.0...`` in BertForSequenceClassification, and
        PEFT silently ignores keys that do not match. So write paths as this model has them.
        Saved modules (a trained head) keep peftcli's inner name ``base_model.model.<module>``;
        the writer names them as PEFT does for the method (``adapter_dir.to_file_layout``)."""
        if not key.startswith(PEFT_PREFIX) or key in self._head_keys:
            return key
        rest = key[len(PEFT_PREFIX) :]
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        if not prefix:
            return key
        first = rest.split(".", 1)[0]
        if first != prefix and isinstance(getattr(self.model, first, None), nn.Module):
            return key  # a module of the head class itself (its lm_head), outside the base model
        if rest.startswith(prefix + "."):
            rest = rest[len(prefix) + 1 :]
        if isinstance(getattr(self.model, prefix, None), nn.Module):  # a head class wrapping the base model
            rest = f"{prefix}.{rest}"
        return PEFT_PREFIX + rest

    def save(self, out: str, *, force: bool = False, metadata: dict[str, str] | None = None) -> None:
        """Write φ (and a trained head) as a new adapter directory ``out``."""
        write_adapter(out, self.adapter_config, self.phi_state_dict(), metadata=self._metadata(metadata), force=force)

    def save_into(self, directory: str, metadata: dict[str, str] | None = None, phi: dict[str, torch.Tensor] | None = None) -> None:
        """Replace the adapter files inside an existing directory (a training run), each
        atomically. ``phi``: ``phi_state_dict()`` already gathered (by every worker of a sharded run)."""
        state = phi if phi is not None else self.phi_state_dict()
        write_adapter_files(directory, self.adapter_config, state, metadata=self._metadata(metadata))

    def _metadata(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"peftcli.version": __version__, "peftcli.method": self.method.name, **(extra or {})}

    def add_head(self, module_names: list[str], task_type: str) -> None:
        """Train and save these (freshly initialised) modules too, as PEFT's ``modules_to_save``."""
        for name in module_names:
            for pname, p in self.model.get_submodule(name).named_parameters():
                p.requires_grad_(True)
                self._phi[f"{PEFT_PREFIX}{name}.{pname}"] = p
                self._head_keys.add(f"{PEFT_PREFIX}{name}.{pname}")
        self.adapter_config = {**self.adapter_config, "modules_to_save": list(module_names), "task_type": task_type}


def attach_adapter(model: nn.Module, adapter: str | Adapter, model_config: dict | None = None) -> AdaptedModel:
    """Attach the adapter directory (or read ``Adapter``) to ``model`` in place."""
    if isinstance(adapter, str):
        adapter = read_adapter(adapter)
    method = method_for_adapter_config(adapter.config, adapter.path)
    cfg = method.config_from_adapter(adapter.config)
    if model_config is None:
        model_config = model.config.to_dict() if hasattr(model, "config") else {}
    freeze(model)
    heads = _load_heads(model, adapter)
    tensors = {k: t for k, t in adapter.tensors.items() if k not in heads}
    attached = method.attach(model, cfg, tensors, model_config)
    attached.phi.update(heads)
    unused = sorted(set(adapter.tensors) - set(attached.phi) - attached.derived)
    if unused:
        raise BadInputError(
            f"{adapter.path}: {len(unused)} adapter tensor(s) match nothing in the base model, e.g. {unused[0]!r}",
            "was it made for another base model?",
        )
    # New modules come with requires_grad=True; exactly φ trains, whatever a method added.
    freeze(model)
    for p in attached.phi.values():
        p.requires_grad_(True)
    # A sparse φ's base tensors carry its gradient (hooks gather it into φ and free it at once).
    for p in attached.extras.get("grad_carriers", ()):
        p.requires_grad_(True)
    adapted = AdaptedModel(model, method, cfg, attached.phi, adapter.config, attached.input_transform, attached.export)
    adapted.grad_carriers = bool(attached.extras.get("grad_carriers"))
    return adapted


def _load_heads(model: nn.Module, adapter: Adapter) -> dict[str, nn.Parameter]:
    """Load ``modules_to_save`` tensors (e.g. a classification head) into the model's own modules."""
    names = adapter.config.get("modules_to_save") or []
    heads: dict[str, nn.Parameter] = {}
    problems = []
    for name in names:
        real = modules.resolve(model, name)
        if real is None:
            problems.append(f"{name}: no such module (build the model for the adapter's task_type)")
            continue
        for pname, p in model.get_submodule(real).named_parameters():
            key = f"{PEFT_PREFIX}{name}.{pname}"
            t = adapter.tensors.get(key)
            if t is None:
                problems.append(f"{key}: missing")
            elif _tied_to_input(model, p):  # copying it in would change the input embedding too
                raise BadInputError(
                    f"modules_to_save names {name}, which this model ties to its input embedding",
                    "PEFT unties the trained module; peftcli does not: use the adapter with PEFT",
                )
            elif tuple(t.shape) != tuple(p.shape):
                problems.append(f"{key}: shape {list(t.shape)}, the model has {list(p.shape)}")
            else:
                with torch.no_grad():
                    p.copy_(t)
                heads[key] = p
    if problems:
        raise BadInputError(
            f"{adapter.path}: saved modules do not fit the model: " + "; ".join(problems[:5]),
            "pass the base model the adapter was trained on (with the same number of labels)",
        )
    return heads


def _tied_to_input(model: nn.Module, p: nn.Parameter) -> bool:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings is not None and getattr(embeddings, "weight", None) is p and _is_output(model, p)


def _is_output(model: nn.Module, p: nn.Parameter) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and getattr(out, "weight", None) is p


def load_adapted(base_path: str, adapter_path: str, model_class: str | None = None) -> AdaptedModel:
    """Build the base model from ``base_path`` and attach ``adapter_path`` to it, in eval mode
    (dropout off: the same inputs give the same outputs; call ``.train()`` to train it)."""
    adapter = read_adapter(adapter_path)
    model = load_base_model(base_path, model_class)
    return attach_adapter(model, adapter).eval()
