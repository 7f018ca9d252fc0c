"""The base model's precision in training (module level): ``--base-dtype``, ``--quantize nf4``,
``--gradient-checkpointing`` and the loss scaling an fp16 base needs.

φ and its optimizer state stay fp32 whatever the base: only the frozen base weights are held
in bf16/fp16 or NF4 (``peftcli.quantize.nf4``), so the adapter written is the same fp32
artifact. A method whose φ lives inside the base's own tensors (BitFit, LT-SFT,
diff-pruning...) would train it in the low precision: it is refused, never silently rounded.
A freshly initialised task head is φ too: it is kept in fp32 and its inputs cast to it.

With the defaults (fp32 on CPU, no quantisation, no checkpointing) nothing here touches the
model: those runs are the same, bit for bit, as before these options existed.
"""

from __future__ import annotations


import torch
from torch import nn

from peftcli.errors import BadInputError, UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def resolve(cfg, adapter, device: torch.device) -> torch.dtype:
    """The dtype the base is loaded in, checked against the method and the device (before
    anything is read or written). A run that trains the base's own weights (``--full``, a
    full fine-tuning pass, BitFit, LT-SFT...) keeps them fp32: φ must not be rounded."""
    if keeps_fp32(cfg.full, adapter, cfg.quantize, cfg.base_dtype):
        return torch.float32
    return base_dtype(cfg.base_dtype, cfg.model, device)


def keeps_fp32(full: bool, adapter, quantize: str | None, base_dtype_name: str | None) -> bool:
    """Whether the run trains the base's own weights (``full``, BitFit, LT-SFT...), which stay
    fp32; refused when ``quantize`` or a low ``base_dtype`` is asked for such a run (also by
    ``peftcli check --train``, ``peftcli.training.memory``)."""
    if not (full or (adapter is not None and _trains_in_place(adapter))):
        return False
    what = "`full` (or a full fine-tuning pass)" if full else _method_name(adapter)
    if quantize is not None or base_dtype_name not in (None, "fp32"):
        flag = f"`quantize` {quantize}" if quantize is not None else f"`base_dtype` {base_dtype_name}"
        raise UsageError(
            f"{what} trains the base's own weights, which {flag} would round",
            "drop `base_dtype` and `quantize` for this run (they suit lora, ia3, adapter, prompt, prefix)",
        )
    return True


def _trains_in_place(adapter) -> bool:
    from peftcli.methods import method_for_adapter_config

    return bool(getattr(method_for_adapter_config(adapter.config, adapter.path), "trains_in_place", False))


def _method_name(adapter) -> str:
    from peftcli.methods import method_for_adapter_config

    return method_for_adapter_config(adapter.config, adapter.path).name


def base_dtype(name: str | None, model_dir: str, device: torch.device) -> torch.dtype:
    """``--base-dtype``, refused where the device cannot compute in it. Its default: fp32 on
    the CPU (as before; these CPUs lack bf16 units), the checkpoint's own dtype on CUDA."""
    if name is None:
        name = checkpoint_dtype(model_dir) if device.type == "cuda" else "fp32"
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            name = "fp32"  # a bf16 checkpoint on an older GPU trains as before, in fp32
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"this GPU ({torch.cuda.get_device_name(device)}) cannot compute in bf16",
            "pass `base_dtype` fp16 or fp32",
        )
    return DTYPES[name]


def checkpoint_dtype(model_dir: str) -> str:
    """config.json's ``dtype`` (``torch_dtype`` before transformers 5), fp32 if it names none we hold."""
    from peftcli.checkpoint.gguf_model import model_config

    config = model_config(model_dir)
    name = config.get("dtype") or config.get("torch_dtype")
    return _CONFIG_DTYPES.get(name, "fp32") if isinstance(name, str) else "fp32"


# Dynamic loss scaling for an fp16 base (torch's defaults: start at 2**16, halve on an
# overflow, double after 2000 clean steps). fp16's smallest normal is 6e-5: the gradients of
# activations held in fp16 underflow to zero without it, and φ silently stops learning.
INIT_SCALE = 2.0**16
# Below this the gradients overflow at any useful scale: the run has diverged, not spiked.
MIN_SCALE = 2.0**-8


