"""EVA (Paischer et al., 2024, "Explained Variance Adaptation"): LoRA's A from the data.

``peftcli inject lora --init eva --init-data FILE`` runs the base model (fp32, CPU, its own
architecture class) over the
examples of FILE, read and tokenised exactly as ``peftcli train`` reads them (the same JSONL /
CSV formats, ``encode`` and ``collate``), and for each targeted linear layer takes the
principal components of the inputs it sees: A [k, in] holds the top k right-singular vectors
of the centred input matrix, B = 0, so the adapter starts at ΔW = 0 and the base weights are
not changed (a plain LoRA adapter, written with PEFT's ``init_lora_weights="eva"``).

The tokens used are PEFT's (``prepare_model_inputs_fn_language_modeling`` with
``use_label_mask``): attention-mask positions whose label is not -100, so an sft example
contributes its completion tokens, a chat example its assistant turns.

Ranks are redistributed as PEFT's ``get_eva_state_dict`` does: each target may get up to
round(ρ·r) components; all targets' explained-variance ratios (eigenvalue / total variance of
that layer's inputs) are ranked together and the budget r·(number of targets) goes to the
largest, ties to the target the model holds first; a target given 0 is dropped. With
PEFT's ``adjust_scaling_factors`` α is scaled by k/r, so α/r is kept; the ranks and α's are
written as PEFT's rank_pattern / alpha_pattern.

Where PEFT approximates the PCA by an incremental, randomised one that stops when the
components' cosine similarity reaches τ (cycling over the data meanwhile), peftcli computes it
exactly, from the inputs' mean and scatter accumulated in float64 over every token read: the
result is the limit PEFT's converges to, and the same on every run. Memory: one in×in float64
matrix per distinct layer input (q/k/v, gate/up share theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError

if TYPE_CHECKING:
    import torch

BATCH = 8  # examples per forward pass: the result does not depend on it (padding is masked out)
IGNORE = -100  # PEFT's EvaConfig.label_mask_value, transformers' ignore index


@dataclass
class EvaResult:
    """Per target module (checkpoint path): its A [k, in] (fp32; k = 0: dropped) in model order."""

    components: dict  # module -> torch.Tensor [k, in]

    def ranks(self) -> dict[str, int]:
        return {m: int(a.shape[0]) for m, a in self.components.items()}


def eva_components(base: str, modules: list, rank: int, rho: float, data_path: str, limit: int | None, max_length: int) -> EvaResult:
    """EVA's A for each of ``modules`` (``targets.Module``s, all of rank ``rank``) from the
    base model ``base`` run over the data file ``data_path``."""
    items, pad_id = _items(base, data_path, limit, max_length)
    most = round(rank * rho)  # PEFT's max_components
    _check_sizes(modules, most, rank, rho)
    model = _load(base)
    order, layers = _layers(model, modules)
    stats = _accumulate(model, layers, items, pad_id)
    tokens = min(s.n for s in stats.values())
    if tokens <= most:
        raise BadInputError(
            f"{data_path}: {tokens} tokens reach the targets' inputs, and EVA needs more than round(eva_rho·rank) = {most} "
            "(labelled, non-padding tokens: an sft prompt's tokens do not count)",
            "give `init_data` more (or longer) examples, or lower `rank` or `eva_rho`",
        )
    vectors, ratios = {}, {}
    for name in order:
        vectors[name], ratios[name] = _principal(stats[name], most)
    counts = _distribute(order, ratios, rank * len(order))
    return EvaResult({name: vectors[name][: counts[name]].contiguous() for name in order})


def _items(base: str, data_path: str, limit: int | None, max_length: int) -> tuple[list[dict], int]:
    """The data's examples tokenised as ``peftcli train`` tokenises them, and the pad id."""
    from peftcli.training.batching import encode, load_tokenizer
    from peftcli.training.chat import resolve_template
    from peftcli.training.data import load_dataset

    data = load_dataset(data_path, None, limit)  # an empty file: "no examples (the data file is empty)"
    if data.task == "classify":
        raise UsageError(
            f"{data_path}: text+label rows are classification data; EVA runs the causal LM over lm/sft rows",
            "give `init_data` rows with text, prompt+completion or messages",
        )
    tokenizer = load_tokenizer(base)
    template = resolve_template(data.chat, None, tokenizer, base)
    return encode(data, tokenizer, max_length, None, template), tokenizer.pad_token_id


