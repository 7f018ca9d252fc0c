"""FSDP2 sharding across the workers of ``train --nproc N --shard`` (module level).

Each transformer block (the classes transformers lists in ``_no_split_modules``) and then
the whole model are wrapped with ``torch.distributed.fsdp.fully_shard``: every parameter,
frozen base and φ alike, is held as one shard per worker (a DTensor split along dim 0), and
a block's parameters are gathered just before it runs and freed after, in the forward and
the backward. φ's gradients are reduce-scattered and averaged over the workers, as DDP
averages them, so the steps are the same as one process's over the global batch.

What is written is what an unsharded run writes: φ and AdamW's moments are gathered into
full tensors on every worker (a collective, so all of them take part) and rank 0 writes
them; a resumed run splits the saved full moments back into its shards. So a run sharded
over N workers resumes sharded over M, or unsharded, and the other way round.

Not with ``quantize nf4`` (NF4 weights are buffers, which FSDP2 does not shard) nor for
methods that train the base's own tensors (their gradients are averaged by hand).
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.errors import UsageError


def check(cfg, adapter, world_size: int) -> None:
    """Refuse ``shard`` where it cannot hold (before anything is read or written)."""
    if not cfg.shard:
        return
    if cfg.quantize is not None:
        raise UsageError(
            f"`shard` cannot split an `quantize` {cfg.quantize} base: NF4 weights are buffers, which FSDP2 does not shard",
            "drop one of `shard` and `quantize`",
        )
    if cfg.full:
        raise UsageError("`shard` is for adapters; `full` fine-tuning is not sharded yet", "drop `shard`, or train an adapter")
    from peftcli.methods import method_for_adapter_config

    method = method_for_adapter_config(adapter.config, adapter.path)
    if method.trains_in_place:
        raise UsageError(
            f"`shard` cannot split {method.name}: its φ lives in the base's own tensors, whose gradients are averaged by hand",
            "drop `shard` (plain `nproc` replicates the model)",
        )
    if world_size <= 1:
        raise UsageError("`shard` splits the base across workers and needs `nproc` 2 or more", "add `nproc` 2 (or more), or drop `shard`")


def shard(adapted: nn.Module, device: torch.device, world_size: int) -> int:
    """Wrap ``adapted`` with FSDP2 in place (blocks, then the root); the number of blocks
    wrapped. φ's parameters are replaced by their sharded versions in ``adapted``'s φ map."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    owners = {id(p): (module, name) for module in adapted.modules() for name, p in module.named_parameters(recurse=False)}
    mesh = init_device_mesh(device.type, (world_size,))
    inner = adapted.model if hasattr(adapted, "model") else adapted
    block_classes = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in inner.modules() if type(m).__name__ in block_classes]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(adapted, mesh=mesh)
    # fully_shard registers new (DTensor) parameters: φ's map must hold those, not the old ones.
    adapted.rebind_phi({key: getattr(*owners[id(old)]) for key, old in adapted.phi_parameters().items()})
    return len(blocks)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor gathered from every worker (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This worker's part of ``t`` (all of it where ``t`` is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered whole (on every worker)."""
    saved = optimizer.state_dict()
    saved["state"] = {i: {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in saved["state"].items()}
    return saved


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A saved (whole) optimizer state split like ``optimizer``'s parameters, to load into it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, s in saved["state"].items():
        p = params[int(i)]
        state[i] = {
            k: distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in s.items()
        }
    return {**saved, "state": state}


def held_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this worker holds of the model's parameters, bytes of all of them)."""
    held = total = 0
    for p in model.parameters():
        held += local(p).numel() * p.element_size()
        total += p.numel() * p.element_size()
    return held, total
