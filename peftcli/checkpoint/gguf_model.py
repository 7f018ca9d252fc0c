"""Module level: a transformers ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``) built in memory from a llama (qwen2) GGUF file.

The model is made on the meta device from the config ``gguf_format`` rebuilds from the
metadata, then each parameter is put in place from peftcli's own GGUF checkpoint, one tensor
at a time, dequantised and cast to the requested dtype as it is read: no dequantised copy is
ever written to disk, and no random initialisation is drawn. A tied ``lm_head`` shares
``embed_tokens``. The rotary buffers (not stored in a GGUF) are computed from the config.
Only causal LMs are built: a task head would need an initialisation of its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from peftcli.errors import BadInputError

CONVERT = "convert it with transformers (from_pretrained(dir, gguf_file=...), then save_pretrained) and pass that directory"


def is_gguf(path: str | None) -> bool:
    """``path`` is a GGUF file (a base given as a file, not a model directory)."""
    return path is not None and os.path.isfile(path) and path.lower().endswith(".gguf")


def model_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of ``path``: the directory's own, or the one rebuilt from a GGUF."""
    from peftcli.checkpoint.reader import load_json, open_checkpoint

    if is_gguf(path):
        with open_checkpoint(path) as ckpt:
            return dict(ckpt.config or {})
    return load_json(os.path.join(path, "config.json"), "config")


def load_gguf_model(path: str, model_class: str | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """``LlamaForCausalLM`` (``Qwen2ForCausalLM`` for a qwen2 GGUF) of the GGUF at ``path``, its
    weights in ``dtype``, in eval mode.

    Returns ``(model, info)`` like transformers' ``output_loading_info`` (nothing missing).
    """
    import transformers

    from peftcli.checkpoint.reader import open_checkpoint

    with open_checkpoint(path) as ckpt:
        rebuilt = dict(ckpt.config or {})
        arch = rebuilt["architectures"][0]  # gguf_format names one of its ARCHS classes
        if model_class not in (None, "AutoModelForCausalLM", arch) or kwargs:
            raise BadInputError(f"{path}: a GGUF base is built as a causal LM only ({model_class} asked)", CONVERT)
        config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
        model_class_ = getattr(transformers, arch)
        fields = {k: v for k, v in rebuilt.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
        config = config_class(**fields)
        config.dtype = dtype
        with torch.device("meta"):
            model = model_class_(config)
        _load_parameters(model, ckpt, dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers, computed on the CPU
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise BadInputError(f"{path}: the GGUF holds no tensor for {left[0]}", CONVERT)
    model.eval()
    return model, {"missing_keys": [], "unexpected_keys": []}


def _load_parameters(model: nn.Module, ckpt, dtype: torch.dtype) -> None:
    """Each parameter of ``model`` from the checkpoint, read (dequantised) and cast one at a time."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, param in list(model.named_parameters()):
        if tied and name == "lm_head.weight":
            continue  # shares embed_tokens, set once that is loaded
        if name not in ckpt.tensors:
            raise BadInputError(f"{ckpt.path}: the GGUF holds no tensor for {name}", CONVERT)
        value = ckpt.get(name).to(dtype)
        if tuple(value.shape) != tuple(param.shape):
            raise BadInputError(f"{ckpt.path}: {name} has shape {tuple(value.shape)}, the config asks {tuple(param.shape)}", CONVERT)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=param.requires_grad))