def loss_scaler(dtype: torch.dtype, device: torch.device) -> "torch.amp.GradScaler | None":
    """A dynamic loss scaler when the base computes in fp16 (an fp16 base, on CPU or under
    CUDA's fp16 autocast); None for fp32 and bf16, whose range needs none."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type, init_scale=INIT_SCALE)


def autocast_dtype(dtype: torch.dtype) -> torch.dtype:
    """What CUDA computes the forward in: fp16 for an fp16 base, else bf16 (as before)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def prepare_base(adapted, cfg, dtype: torch.dtype, model_dir: str, deferred=None) -> None:
    """After the adapter is attached: φ in fp32, the frozen linears in NF4 (``--quantize``;
    ``deferred``: the weights the model holds placeholders for, read from the checkpoint
    now, see ``peftcli.quantize.on_load``), activation checkpointing
    (``--gradient-checkpointing``). Raises before anything is written."""
    model = adapted.model if hasattr(adapted, "model") else adapted
    if dtype != torch.float32:
        _phi_in_fp32(adapted, dtype)
    if cfg.quantize is not None:
        quantize_frozen_linears(model, model_dir, deferred, cfg.quantize)
    if cfg.gradient_checkpointing:
        enable_checkpointing(adapted, model_dir, keep_config=cfg.full)


def _phi_in_fp32(adapted, dtype: torch.dtype) -> None:
    head_keys: set[str] = getattr(adapted, "_head_keys", set())
    low = [k for k, p in adapted.phi_parameters().items() if p.is_floating_point() and p.dtype != torch.float32]
    inner = [k for k in low if k not in head_keys]
    if inner:
        raise UsageError(
            f"{adapted.method.name} trains the base's own tensors (e.g. {inner[0]}), which `base_dtype` "
            f"{dtype_name(dtype)} would hold in {dtype_name(dtype)}",
            "train it with `base_dtype` fp32, or use a method with separate weights (lora, ia3, prompt...)",
        )
    heads = (adapted.adapter_config.get("modules_to_save") or []) if low else []
    for name in heads:
        from peftcli import modules

        head = adapted.model.get_submodule(modules.resolve(adapted.model, name))
        head.float()  # the parameters stay the same objects: φ and the optimizer still hold them
        head.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16 or fp16: a dtype as ``base_dtype`` spells it."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize nf4`` replaces: every frozen linear (or GPT-2 Conv1D) layer but
    the output projection (also what ``peftcli.training.memory`` counts as NF4)."""
    from peftcli import modules

    skip = {id(m) for m in (_output_module(model),) if m is not None}
    return [
        (name, layer) for name, layer in model.named_modules()
        if (isinstance(layer, nn.Linear) or modules.is_conv1d(layer)) and id(layer) not in skip
        and not any(p.requires_grad for p in layer.parameters())
    ]


def quantize_frozen_linears(model: nn.Module, model_dir: str, deferred=None, scheme: str = "nf4") -> int:
    """Replace every frozen linear layer but the output projection by a layer holding its
    weight in ``scheme`` (``NF4Linear``, ``Int8Linear``); the number replaced. A layer holding
    φ (a trained head, LoRA's A and B, a sparse φ's base weights) stays as it is.
    ``deferred`` (``peftcli.quantize.on_load.Deferred``): weights still in the checkpoint,
    read one at a time."""
    from peftcli import modules
    from peftcli.quantize import layer_class

    quantized = layer_class(scheme)

    chosen = quantizable_linears(model)
    if not chosen:
        raise BadInputError(
            f"{model_dir}: no frozen linear layer to quantise (its linear layers are φ or the output projection)",
            "drop `quantize`, or use a method that leaves the base's linear layers frozen (lora, ia3, prompt...)",
        )
    count = len(chosen)
    ckpt = None
    if deferred is not None:
        from peftcli.checkpoint.reader import open_checkpoint

        ckpt = open_checkpoint(deferred.path)
    try:
        while chosen:  # one at a time, dropping each reference: the full-precision weight is freed as it goes
            name, layer = chosen.pop(0)
            parent, _, child = name.rpartition(".")
            stored = deferred.name_of(layer.weight) if deferred is not None else None
            weight = deferred.read(ckpt, stored) if stored is not None else None
            setattr(model.get_submodule(parent), child, quantized(layer, transposed=modules.is_conv1d(layer), weight=weight))
            del weight
        del layer
        if deferred is not None:
            _restore_placeholders(model, deferred, ckpt)
    finally:
        if ckpt is not None:
            ckpt.close()
    _off_the_checkpoint_map(model)
    return count


def _restore_placeholders(model: nn.Module, deferred, ckpt) -> None:
    """A deferred weight no NF4 layer took (its layer became φ after all) gets its real
    tensor: a placeholder never reaches training."""
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            stored = deferred.name_of(param)
            if stored is not None:
                module._parameters[pname] = nn.Parameter(deferred.read(ckpt, stored), requires_grad=param.requires_grad)


def _off_the_checkpoint_map(model: nn.Module) -> None:
    """Copy the tensors left in full precision out of the checkpoint file's memory map.

    transformers maps the safetensors file and the model's tensors stay views of it: the
    whole file (every weight just quantised) stays mapped, and resident once read, for as
    long as any of them (the embedding, a norm) lives. Copies release the map."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and not t.requires_grad:
                t.data = t.data.clone()
    import gc

    gc.collect()


