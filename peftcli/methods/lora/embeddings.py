"""PEFT's LoRA options on embedding layers, at tensor level (shapes for check, ΔW for merge).

LoRA on an embedding: ``<embedding>.lora_embedding_A`` [r, vocab] and ``.lora_embedding_B``
[dim, r]; PEFT's ``lora.Embedding.get_delta_weight`` is ΔW = s·(B·A)ᵀ [vocab, dim].
Trainable tokens (``trainable_token_indices``): ``<embedding>.token_adapter.trainable_tokens_delta``
[n, dim] holds the NEW values of the n chosen rows (despite its name), and PEFT's
``TrainableTokensLayer.merge`` writes them with ``index_copy``: merged rows equal them exactly.
A list of indices means the input embedding; a dict maps module names to indices.

A tied base stores one [vocab, dim] tensor for the input embedding and the output head; it
changes once and stays one tensor, which is what PEFT's ``merge_and_unload`` leaves (its tied
``lm_head`` shares the embedding's weight and its trainable-token delta). LoRA on a tied
``lm_head`` folds into that one tensor too (``tied_head``), as PEFT's merge does. inject writes
both options in PEFT's layout (``--targets ...,embed_tokens``, ``--trainable-tokens``); attach
carries them with ``embedding_layers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
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
HEAD = "lm_head"  # the output head a tied base shares with its input embedding


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
                what = f"names {name}, which is {'no' if not hits else 'more than one'} embedding of this base"
                if not cfg.peft_embeddings:  # inject's option, not an adapter's config
                    raise UsageError(f"`trainable_tokens` {what}", "name an nn.Embedding of the model (`peftcli inspect MODEL` lists them), or give ids alone for the input embedding")
                raise BadInputError(f"trainable_token_indices {what}", "was it made for another base model?")
            module = hits[0]
        rows, dim = candidates.get(module) or shapes[module + ".weight"]
        if len(set(indices)) != len(indices) or max(indices) >= rows:
            if not cfg.peft_embeddings:
                raise UsageError(f"`trainable_tokens` for {module}: token ids must be distinct and below its {rows} rows",
                                 "list token ids of this model's vocabulary")
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


def tied_head(shapes: dict, model_config: dict | None, spec: str | None) -> tuple[dict, str | None]:
    """``shapes`` with the ``lm_head.weight`` of a tied base that ``spec`` lists by name (the
    checkpoint stores the input embedding alone), and that embedding's module; else ``shapes``
    and None. LoRA on it is a linear module's, [vocab, dim] as [out, in], folded into the one tensor."""
    if not spec or is_regex(spec) or HEAD + ".weight" in shapes or not (model_config or {}).get("tie_word_embeddings", True):
        return shapes, None
    if not any(t.strip() == HEAD for t in spec.split(",")):
        return shapes, None
    try:
        module, shape = pl.input_embedding(shapes, model_config)
    except BadInputError:
        return shapes, None
    return {**shapes, HEAD + ".weight": shape}, module


