"""Prefix tuning (Li & Liang, 2021): n learned key/value positions prepended in every attention layer (or some).

φ is PEFT's ``prompt_embeddings`` [n, num_layers·2·kv_dim]: per virtual token, each layer's
key and value (kv_dim = key/value heads × head dim, so a GQA model's prefix is as narrow as
its key/value projections, as in PEFT). At attach the prefix is handed to the base as a
``DynamicCache`` (``cache``, ``past_key_values`` before transformers 5) and the attention
mask gets n ones — PEFT's forward; nothing in the base is replaced, and the input's
positions start at n (the prefix takes 0…n−1). Llama, GPT-2 and BERT (whose self-attention
reads the cache in transformers 5) all work this way, with their sequence-classification
heads too (where PEFT 0.21 on transformers 5 refuses prefix tuning): the causal LMs take the
cache as an argument, BERT's heads do not, so a pre-hook on the backbone adds it there.
Encoder-decoder models (T5, BART) are refused: they would need a prefix for the encoder and
the decoder (PEFT's ``num_transformer_submodules`` = 2). A forward given a cache of its own
(incremental decoding) is refused too: the prefix is rebuilt on every full forward.

``--layers`` puts the prefix in some layers only (PEFT cannot express that): φ is then
[n, |layers|·2·kv_dim], the same row layout over the chosen layers in increasing order, and
``adapter_config.json`` is peftcli's own, ``{"peft_type": "PEFTCLI", "peftcli": {"method":
"prefix", "virtual_tokens", "projection", "layers"}, "base_model_name_or_path"}``. Every
layer's cache still holds n positions, so masks and positions are the full prefix's, but the
other layers' are zeros that a pre-hook on their attention module cuts from the mask while
the cache hands that layer only the input's keys and values (``prefix_cache.LayerSubsetCache``):
their attention is the base's, as without a prefix.

``--projection H`` trains the prefix through PEFT's reparameterisation MLP
(Embedding(n, kv_dim) → Linear(kv_dim, H) → Tanh → Linear(H, layers·2·kv_dim)), which
Li & Liang found more stable than training the prefix directly. PEFT saves only the MLP's
output; we save that too, under the same key — so PEFT loads the directory as its own — plus
the MLP under ``prefix_encoder.*`` keys, which PEFT ignores and from which training resumes.
``prompt_embeddings`` is then derived from the MLP and recomputed when saving: it takes no
gradient, but it is counted in the budget because it is part of the saved φ. A PEFT-saved
projection adapter (the output alone) attaches as a plain prefix.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, ResourceError, UsageError
from peftcli.methods import peftcli_section
from peftcli.methods.base import Attached, MethodBase, BudgetRow, mismatch_error, TrainDefaults
from peftcli.methods.prompting import dims as pl
from peftcli.options import option
from peftcli.targets import parse_layers, resolve_targets

if TYPE_CHECKING:
    import torch

KEY = "prompt_embeddings"  # PEFT's key in adapter_model.safetensors
MODULE = "peftcli_prefix"  # where the prefix lives inside the model


@dataclass
class PrefixTuningConfig:
    virtual_tokens: int = pl.virtual_tokens_option()
    projection: int | None = option(
        None,
        metavar="HIDDEN",
        help="train the prefix through an MLP with this hidden size (PEFT's prefix_projection); default: train it directly",
    )
    layers: str | None = option(
        None,
        metavar="RANGES",
        help="only these layers get a prefix, e.g. 20-29 or 0,2,4-6 (writes peftcli's own adapter config: "
        "PEFT's prefix layout has every layer)",
    )
    # (token_dim, num_attention_heads, num_layers) as an adapter config states them, checked against the model.
    peft_dims: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.virtual_tokens <= 0:
            raise UsageError(f"`virtual_tokens` must be positive, got {self.virtual_tokens}", "e.g. `virtual_tokens` 20")
        if self.projection is not None and self.projection <= 0:
            raise UsageError(f"`projection` must be positive, got {self.projection}", "e.g. `projection` 512, or leave it out")
        parse_layers(self.layers)

    def chosen_layers(self, num_layers: int) -> list[int] | None:
        """The prefixed layers, sorted (None: every layer, PEFT's layout); a layer the model lacks is an error."""
        layer_set = parse_layers(self.layers)
        if layer_set is None:
            return None
        absent = sorted(i for i in layer_set if i >= num_layers)
        if absent:
            raise UsageError(
                f"`layers` names layer {absent[0]}, which this model does not have", f"layers here: 0-{num_layers - 1}"
            )
        return sorted(layer_set)


def _attention_modules(shapes: dict[str, tuple[int, ...]], config: dict | None, num_layers: int) -> list[str]:
    """One name per layer for the budget: the module holding its query/value projections."""
    try:
        modules = resolve_targets(shapes, config, None, None)
    except UsageError:
        modules = []
    parents: dict[int, str] = {}
    for m in modules:
        if m.layer is not None:
            parents.setdefault(m.layer, m.name.rsplit(".", 1)[0])
    if sorted(parents) != list(range(num_layers)):
        return [f"layer {i}" for i in range(num_layers)]
    return [parents[i] for i in range(num_layers)]


class PrefixTuning(MethodBase):
    name = "prefix"
    train_defaults = TrainDefaults(lr=9e-2, generative_lr=3e-3)  # benchmarks/README.md: "Training defaults"
    identity_at_init = False  # its virtual tokens change the outputs from the start
    config_cls = PrefixTuningConfig
    summary = "Learned key/value prefixes in every attention layer, or in some layers only (prefix tuning)."
    peft_type = "PREFIX_TUNING"
    examples = (
        "peftcli inject prefix --virtual-tokens 20 model/ -o runs/prefix/",
        "peftcli inject prefix --virtual-tokens 20 --projection 512 model/ -o runs/prefix-mlp/",
        "peftcli inject prefix --virtual-tokens 20 --layers 20-29 model/ -o runs/prefix-top/",
    )

    def _width(self, dims: pl.Dims, cfg: PrefixTuningConfig) -> int:
        """Columns of the prefix: 2·kv_dim per prefixed layer."""
        chosen = cfg.chosen_layers(dims.num_layers)
        return (dims.num_layers if chosen is None else len(chosen)) * 2 * dims.kv_dim

    def _mlp_shapes(self, dims: pl.Dims, cfg: PrefixTuningConfig) -> dict[str, tuple[int, ...]]:
        from peftcli.methods.prompting.prefix_cache import mlp_shapes

        if cfg.projection is None:
            return {}
        return mlp_shapes(cfg.virtual_tokens, dims.kv_dim, cfg.projection, self._width(dims, cfg))

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: PrefixTuningConfig) -> list[BudgetRow]:
        pl.task_type(model_config)  # rejects what we cannot attach to, before any work
        pl.check_virtual_tokens(cfg.virtual_tokens, model_config)
        dims = pl.model_dims(model_config)
        n, width = cfg.virtual_tokens, 2 * dims.kv_dim
        chosen = cfg.chosen_layers(dims.num_layers)
        mlp = self._mlp_shapes(dims, cfg)
        if mlp:  # with a projection only the MLP trains; the prefix is its (saved) output
            rows = []
        else:
            modules = _attention_modules(shapes, model_config, dims.num_layers)
            rows = [BudgetRow(modules[i], (n, width), n * width) for i in (chosen or range(dims.num_layers))]
        for key in mlp:
            if key.endswith(".bias"):
                continue
            module = key[: -len(".weight")]
            bias = mlp.get(module + ".bias")
            rows.append(BudgetRow(module, mlp[key], _numel(mlp[key]) + (_numel(bias) if bias else 0)))
        return rows

    def derived_keys(self, cfg: PrefixTuningConfig) -> set[str]:
        """With a projection, the saved prefix is computed from the MLP, not trained."""
        return {KEY} if cfg.projection is not None else set()

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: PrefixTuningConfig, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import math

        import torch

        from peftcli.methods.prompting.prefix_cache import project

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        self.budget(shapes, ckpt.config, cfg)
        dims = pl.model_dims(ckpt.config)
        mlp_shapes = self._mlp_shapes(dims, cfg)
        prefix_shape = (cfg.virtual_tokens, self._width(dims, cfg))
        # Everything init holds at once, in fp32: the MLP, the prefix, and the projection's hidden activations.
        needed = 4 * (sum(map(_numel, mlp_shapes.values())) + _numel(prefix_shape) + (cfg.virtual_tokens * (cfg.projection or 0)))
        with allocation(needed, "the prefix" + (f" and its `projection` {cfg.projection} MLP" if mlp_shapes else "")):
            if not mlp_shapes:  # nn.Embedding's N(0, 1), as PEFT
                return {KEY: torch.randn(prefix_shape, generator=generator)}
            mlp: dict[str, torch.Tensor] = {}
            for key, shape in mlp_shapes.items():
                if key.endswith("embedding.weight"):
                    mlp[key] = torch.randn(shape, generator=generator)
                else:  # nn.Linear's default: U(−1/√in, 1/√in) for weight and bias
                    fan_in = mlp_shapes[key.rsplit(".", 1)[0] + ".weight"][1]
                    bound = 1.0 / math.sqrt(fan_in)
                    mlp[key] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
            return {KEY: project(mlp), **mlp}

    def adapter_config(self, ckpt, cfg: PrefixTuningConfig) -> dict:
        dims = pl.model_dims(ckpt.config)
        if cfg.layers is not None:  # PEFT's layout has every layer: ours
            return peftcli_section.adapter_config(ckpt, self.name, cfg)
        return {
            "peft_type": self.peft_type,
            **pl.prompt_learning_fields(
                ckpt.path, pl.task_type(ckpt.config), cfg.virtual_tokens, dims.kv_dim, dims.kv_heads, dims.num_layers
            ),
            "encoder_hidden_size": cfg.projection if cfg.projection is not None else dims.kv_dim,  # PEFT's default
            "prefix_projection": cfg.projection is not None,
            "init_weights": None,
        }

    def config_from_adapter(self, d: dict) -> PrefixTuningConfig:
        if d.get("peft_type") == peftcli_section.PEFTCLI_PEFT_TYPE:  # written with --layers
            return peftcli_section.config_from_adapter(d, self.name, PrefixTuningConfig)
        pl.check_adapter_fields(d, "prefix tuning")
        projection = None
        if d.get("prefix_projection"):
            if d.get("encoder_hidden_size") is None:
                raise BadInputError(
                    "prefix tuning adapter config has prefix_projection but no encoder_hidden_size",
                    "set encoder_hidden_size to the MLP's hidden size, or prefix_projection to false",
                )
            projection = int(d["encoder_hidden_size"])
        stated = tuple(d.get(k) for k in ("token_dim", "num_attention_heads", "num_layers"))
        return PrefixTuningConfig(
            virtual_tokens=int(d["num_virtual_tokens"]),
            projection=projection,
            peft_dims=tuple(map(int, stated)) if None not in stated else None,
        )

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: PrefixTuningConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli.methods.prompting import prefix_cache as pfx
        from peftcli.methods.prompting import virtual_tokens as pe

        try:
            pl.task_type(model_config)  # refuses encoder-decoder models, whatever the adapter's layout
            dims = pl.model_dims(model_config)
        except UsageError as exc:  # here it is the model's config that is wrong, not the command line
            raise BadInputError(exc.message, exc.hint) from None
        try:
            chosen = cfg.chosen_layers(dims.num_layers)
        except UsageError as exc:
            chosen = None
            problems = [f"the adapter config's {exc.message}"]
        else:
            problems = []
        problems += self._check(model, cfg, tensors, dims)
        mlp = {k: tensors[k] for k in pfx.MLP_KEYS if k in tensors} or None
        if mlp is not None and not problems:
            expected = pfx.project({k: t.float() for k, t in mlp.items()})
            if not expected.allclose(tensors[KEY].float(), rtol=1e-4, atol=1e-5):
                problems.append(f"{KEY} is not the output of the prefix_encoder MLP stored beside it")
        if problems:
            raise mismatch_error(problems)
        attention = _attention_of_layers(model, dims) if chosen is not None else {}
        encoder = pfx.PrefixEncoder(tensors[KEY], mlp)
        pe.register(model, MODULE, encoder)
        for i in sorted(set(attention) - set(chosen or ())):  # keep the prefix from the other layers
            attention[i].register_forward_pre_hook(pfx.hide_prefix, with_kwargs=True)
        dtype = getattr(model, "dtype", None) or encoder.prompt_embeddings.dtype
        transform = _transform(encoder, dims, cfg.virtual_tokens, pfx.CacheInjector(model), dtype, chosen)
        return Attached(
            phi=encoder.phi(),
            input_transform=transform,
            export=encoder.export if mlp is not None else None,
            derived=frozenset({KEY}) if mlp is not None else frozenset(),
        )

    def _check(self, model, cfg: PrefixTuningConfig, tensors: dict, dims: pl.Dims) -> list[str]:
        from peftcli.methods.prompting import prefix_cache as pfx

        problems = [f"unexpected key {k}" for k in tensors if k != KEY and k not in pfx.MLP_KEYS]
        ours = (dims.kv_dim, dims.kv_heads, dims.num_layers)
        if cfg.peft_dims is not None and tuple(cfg.peft_dims) != ours:
            problems.append(
                "the config's token_dim/num_attention_heads/num_layers are {}/{}/{}, the model's key/value width, "
                "heads and layers {}/{}/{}".format(*cfg.peft_dims, *ours)
            )
        backbone = getattr(model, "base_model", model)
        if pfx.cache_argument(model) is None and pfx.cache_argument(backbone) is None:
            problems.append(f"{type(model).__name__} takes no key/value cache, so no prefix")
        try:
            chosen = cfg.chosen_layers(dims.num_layers)
        except UsageError:  # reported by attach
            return problems
        layers = dims.num_layers if chosen is None else len(chosen)
        width = layers * 2 * dims.kv_dim
        if KEY not in tensors:
            problems.append(f"no {KEY} tensor")
        elif tuple(tensors[KEY].shape) != (cfg.virtual_tokens, width):
            problems.append(
                f"{KEY} is {list(tensors[KEY].shape)}, not [{cfg.virtual_tokens}, {width}] "
                f"({cfg.virtual_tokens} virtual tokens × {layers} layers × 2 × {dims.kv_dim})"
            )
        present = [k for k in pfx.MLP_KEYS if k in tensors]
        if present and cfg.projection is None:
            problems.append("the adapter holds a prefix_encoder MLP but its config has no prefix_projection")
        elif present and len(present) != len(pfx.MLP_KEYS):
            missing = ", ".join(k for k in pfx.MLP_KEYS if k not in tensors)
            problems.append(f"the prefix_encoder MLP is incomplete: {missing} missing")
        elif present:
            expected = self._mlp_shapes(dims, cfg)
            problems += [
                f"{k} is {list(tensors[k].shape)}, not {list(shape)}"
                for k, shape in expected.items()
                if tuple(tensors[k].shape) != shape
            ]
        return problems


