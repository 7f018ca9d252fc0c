"""Module level: the peak memory a training run will need, predicted before any weight is read.

``peftcli check BASE RUN --train`` answers "will this fit?" for the run as ``peftcli train
RUN`` would make it, with the same batch size, length, base dtype, quantisation,
checkpointing and workers, split into the parts a user can act on:

- **weights**: the frozen base, every parameter at the base dtype (the checkpoint's on CUDA,
  fp32 on CPU, or ``base_dtype``); with ``quantize nf4`` the linear layers training
  quantises (``precision.quantizable_linears``) at NF4's 4 bits plus its two levels of
  absmaxes (``quantize int8``: a byte a value and an fp32 scale a row). Loading reads one linear weight at a time, quantising each before the next
  (``peftcli.quantize.on_load``); where it cannot, it holds the full-precision weights before
  quantising them, and the peak is also at least that.
- **φ, gradients, optimizer**: φ in fp32, one fp32 gradient each, AdamW's two fp32 moments
  (and DDP's gradient buckets, one more copy, with several workers).
- **activations**: measured, not modelled. The model is built on the meta device (shapes,
  no data: nothing is read but config.json and the adapter) with the run's adapter attached,
  and one forward of a full batch (``batch_size`` rows of ``max_length`` tokens: a padded
  batch or a packed row is that long at most) runs with a hook that sees every tensor
  autograd saves for the backward; each storage counts once, parameters not at all.
  Attention is counted as the fused kernels (flash / memory-efficient SDPA) keep it: q, k, v,
  the output and a log-sum-exp per row, not the S×S probabilities (the meta device has no
  fused kernel to run). With ``gradient_checkpointing`` the blocks keep only their inputs,
  and one block's activations are rebuilt at a time in the backward. The backward adds a
  transient: the op that kept the largest tensor (for a language model, the logits' log
  softmax) holds the gradients of its output and its input at once, two more of its size.
- **runtime**: on CPU, the memory of this very process (Python, torch, transformers, the
  model's classes: the stack ``peftcli train`` runs), measured after the trace, since the
  peak ``train`` reports is the process's RSS. glibc's malloc keeps blocks that held freed
  activations for reuse, so a CPU run's RSS can exceed live memory by up to the activations
  again; ``MALLOC_MMAP_THRESHOLD_=131072`` makes it follow live memory (measured about 1.7×
  slower), and that is what the prediction is held against. On CUDA the prediction is of torch's allocator (what ``train`` reports,
  ``max_memory_allocated``); the CUDA context (~0.3–0.6 GB per GPU) comes on top.

With ``nproc`` N each worker holds all of it (DDP replicates the model): the total is N
times a worker's. A benchmark holds the prediction against measured peaks
(``benchmarks/train_memory.py``) and a test against fresh processes on small models.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from peftcli.errors import BadInputError, UsageError
from peftcli.options import borrowed, option
from peftcli.training.config import TrainConfig

NF4_BLOCK, NF4_BLOCK2 = 64, 256  # peftcli.quantize.nf4's blocks (bitsandbytes' defaults)


def nf4_bytes(numel: int) -> int:
    """Bytes NF4 holds a weight of ``numel`` values in: two 4-bit codes a byte, one 8-bit
    absmax per 64 values, one fp32 absmax (and its offset) per 256 of those."""
    blocks = -(-numel // NF4_BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_BLOCK2) + 4


@dataclass
class TrainMemoryOptions:
    """The options of a training-memory prediction: ``peftcli train``'s own, declared there."""

    batch_size: int = borrowed(TrainConfig, "batch_size")
    max_length: int = borrowed(TrainConfig, "max_length")
    base_dtype: str | None = borrowed(TrainConfig, "base_dtype")
    quantize: str | None = borrowed(TrainConfig, "quantize")
    gradient_checkpointing: bool = borrowed(TrainConfig, "gradient_checkpointing")
    packing: bool = borrowed(TrainConfig, "packing")
    task: str | None = borrowed(TrainConfig, "task", help="the task to predict for (default: the adapter's: classify for a SEQ_CLS adapter, else lm)")
    device: str = borrowed(TrainConfig, "device")
    nproc: int = option(1, min=1, max=4096, help="data-parallel workers the run will use (each holds a replica)")
    shard: bool = borrowed(TrainConfig, "shard")

    def __post_init__(self) -> None:
        from peftcli.training.config import QUANTIZE
        from peftcli.training.data import TASKS
        from peftcli.training.precision import DTYPES

        for name in ("batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise UsageError(f"`{name}` must be positive", f"e.g. `{name}` {getattr(TrainConfig, name)}, its default")
        if self.base_dtype is not None and self.base_dtype not in DTYPES:
            raise UsageError(f"unknown `base_dtype` {self.base_dtype!r}", "choose fp32, bf16 or fp16")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise UsageError(f"unknown `quantize` {self.quantize!r}", "choose nf4 (4-bit NormalFloat, as QLoRA) or int8")
        if self.task is not None and self.task not in TASKS:
            raise UsageError(f"unknown `task` {self.task!r}", "choose lm, sft or classify")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"unknown `device` {self.device!r}", "choose auto, cpu or cuda")
        if self.packing and self.task == "classify":
            raise UsageError("`packing` applies to lm and sft", "drop `packing` for classification")
        if self.shard and self.nproc < 2:
            raise UsageError("`shard` splits the base across workers and needs `nproc` 2 or more", "add `nproc` 2 (or more), or drop `shard`")
        if self.shard and self.quantize is not None:
            raise UsageError(f"`shard` cannot split an `quantize` {self.quantize} base", "drop one of `shard` and `quantize`")

    def changed(self) -> list[str]:
        """The fields given other values than their defaults (refused without ``train``)."""
        return [f for f in TrainMemoryOptions.__dataclass_fields__ if getattr(self, f) != TrainMemoryOptions.__dataclass_fields__[f].default]


