"""PEFT's LoRA options on embedding layers, at tensor level (shapes for check, ΔW for merge).

LoRA on an embedding: ``<embedding>.lora_embedding_A`` [r, vocab] and ``.lora_embedding_B``
[dim, r]; PEFT's ``lora.Embedding.get_delta_weight`` is ΔW = s·(B·A)ᵀ [vocab, dim].
Trainable tokens (``trainable_token_indices``): ``<embedding>.token_adapter.trainable_tokens_delta``
[n, dim] holds the NEW values of the n chosen rows (despite its name), and PEFT's
``TrainableTokensLayer.merge`` writes them with ``index_copy``: merged rows equal them exactly.
A list of indices means the input embedding; a dict maps module names to indices.

A tied base stores one [vocab, dim] tensor for the input embedding and the output head; it
changes once and stays one tensor, which is what PEFT's ``merge_and_unload`` leaves (its tied
``lm_head`` shares the embedding's weight and its trainable-token delta). Both options come
from PEFT adapters only: ``peftcli inject`` does not put LoRA on embeddings, and attach
(evaluate, train) refuses them naming the option, since its forward does not carry them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.errors import BadInputError
from peftcli.methods.base import Replacement, peft_key
from peftcli.methods.prompting import dims as pl
from peftcli.patterns import from_file, fullmatch
from peftcli.targets import excluded, is_regex, names_module

if TYPE_CHECKING:
    import torch

EMB_A, EMB_B = "lora_embedding_A", "lora_embedding_B"
TOKENS = "token_adapter.trainable_tokens_delta"
SUFFIXES = (EMB_A, EMB_B, TOKENS)
NOT_ATTACHED = {
    EMB_A: "LoRA on an embedding layer (lora_embedding_A/B)",
    EMB_B: "LoRA on an embedding layer (lora_embedding_A/B)",
    TOKENS: "trainable tokens (trainable_token_indices)",
}
NOT_ATTACHED_HINT = "peftcli folds it but does not attach it: peftcli merge BASE ADAPTER -o OUT, then use OUT"


def embeddings(shapes: dict, linear: set[str]) -> dict[str, tuple[int, int]]:
    """Module path -> [rows, dim] of every 2-D weight that is not a linear module's."""
    out = {}
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and len(shape) == 2 and module not in linear:
            out[module] = (int(shape[0]), int(shape[1]))
    return out


def selects(spec: str, path: str) -> bool:
    """PEFT's target_modules test on one module path: a regex matching it whole, or a listed
    name equal to it or to a dotted suffix of it."""
    if is_regex(spec):  # from a file: matched in bounded time
        return fullmatch(from_file(spec, "adapter_config.json target_modules"), path, "target_modules")
    return any(names_module(path, t) for t in (t.strip() for t in spec.split(",")) if t)


def targeted(shapes: dict, linear: set[str], cfg) -> dict[str, tuple[int, int]]:
    """The embedding modules an adapter config's target_modules selects, as PEFT selects them
    (never with all-linear; never with layers_to_transform, which needs a layer index)."""
    spec = cfg.targets
    if not spec or spec.strip() == "all-linear" or cfg.layers:
        return {}
    return {m: s for m, s in embeddings(shapes, linear).items() if selects(spec, m) and not (cfg.exclude and excluded(m, cfg.exclude))}


def token_indices(value) -> tuple | None:
    """adapter_config.json's trainable_token_indices as LoraConfig keeps it: ((module, indices), ...),
    module "" for a plain list (the input embedding)."""
    if value is None or value == [] or value == {}:
        return None

    def ints(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)

    if ints(value):
        return (("", tuple(value)),)
    if isinstance(value, dict) and all(isinstance(k, str) and k and ints(v) for k, v in value.items()):
        return tuple((k, tuple(v)) for k, v in value.items())
    raise BadInputError(
        "adapter config: 'trainable_token_indices' must be a list of token ids or an object of module name -> token ids",
        "the adapter config is corrupt or was edited by hand",
    )