def _output_module(model: nn.Module) -> nn.Module | None:
    """The LM head: QLoRA keeps it in the base dtype (its logits' precision matters most)."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def enable_checkpointing(adapted: nn.Module, model_dir: str, keep_config: bool = False) -> None:
    """Recompute each block's activations in the backward instead of keeping them.

    Non-reentrant (``torch.utils.checkpoint(use_reentrant=False)``): gradients flow to φ
    inside a block even when the block's inputs do not require grad (frozen embeddings),
    and keyword inputs pass through. Dropout draws the same masks in the recomputation (the
    RNG state is replayed). ``adapted``: an adapted model (or a bare transformers model).
    """
    model = getattr(adapted, "model", adapted)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"{model_dir}: transformers cannot checkpoint the activations of this architecture",
            "drop `gradient_checkpointing`",
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers turns the KV cache off while checkpointing; say so in the config, not a log
    # line (but not in a full fine-tune's, which becomes the config.json written).
    if not keep_config and getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False
    if getattr(getattr(adapted, "method", None), "name", None) == "prefix":
        _keep_prefix_cache(model)


def _keep_prefix_cache(model: nn.Module) -> None:
    """Prefix tuning's φ is the KV cache each forward starts from, which transformers drops
    from a checkpointed layer (a layer that appends to its cache would append twice when
    replayed). So each forward's prefix cache is made read-only: a layer's update returns the
    prefix and the new keys and values without storing them (one forward needs no more), and
    the layers are told to keep it."""
    from transformers.cache_utils import Cache, DynamicLayer

    class ReadOnlyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def read_only(module, args, kwargs):
        for name in ("past_key_values", "cache"):
            cache = kwargs.get(name)
            if not isinstance(cache, Cache):
                continue
            for layer in getattr(cache, "layers", None) or [None]:
                if type(layer) is DynamicLayer:
                    layer.__class__ = ReadOnlyLayer
                elif not isinstance(layer, ReadOnlyLayer):
                    raise UsageError(
                        f"`gradient_checkpointing` cannot keep this model's prefix cache ({type(cache).__name__})",
                        "drop `gradient_checkpointing` for prefix tuning of this architecture",
                    )
        return None

    for module in {id(m): m for m in (model, getattr(model, "base_model", model))}.values():
        module.register_forward_pre_hook(read_only, with_kwargs=True)
    for module in model.modules():
        if hasattr(type(module), "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True