@dataclass
class TrainMemory:
    """A prediction, per worker, in bytes."""

    weights: int
    phi: int
    gradients: int
    optimizer: int
    activations: int
    transient: int  # the backward's largest temporary (and NF4's dequantised weight)
    load: int  # the peak while loading (with NF4: the quantised base and one weight, or all of it in full precision)
    runtime: int  # CPU: this process's memory before the model (0 on CUDA)
    workers: int
    device: str
    dtype: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def training(self) -> int:
        return self.weights + self.phi + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def peak(self) -> int:
        """Per worker: the runtime plus the larger of loading and training."""
        return self.runtime + max(self.load, self.training)

    def to_json(self) -> dict:
        return {
            "device": self.device, "base_dtype": self.dtype, "workers": self.workers,
            "weights": self.weights, "phi": self.phi, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "transient": self.transient, "load": self.load, "runtime": self.runtime,
            "peak_per_worker": self.peak, "peak_total": self.peak * self.workers, **self.details,
        }


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def describe(m: TrainMemory) -> str:
    """One line: the predicted peak and its parts."""
    parts = [
        f"weights {_gib(m.weights)} ({m.details['weights_as']})", f"φ {_gib(m.phi)}", f"gradients {_gib(m.gradients)}",
        f"optimizer {_gib(m.optimizer)}", f"activations {_gib(m.activations)}", f"backward transient {_gib(m.transient)}",
    ]
    if m.runtime:
        parts.append(f"runtime {_gib(m.runtime)}")
    # On CPU the prediction is of memory in use; glibc's malloc can keep the RSS higher (docs).
    where = "torch's CUDA allocator, CUDA context not included" if m.device == "cuda" else "memory in use by the process"
    text = f"training memory (predicted peak, {where}): {_gib(m.peak)} per worker = " + " + ".join(parts)
    if m.load > m.training:
        text += f" (loading, {_gib(m.load)}, is the larger phase)"
    if m.workers > 1:
        text += f"; {m.workers} workers: {_gib(m.peak * m.workers)} in all"
    return text