def token_targets(shapes: dict, model_config: dict | None, linear: set[str], cfg) -> dict[str, tuple[tuple[int, ...], int]]:
    """Embedding module -> (row indices, dim) for the config's trainable tokens, checked against its rows."""
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    if not cfg.token_indices:
        return out
    candidates = embeddings(shapes, linear)
    for name, indices in cfg.token_indices:
        if name == "":
            module = pl.input_embedding(shapes, model_config)[0]
        else:
            hits = [m for m in candidates if names_module(m, name)]
            if len(hits) != 1:
                raise BadInputError(
                    f"trainable_token_indices names {name}, which is {'no' if not hits else 'more than one'} embedding of this base",
                    "was it made for another base model?",
                )
            module = hits[0]
        rows, dim = candidates.get(module) or shapes[module + ".weight"]
        if len(set(indices)) != len(indices) or max(indices) >= rows:
            raise BadInputError(
                f"trainable_token_indices for {module}: token ids must be distinct and below its {rows} rows",
                "was it made for another base model? (a resized vocabulary: peftcli inspect MODEL)",
            )
        out[module] = (indices, dim)
    return out


def init_shapes(embedded: dict, tokens: dict, rank_of) -> dict[str, tuple[int, ...]]:
    """The keys and shapes PEFT saves for these embedding targets (``rank_of(module)``: each
    one's rank) and trainable tokens."""
    out = {}
    for module, (rows, dim) in embedded.items():
        rank = rank_of(module)
        out[peft_key(module, EMB_A)] = (rank, rows)
        out[peft_key(module, EMB_B)] = (dim, rank)
    for module, (indices, dim) in tokens.items():
        out[peft_key(module, TOKENS)] = (len(indices), dim)
    return out


def embedding_problem(path: str, parts: dict, cfg, rows: int, dim: int) -> str | None:
    """What is wrong with one embedding's LoRA tensors for a [rows, dim] weight, or None."""
    a, b = parts.get(EMB_A), parts.get(EMB_B)
    others = sorted(set(parts) - {EMB_A, EMB_B, "base_layer.weight"})
    if others:
        return f"{path}: {', '.join(others)} beside LoRA on an embedding layer (peftcli folds plain LoRA on embeddings only)"
    if cfg.dora or cfg.base_init or cfg.lora_bias:
        return f"{path}: LoRA on an embedding layer with use_dora, lora_bias or a PiSSA/OLoRA init is not folded by peftcli"
    if a is None or b is None:
        return f"{path}: {EMB_A} and {EMB_B} must both be present"
    if tuple(a.shape) != (cfg.rank, rows) or tuple(b.shape) != (dim, cfg.rank):
        return f"{path}: {EMB_A} {list(a.shape)} / {EMB_B} {list(b.shape)} do not fit r={cfg.rank} on a {rows}×{dim} embedding"
    return None


def tokens_problem(path: str, parts: dict, indices: tuple[int, ...] | None, dim: int) -> str | None:
    t = parts.get(TOKENS)
    if indices is None:
        return f"{path}: trainable-token rows for a module trainable_token_indices does not name"
    if len(parts) != 1:
        return f"{path}: {', '.join(sorted(set(parts) - {TOKENS}))} beside trainable tokens"
    if tuple(t.shape) != (len(indices), dim):
        return f"{path}.{TOKENS}: shape {list(t.shape)}, trainable_token_indices gives {len(indices)} rows of {dim}"
    return None


def fold_embedding(stored: "torch.Tensor", *, a: "torch.Tensor", b: "torch.Tensor", scaling: float) -> "torch.Tensor":
    """PEFT's lora.Embedding delta: s·(B·A)ᵀ, [vocab, dim] like the stored weight."""
    return (scaling * (b.float() @ a.float())).T


def token_rows(stored: "torch.Tensor", *, indices: tuple[int, ...], values: "torch.Tensor") -> "torch.Tensor":
    """The embedding with rows ``indices`` set to ``values`` (PEFT's index_copy), the others its own."""
    import torch

    out = stored.clone()
    out[torch.tensor(indices, dtype=torch.long)] = values.to(stored.dtype)
    return out


def fold_tokens(*, indices: tuple[int, ...], values: "torch.Tensor"):
    """The change that makes rows ``indices`` equal ``values``, 0 elsewhere: a ``Replacement``,
    so that a merge of this adapter alone writes the rows PEFT writes, bit for bit."""
    from functools import partial

    return Replacement(partial(token_rows, indices=indices, values=values))
