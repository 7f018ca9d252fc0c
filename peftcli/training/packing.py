"""Padding-free packing (``--packing``, tasks ``lm`` and ``sft``): several examples per row.

Examples are binned first-fit-decreasing by length into rows of at most ``--max-length``
tokens, once (the bins depend on the data alone, so a resumed run sees the same rows); each
epoch then visits the rows in its seeded order (``batching.epoch_order``), exactly as unpacked
training visits examples.

Inside a row, position ids restart at 0 for every example and attention stays inside it:
transformers reads the restarts of ``position_ids`` (no 2D attention mask, no KV cache) as
packed sequences and builds a block-diagonal causal mask for every attention implementation.
The first label of every example is ignored: in a row it would be predicted from the previous
example's last token; alone it is never predicted. So a packed micro-batch predicts exactly
the (context, token) pairs of its examples unpacked, and its loss, the mean over predicted
tokens, is theirs. The tail of a row shorter than the batch's longest is a segment of its own
that predicts nothing.

Not every model honours that path (an older architecture would silently attend across
examples): ``check_isolation`` runs one packed row of the real data against its examples run
alone and refuses the run unless their logits agree. Methods that add tokens to the input
(prompt and prefix tuning) are refused: their virtual tokens are laid out per row, not per
example.
"""

from __future__ import annotations

import torch

from peftcli.errors import UsageError

IGNORE = -100  # transformers' ignore_index (as batching.IGNORE; not imported: batching imports us)
_PROBE_TOKENS = 8  # tokens of each example the isolation check runs
_PROBE_TOL = 1e-4  # fp32 logits: a leak across examples moves them by orders of magnitude more


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into ``lengths``) of total length at most ``capacity``: longest
    first (ties in index order), each into the first bin with room. A segment tree over the
    bins' free space finds that bin in O(log n), so a million examples pack in seconds."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * (2 * size)  # a node holds the most free space among its leaves (bins)
    for i in range(n):
        free[size + i] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for index in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        node = 1
        while node < size:  # descend to the leftmost bin with room (an unused bin has all of it)
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(index)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack(items: list[dict], max_length: int) -> tuple[list[dict], float]:
    """Packed rows of the encoded ``items`` (each at most ``max_length`` tokens), and the packing
    efficiency: the fraction of the rows' ``max_length`` token slots that hold example tokens."""
    bins = first_fit_decreasing([len(it["input_ids"]) for it in items], max_length)
    rows = []
    for indices in bins:
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for i in sorted(indices):  # examples in data order inside a row
            it = items[i]
            ids += it["input_ids"]
            labels += [IGNORE] + list(it["labels"][1:])  # never predicted from the previous example
            lengths.append(len(it["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "lengths": lengths})
    used = sum(len(r["input_ids"]) for r in rows)
    return rows, used / max(1, len(rows) * max_length)


def collate_packed(rows: list[dict], filler: int) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows, their tails filled to the longest row of the batch.

    ``filler`` fills the tails: any id works (a tail attends only to itself and predicts
    nothing); callers pass one other than the pad id, on which transformers warns that an
    attention mask is missing.
    """
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), filler, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for row, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[row, :n] = torch.tensor(r["input_ids"])
        labels[row, :n] = torch.tensor(r["labels"])
        positions[row] = torch.cat([torch.arange(k) for k in [*r["lengths"], length - n] if k])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def filler_id(pad_id: int) -> int:
    return 0 if pad_id != 0 else 1


def refuse_unpackable(task: str, adapted) -> None:
    """``--packing`` only where its rows are right: causal LM tasks, methods that add no tokens."""
    if task == "classify":
        raise UsageError("`packing` does not apply to classify", "drop `packing`: it packs lm and sft examples, one label per example cannot be packed")
    if getattr(adapted, "_transform", None) is not None:
        method = getattr(getattr(adapted, "method", None), "name", None) or "this method"
        raise UsageError(
            f"`packing` does not work with {method}: it adds virtual tokens to each row, which packed examples would share",
            "drop `packing` for prompt and prefix tuning",
        )


def _base_model(adapted):
    """The transformers model inside an adapted (or fully fine-tuned) model."""
    from transformers import PreTrainedModel

    return next(m for m in adapted.modules() if isinstance(m, PreTrainedModel))


def disable_cache(adapted) -> None:
    """transformers detects packed rows only without a KV cache, which training never reads:
    every forward of the pass runs with ``use_cache=False``."""
    model = _base_model(adapted)
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "use_cache": False}), with_kwargs=True)


def check_isolation(adapted, rows: list[dict], device, filler: int) -> None:
    """Refuse a model whose packed rows are not their examples run alone (a model whose
    attention ignores the position-id restarts): one row of the real data, fp32, eval mode."""
    row = next((r for r in rows if len(r["lengths"]) >= 2), None)
    if row is None:
        return  # no row holds two examples: nothing could leak
    starts = [sum(row["lengths"][:k]) for k in range(2)]
    alone = [row["input_ids"][s : s + min(n, _PROBE_TOKENS)] for s, n in zip(starts, row["lengths"][:2])]
    probe = {"input_ids": alone[0] + alone[1], "labels": [IGNORE] * (len(alone[0]) + len(alone[1])), "lengths": [len(a) for a in alone]}
    was_training = adapted.training
    adapted.eval()
    try:
        with torch.no_grad():
            batch = {k: v.to(device) for k, v in collate_packed([probe], filler).items()}
            packed = adapted(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()
            singles = [adapted(input_ids=torch.tensor([a], device=device)).logits[0].float() for a in alone]
    finally:
        adapted.train(was_training)
    expected = torch.cat(singles)
    scale = max(1.0, float(expected.abs().max()))
    if not bool(((packed - expected).abs() <= _PROBE_TOL * scale).all()):
        arch = _base_model(adapted).config.model_type
        raise UsageError(
            f"`packing`: this model ({arch}) attends across the examples of a packed row",
            "drop `packing` for this model: its attention does not restart at position-id 0",
        )


def prepare_packing(task: str, adapted, items: list[dict], max_length: int, device, pad_id: int) -> tuple[list[dict], float]:
    """The packed rows of a pass's encoded examples and their efficiency, once the model is
    built: refused where packing would be wrong, checked on the model itself."""
    refuse_unpackable(task, adapted)
    disable_cache(adapted)
    rows, efficiency = pack(items, max_length)
    check_isolation(adapted, rows, device, filler_id(pad_id))
    return rows, efficiency