def available_memory() -> int | None:
    """Bytes of memory this process can still get: /proc/meminfo's MemAvailable (free memory
    plus what the kernel can reclaim), else the free physical pages; None when neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@contextlib.contextmanager
def allocation(nbytes: int, what: str):
    """Refuse up front (exit 3) what clearly cannot fit in the memory left, and turn a failed
    allocation inside the block into the same one-line error naming the size."""
    available = available_memory()

    def error() -> ResourceError:
        left = f"{available / 2**30:,.1f} GiB available" if available is not None else "the allocation failed"
        return ResourceError(
            f"{what}: {nbytes / 2**30:,.1f} GiB of memory needed ({nbytes:,} bytes), {left}",
            "use fewer `virtual_tokens` or a smaller `projection` (or no `projection`), or a machine with more memory",
        )

    if available is not None and nbytes > available:
        raise error()
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "memory" not in str(exc).lower() and "alloc" not in str(exc).lower():
            raise  # not an allocation failure: a bug to report as one
        raise error() from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _attention_of_layers(model, dims: pl.Dims) -> dict:
    """Each layer's attention module, which --layers hooks where there is no prefix."""
    from peftcli.methods.prompting import prefix_cache as pfx

    found, problems = pfx.attention_modules(model)
    missing = [i for i in range(dims.num_layers) if i not in found]
    if missing:
        problems.append(f"no attention module with layer_idx {missing[0]}")
    if problems:
        raise BadInputError(
            f"prefix tuning `layers` needs each layer's attention module: {'; '.join(problems[:3])}",
            "this architecture supports prefix tuning only in every layer: inject without `layers`",
        )
    return {i: found[i] for i in range(dims.num_layers)}


def _transform(encoder, dims: pl.Dims, n: int, injector, dtype: "torch.dtype", chosen: list[int] | None = None):
    """The forward's keyword arguments with the prefix as a key/value cache (PEFT's prefix-tuning forward)."""
    from peftcli.methods.prompting import prefix_cache as pfx
    from peftcli.methods.prompting import virtual_tokens as pe

    def transform(kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        batch = pe.batch_size(kwargs, "prefix tuning")
        injector.put(kwargs, pfx.build_cache(encoder.prefix(), batch, dims, dtype, chosen))
        pe.extend_attention_mask(kwargs, n)
        if kwargs.get("position_ids") is not None:  # the input comes after the n cached positions
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return kwargs

    return transform