def parse_tokens(text) -> tuple:
    """inject's ``--trainable-tokens``: ``3,5,7`` (the input embedding) or ``MODULE=3,5;MODULE=...``,
    as LoraConfig.token_indices ((module or "", ids), ...)."""
    example = "e.g. `trainable_tokens` 3,5,7 (rows of the input embedding) or embed_tokens=3,5,7"
    parts = [p.strip() for p in str(text).split(";") if p.strip()]
    out = []
    for part in parts:
        module, _, ids = part.rpartition("=")
        try:
            values = tuple(int(i) for i in ids.split(",") if i.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 0 or (len(parts) > 1 and not module.strip()):
            raise UsageError(f"`trainable_tokens` must be token ids or MODULE=ids;..., got {text!r}", example)
        if len(set(values)) != len(values):
            raise UsageError(f"`trainable_tokens` lists a token id twice: {part!r}", "list each token id once")
        out.append((module.strip(), values))
    if not out or len({m for m, _ in out}) != len(out):
        raise UsageError(f"`trainable_tokens` must name each module once, got {text!r}", example)
    return tuple(out)


def written_tokens(token_indices: tuple) -> list | dict:
    """LoraConfig.token_indices as PEFT's trainable_token_indices: a list for the input embedding, else a dict."""
    if len(token_indices) == 1 and token_indices[0][0] == "":
        return list(token_indices[0][1])
    return {module: list(ids) for module, ids in token_indices}


def attach(model, path: str, parts: dict, cfg, name: str, chosen: dict, phi: dict) -> str | None:
    """Put one embedding's LoRA or trainable tokens on ``model`` at ``path`` (``name``: its module
    in ``chosen``, the targets), its φ into ``phi``; or what is wrong."""
    from torch import nn

    from peftcli import modules as mod
    from peftcli.methods.lora.embedding_layers import LoraEmbedding, TrainableTokens

    real = mod.resolve(model, path)
    layer = model.get_submodule(real) if real is not None else None
    if not isinstance(layer, nn.Embedding):
        return f"{path}: an embedding's LoRA or trainable tokens on a {type(layer).__name__}, not an embedding layer"
    rows, dim = layer.num_embeddings, layer.embedding_dim
    if TOKENS in parts:
        indices = chosen[name][0]
        problem = tokens_problem(path, parts, indices, dim)
        if problem:
            return problem
        new = TrainableTokens(layer, indices)
        new.load_phi(parts[TOKENS])
        mod.replace(model, path, new)
        phi[peft_key(path, TOKENS)] = new.trainable_tokens_delta
        return None
    problem = embedding_problem(path, parts, cfg, rows, dim)
    if problem:
        return problem
    new = LoraEmbedding(layer, cfg.rank, cfg.scaling)
    new.load_phi(parts[EMB_A], parts[EMB_B])
    mod.replace(model, path, new)
    phi[peft_key(path, EMB_A)], phi[peft_key(path, EMB_B)] = new.lora_embedding_A, new.lora_embedding_B
    return None


def tie_tokens_head(model) -> str | None:
    """PEFT's tied adapter: an output head sharing a ``TrainableTokens`` embedding's weight reads
    the replaced rows too (attach's forward, as the merged tied tensor); or what is wrong."""
    from torch import nn

    from peftcli import modules as mod
    from peftcli.methods.lora.embedding_layers import TiedTokensHead, TrainableTokens

    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(tokens, TrainableTokens) or not getattr(model.config, "tie_word_embeddings", False):
        return None

    def shares(m) -> bool:  # the head itself, or a layer wrapping it (LoRA on it)
        return any(getattr(x, "weight", None) is tokens.weight for x in (m, getattr(m, "base_layer", None)))

    path, head = next(((n, m) for n, m in model.named_modules() if shares(m) and m is not tokens and m is not tokens.base_layer), (None, None))
    if head is None or path is None:
        return None
    if type(head) is not nn.Linear or head.bias is not None:
        return f"{path}: trainable tokens on an embedding this {type(head).__name__} is tied to (peftcli ties them to a plain bias-free linear head only)"
    mod.replace(model, path, TiedTokensHead(head, tokens))
    return None


def tied_lora_warning(model: str, modules, allow_pickle: bool = False) -> str | None:
    """inject's warning when LoRA targets an input embedding or ``lm_head`` that share one tensor
    (``modules``: the budget's target modules): merged ≠ adapted there (PEFT issue 2777)."""
    from peftcli.checkpoint.reader import open_checkpoint

    with open_checkpoint(model, allow_pickle=allow_pickle) as ckpt:
        shapes, config = {t.name: t.shape for t in ckpt.tensors.values()}, ckpt.config
    if HEAD + ".weight" in shapes or not (config or {}).get("tie_word_embeddings", True):
        return None
    try:
        embedding = pl.input_embedding(shapes, config)[0]
    except BadInputError:
        return None
    hit = next((m for m in modules if m in (HEAD, embedding)), None)
    if hit is None:
        return None
    return (f"warning: LoRA on {hit}, which shares one tensor with the tied {HEAD if hit == embedding else embedding}: "
            "the merged model changes both sides, the adapted one only this one, so merged ≠ adapted (PEFT issue 2777)")