def predict(base: str, run: str, opts: TrainMemoryOptions) -> TrainMemory:
    """The predicted peak memory of ``peftcli train RUN --model BASE`` with ``opts``."""
    import torch

    from peftcli.artifacts.adapter_dir import read_adapter
    from peftcli.training import precision
    from peftcli.training.common import resolve_device

    adapter = read_adapter(run)
    precision.keeps_fp32(False, adapter, opts.quantize, opts.base_dtype)  # refused as train refuses it
    # The device predicted for, not this machine's: a CUDA run is planned from a laptop too.
    device = resolve_device(opts.device) if opts.device != "cuda" else torch.device("cuda")
    dtype = precision.DTYPES[opts.base_dtype] if opts.base_dtype else (
        precision.DTYPES[precision.checkpoint_dtype(base)] if device.type == "cuda" else torch.float32
    )
    task = opts.task or ("classify" if adapter.config.get("task_type") == "SEQ_CLS" else "lm")
    model = _meta_model(base, task, dtype)
    deferred = opts.quantize is not None and _loads_deferred(base, model, adapter, task)
    from peftcli.attach import attach_adapter

    adapted = attach_adapter(model, adapter)
    adapted.to("meta")
    inner = adapted.model
    phi = adapted.phi_parameters()
    phi_numel = sum(p.numel() for p in phi.values())

    workers = opts.nproc
    shards = workers if opts.shard else 1
    quantized = {id(layer.weight) for _, layer in precision.quantizable_linears(inner)} if opts.quantize is not None else set()
    weights, weights_full, quantized_max = _weights(inner, {id(p) for p in phi.values()}, quantized, opts.quantize, shards)
    if opts.quantize is not None and not quantized:
        raise BadInputError(f"{base}: no frozen linear layer to quantise", "drop `quantize`")

    trace = _trace_activations(adapted, inner, task, opts.batch_size, opts.max_length)
    layers = trace["per_layer"]
    if opts.gradient_checkpointing:
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise UsageError(f"{base}: transformers cannot checkpoint the activations of this architecture", "drop `gradient_checkpointing`")
        # Each block keeps its input; one block is recomputed (its activations rebuilt) at a time.
        block_inputs = len(layers) * opts.batch_size * trace["length"] * trace["hidden"] * trace["act_bytes"]
        activations = trace["outside"] + block_inputs + (max(layers) if layers else 0)
    else:
        activations = trace["outside"] + sum(layers)
    activations += opts.batch_size * trace["length"] ** 2  # a padded batch's 4-D boolean attention mask
    # The backward of the op that kept the largest tensor holds its output's gradient and its
    # input's at once (for a language model: two logits-sized tensors besides the kept one).
    transient = 2 * trace["largest"] + quantized_max * dtype.itemsize  # NF4: one layer's weight dequantised at a time
    if opts.shard:  # FSDP2 gathers one block whole at a time, and prefetches the next one
        transient += 2 * _largest_block(inner)
    # The runtime is measured now: building and tracing the model imported what train imports
    # (its model classes too), and meta tensors hold no memory.
    runtime = _process_rss() if device.type == "cpu" else 0
    phi_held = -(-phi_numel // shards)  # sharded, each worker holds its part of φ and of its state
    gradients = 4 * phi_held * (2 if workers > 1 and not opts.shard else 1)  # DDP's buckets hold one more copy
    return TrainMemory(
        weights=weights, phi=4 * phi_held, gradients=gradients, optimizer=8 * phi_held, activations=activations,
        transient=transient, load=_load_peak(quantized, deferred, weights, weights_full, quantized_max, dtype),
        runtime=runtime, workers=workers, device=device.type,
        dtype=precision.dtype_name(dtype),
        details={
            "weights_as": (f"{opts.quantize} linears, " if quantized else "") + precision.dtype_name(dtype), "task": task,
            "batch_size": opts.batch_size, "length": trace["length"], "gradient_checkpointing": opts.gradient_checkpointing,
            "quantize": opts.quantize, "trainable_params": phi_numel,
            "loads": ("one weight at a time" if deferred else "whole") if quantized else "whole", "shard": opts.shard,
        },
    )


def _weights(inner, phi_ids: set[int], quantized: set[int], scheme: str | None, shards: int) -> tuple[int, int, int]:
    """(bytes of the frozen base as held, bytes of it in full precision, values in the largest
    quantised weight): each storage once, φ not at all; a quantised weight at its scheme's
    bytes, a sharded parameter at one worker's rows."""
    import torch

    from peftcli.quantize.int8 import int8_bytes

    weights = weights_full = quantized_max = 0
    seen: set[int] = set()
    for t in [*inner.parameters(), *inner.buffers()]:
        key = t.untyped_storage()._cdata
        if id(t) in phi_ids or key in seen:
            continue
        seen.add(key)
        size = t.numel() * t.element_size()
        weights_full += size
        if id(t) in quantized:
            weights += nf4_bytes(t.numel()) if scheme == "nf4" else int8_bytes(t.shape[0], t.numel() // t.shape[0])
            quantized_max = max(quantized_max, t.numel())
        elif shards > 1 and isinstance(t, torch.nn.Parameter):  # FSDP2: dim 0 split over the workers (padded)
            weights += _shard_bytes(t, shards)
        else:
            weights += size
    return weights, weights_full, quantized_max


def _shard_bytes(t, shards: int) -> int:
    """What one worker holds of parameter ``t`` under FSDP2: ⌈dim 0 / N⌉ rows."""
    if t.dim() == 0:
        return t.element_size()
    rows = -(-t.shape[0] // shards)
    return rows * (t.numel() // max(1, t.shape[0])) * t.element_size()


def _largest_block(model) -> int:
    """Bytes of the parameters of the largest transformer block (what FSDP2 gathers at once)."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in classes] or [model]
    return max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)


def _loads_deferred(base: str, skeleton, adapter, task: str) -> bool:
    """Whether ``train`` builds this base with its linear weights read one at a time
    (``peftcli.quantize.on_load``); only the checkpoint's header is read."""
    from peftcli.checkpoint.gguf_model import is_gguf
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.quantize import on_load

    if is_gguf(base) or not on_load.eligible(adapter, task, full=False):
        return False
    if os.path.isdir(base) and not any(f.endswith((".safetensors", ".bin", ".pt", ".pth")) for f in os.listdir(base)):
        return True  # planned before the weights are there: as transformers' save_pretrained names them
    with open_checkpoint(base) as ckpt:
        return on_load.deferrable(skeleton, ckpt) is not None


def _load_peak(quantized: set, deferred: bool, weights: int, weights_full: int, largest: int, dtype) -> int:
    """Memory while loading. Loaded whole, an NF4 base holds every weight in the base dtype
    before quantising; deferred, the NF4 model so far plus the one weight being quantised (read,
    cast, and about four fp32-sized working copies in the quantiser)."""
    if not quantized:
        return 0
    if not deferred:
        return weights_full
    return weights + largest * (2 * dtype.itemsize + 16)


def _process_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _meta_model(base: str, task: str, dtype):
    """The base's transformers model on the meta device: its config, no weights."""
    import torch
    import transformers

    from peftcli.attach import quiet_transformers
    from peftcli.checkpoint.gguf_model import is_gguf, model_config

    try:
        if is_gguf(base):
            fields = {k: v for k, v in model_config(base).items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
            config = transformers.LlamaConfig(**fields)
            if task == "classify":
                raise UsageError(f"{base}: a GGUF base trains as a causal LM only", "predict for `task` lm or sft")
        else:
            if not os.path.isfile(os.path.join(base, "config.json")):
                raise BadInputError(f"{base}: no config.json, so no model can be built from it", "pass a Hugging Face model directory")
            config = transformers.AutoConfig.from_pretrained(base, local_files_only=True, **({"num_labels": 2} if task == "classify" else {}))
        cls = transformers.AutoModelForSequenceClassification if task == "classify" else transformers.AutoModelForCausalLM
        with quiet_transformers(), torch.device("meta"):
            return cls.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(
            f"{base}: transformers cannot build this model: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}",
            "check that config.json's model_type and architectures match the weights",
        ) from None


class _FusedAttention:
    """SDPA as the fused kernels run it, for the trace: keeps q, k, v, the output and a
    log-sum-exp per row (flash and memory-efficient attention), not the S×S scores."""

    @staticmethod
    def function():
        import torch

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = q.new_empty((*q.shape[:-1], v.shape[-1]))
                lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):  # never run: the trace stops after the forward
                raise NotImplementedError

        def sdpa(query, key, value, *args, **kwargs):
            return Fused.apply(query, key, value)

        return sdpa


@contextlib.contextmanager
def _traceable():
    """SDPA as the fused kernels keep it, and no padding warning: transformers checks the
    input ids for a pad token when no attention mask is given (GPT-2, BERT), which reads a
    value, and the meta device has none (the trace's rows are full: there is no padding)."""
    import torch.nn.functional as F
    from transformers import PreTrainedModel

    original, warn = F.scaled_dot_product_attention, PreTrainedModel.warn_if_padding_and_no_attention_mask
    F.scaled_dot_product_attention = _FusedAttention.function()
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda self, *a, **k: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        PreTrainedModel.warn_if_padding_and_no_attention_mask = warn


def _trace_activations(adapted, inner, task: str, batch: int, length: int) -> dict:
    """One forward of a full batch on the meta device, counting what autograd saves: per block
    (the modules gradient checkpointing wraps) and outside them, and the largest tensor."""
    import torch

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no common block class, everything counts as outside
        GradientCheckpointingLayer = ()

    blocks = [m for m in inner.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    current: list[int | None] = [None]
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    params = {t.untyped_storage()._cdata for t in [*adapted.parameters(), *adapted.buffers()]}
    saved: dict[int, tuple[int, int | None]] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if task == "classify" else ids
    try:
        with _traceable(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            adapted.train()
            adapted(input_ids=ids, labels=labels)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise BadInputError(
            f"cannot trace this model's forward on the meta device to count its activations: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}",
            "measure a short run instead: `peftcli train RUN --steps 2` reports its peak memory",
        ) from None
    finally:
        for h in handles:
            h.remove()
    per_layer = [0] * len(blocks)
    outside = 0
    for nbytes, where in saved.values():
        if where is None:
            outside += nbytes
        else:
            per_layer[where] += nbytes
    hidden = getattr(inner.config, "hidden_size", None) or getattr(inner.config, "n_embd", 0)
    dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)
    virtual = getattr(adapted, "adapter_config", {}).get("num_virtual_tokens") or 0
    return {
        "per_layer": per_layer, "outside": outside, "largest": max((n for n, _ in saved.values()), default=0),
        "hidden": hidden, "act_bytes": dtype.itemsize, "length": length + (virtual if adapted.adapter_config.get("peft_type") == "PROMPT_TUNING" else 0),
    }
