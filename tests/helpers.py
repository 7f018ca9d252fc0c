"""Shared test helpers: model inputs and output comparison."""

from __future__ import annotations

import torch


def batch(seed: int = 0, size: int = 2, length: int = 7, vocab: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0 if size > 1 else 1  # some left padding, so masks matter
    return {"input_ids": ids, "attention_mask": mask}


def output_tensor(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name) and getattr(out, name) is not None:
            return getattr(out, name)
    return out[0]


def randomize_(params, seed: int = 1, scale: float = 0.1) -> None:
    """Give φ non-trivial values (B = 0 at init would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)