def _check_sizes(modules: list, most: int, rank: int, rho: float) -> None:
    """PEFT cannot take more components than a layer has inputs; peftcli reads no LoRA rank
    above min(out, in): refuse a round(ρ·r) that a target cannot hold."""
    small = min(modules, key=lambda m: min(m.shape))
    if most > min(small.shape):
        raise UsageError(
            f"EVA may give a target round(eva_rho·rank) = round({rho:g}·{rank}) = {most} components, more than min(out, in) = "
            f"{min(small.shape)} of {small.name}",
            f"lower `eva_rho` or `rank` so that their product is at most {min(small.shape)}",
        )


def _load(base: str):
    """The checkpoint's own architecture (config.json's ``architectures``), as PEFT's user
    builds it: a causal LM class would make an encoder's attention causal."""
    from peftcli.attach import load_base_model

    return load_base_model(base)


def _layers(model, modules: list) -> tuple[list[str], dict]:
    """The targets in the order the model holds them (PEFT's ``named_modules`` order, which
    breaks ties in the rank distribution), and each one's layer."""
    from peftcli import modules as mod

    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = {}
    for m in modules:
        layer, _, problem = mod.find_linear(model, m.name)
        if problem:
            raise BadInputError(f"`init` eva: {problem}", "the checkpoint's modules must build as transformers builds them")
        layers[m.name] = (layer, position[mod.resolve(model, m.name)])
    order = sorted(layers, key=lambda n: layers[n][1])
    return order, {n: layers[n][0] for n in order}


class _Stats:
    """Sum, scatter and count of the rows seen, float64."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: "torch.Tensor | None" = None
        self.scatter: "torch.Tensor | None" = None

    def add(self, x: "torch.Tensor") -> None:
        import torch

        x = x.to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.scatter += x.T @ x


def _accumulate(model, layers: dict, items: list[dict], pad_id: int) -> dict[str, _Stats]:
    """Each target's input statistics over the used tokens of every example; targets that
    receive the same input tensor (q/k/v) share one accumulator."""
    import torch

    from peftcli.training.batching import collate

    stats: dict[str, _Stats] = {}
    seen: list = []  # (input tensor, stats) added in this forward pass
    state = {"keep": None}

    def hook(name):
        def fn(_module, args, _output):
            x = args[0] if isinstance(args, (tuple, list)) else args
            same = next((s for t, s in seen if t is x), None)
            if name not in stats:
                stats[name] = same or _Stats()
            if stats[name] is not same and any(s is stats[name] for _, s in seen):
                raise AssertionError(f"EVA: {name} shared its input with another target in one pass and not in another")
            if same is None:
                stats[name].add(x.detach()[state["keep"]])
                seen.append((x, stats[name]))
            elif stats[name] is not same:
                raise AssertionError(f"EVA: {name} shared its input with another target in one pass and not in another")
        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(items), BATCH):
                batch = collate(items[i : i + BATCH], pad_id)
                keep = batch["attention_mask"].bool()
                if "labels" in batch:  # PEFT's use_label_mask: prompt and padding positions are not used
                    keep &= batch["labels"] != IGNORE
                state["keep"] = keep
                seen.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in stats]
    if missing:
        raise BadInputError(f"`init` eva: the forward pass never reached {missing[0]}", "target modules the model runs on its input")
    return stats


def _principal(s: _Stats, k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The top ``k`` principal directions [k, in] (fp32, signed as PEFT's ``svd_flip``: each
    row's largest |entry| positive) and their explained-variance ratios (float64)."""
    import torch

    assert s.sum is not None and s.scatter is not None  # more tokens than components were counted
    mean = s.sum / s.n
    centred = s.scatter - s.n * torch.outer(mean, mean)
    centred = (centred + centred.T) / 2
    values, vectors = torch.linalg.eigh(centred)  # ascending
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k].T
    total = torch.diagonal(centred).sum()
    rows = torch.arange(k)
    signs = torch.sign(vectors[rows, vectors.abs().argmax(1)])
    vectors = vectors * signs[:, None]
    return vectors.to(torch.float32), values.clamp(min=0) / total


def _distribute(order: list[str], ratios: dict, budget: int) -> dict[str, int]:
    """PEFT's ``_get_rank_distribution``: the ``budget`` largest ratios over all targets
    (earlier targets first among equal values), counted per target."""
    flat = [(float(v), i, name) for i, name in enumerate(order) for v in ratios[name]]
    flat.sort(key=lambda t: (-t[0], t[1]))
    counts = {name: 0 for name in order}
    for _, _, name in flat[:budget]:
        counts[name] += 1
    return counts
