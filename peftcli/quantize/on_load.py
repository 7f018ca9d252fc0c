"""Quantise-on-load (module level): a causal LM whose frozen linear weights go from the
checkpoint straight into NF4, never all held in the base dtype at once.

``load_deferred`` hands transformers every tensor of the checkpoint except the linear weights
``--quantize nf4`` will replace. In their place it passes placeholders that hold no memory: a
one-element NaN tensor expanded to the weight's shape. transformers keeps them as they are
(same dtype, nothing to copy), so the model is built holding only the embeddings, norms and
output projection. ``peftcli.training.precision.quantize_frozen_linears`` then reads each
deferred weight from the checkpoint (into memory of its own, not a memory map), quantises
it and drops it: the peak is the NF4 model plus one layer's weight, where loading the whole
model first costs every weight in the base dtype (28 GB for a 7B model in fp32).

The result is the same model bit for bit as loading whole and quantising after
(``tests/test_quantize_on_load.py``): each weight is cast to the base dtype as transformers
casts it, then quantised. NaN placeholders make any use before quantisation loud (a NaN
loss, or an error for an in-place write to an expanded tensor), never a plausible value; a
placeholder left unquantised is replaced by its real tensor.

Only where that equality is plain: a safetensors checkpoint whose tensor names are the
model's own (no renaming on load), a causal LM with no new parameters to initialise, and
an adapter that leaves the base's linear weights alone (``eligible``). Anything else loads
whole, then quantises: the same result with more memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SAFETENSORS = ("safetensors", "safetensors-sharded")


@dataclass
class Deferred:
    """The weights a model holds placeholders for: placeholder storage → checkpoint tensor name."""

    path: str
    dtype: torch.dtype
    names: dict[int, str] = field(default_factory=dict)

    def name_of(self, weight: torch.Tensor) -> str | None:
        """The checkpoint name of ``weight`` if it is a placeholder, else None."""
        return self.names.get(weight.data_ptr()) if weight.numel() > 1 and not any(weight.stride()) else None

    def read(self, ckpt, name: str) -> torch.Tensor:
        """Tensor ``name`` in the base dtype, cast as transformers casts what it loads."""
        return ckpt.get(name).to(self.dtype)


def eligible(adapter, task: str, full: bool) -> bool:
    """Whether this run's base can load with deferred linear weights (see the module doc)."""
    if full or task == "classify" or adapter is None:
        return False
    config = adapter.config
    if config.get("modules_to_save"):
        return False  # a trained copy of a base module is made from its weights at attach
    from peftcli.methods import method_for_adapter_config

    method = method_for_adapter_config(config, adapter.path)
    if method.trains_in_place:
        return False
    cfg = method.config_from_adapter(config)
    return getattr(cfg, "base_init", None) is None  # PiSSA/OLoRA rewrite the base weights at attach


def deferred_linears(model: nn.Module) -> list[str]:
    """Names of the linear (and GPT-2 Conv1D) layers whose weights are deferred: all but the
    output projection, which QLoRA keeps in the base dtype (as ``precision.quantizable_linears``)."""
    from peftcli import modules

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name for name, layer in model.named_modules()
        if (isinstance(layer, nn.Linear) or modules.is_conv1d(layer)) and layer is not out
    ]


def deferrable(skeleton: nn.Module, ckpt) -> list[str] | None:
    """The checkpoint names of the weights ``load_deferred`` leaves in ``ckpt`` for the model
    ``skeleton`` (built on the meta device), or None where it loads whole: weights stored
    under names transformers would map, weights it would initialise, or not safetensors."""
    if ckpt.storage not in SAFETENSORS:
        return None
    expected = skeleton.state_dict()
    if set(expected) - set(ckpt.tensors) - _tied(skeleton):
        return None
    names = [f"{layer}.weight" for layer in deferred_linears(skeleton)]
    if any(n not in ckpt.tensors or tuple(expected[n].shape) != ckpt.tensors[n].shape for n in names):
        return None
    return names


def load_deferred(path: str, dtype: torch.dtype):
    """``(model, loading info, Deferred)`` for the causal LM in directory ``path``, its linear
    weights deferred; None where the checkpoint does not qualify (then load it whole)."""
    import transformers

    from peftcli.attach import quiet_transformers
    from peftcli.checkpoint.reader import open_checkpoint

    with open_checkpoint(path) as ckpt:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        try:  # the class AutoModelForCausalLM builds, as load_base_model asks for
            cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            return None
        with quiet_transformers(), torch.device("meta"):
            names = deferrable(cls(config), ckpt)
        if names is None:
            return None
        deferred = Deferred(path, dtype)
        state: dict[str, torch.Tensor] = {}
        for name in names:
            placeholder = torch.full((), float("nan"), dtype=dtype).expand(ckpt.tensors[name].shape)
            deferred.names[placeholder.data_ptr()] = name
            state[name] = placeholder
        for name in ckpt.tensors:
            if name not in state:
                state[name] = ckpt.get(name)  # the embeddings, norms, biases, output projection
        with quiet_transformers():
            model, loading = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    model.eval()
    return model, loading, deferred


def _tied(model: nn.Module) -> set[str]:
    """State-dict names a checkpoint may leave out because they are tied to another (an LM
    head tied to the input embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {f"{name}.weight" for name, layer in model.named_modules() if out is not None and layer is out}
