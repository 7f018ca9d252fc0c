"""Tensor level: create a method's initial φ for a base checkpoint and write the adapter directory.

From ``config.json`` and tensor headers alone (plus the few base tensors a method's init
needs, e.g. DoRA's row norms or prompt embeddings): the model is never built, so this takes
seconds on a checkpoint of any size (but for LoRA's ``--init eva``, which runs the base over
data first: ``LoRA.prepare_init``, ``methods.lora.eva_init``). φ is streamed: the header is
written from the tensors' shapes and each tensor is made, written and freed in turn, so
memory stays at the largest φ tensor (plus what the method's init holds eagerly), not the whole φ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from peftcli import __version__
from peftcli.checkpoint.atomic import check_output_path
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.methods import get_method
from peftcli.methods.base import ONE_PASS, Budget


def inject(
    base: str, method_name: str, cfg: Any, out: str, *, seed: int = 0, force: bool = False, allow_pickle: bool = False
) -> Budget:
    """Write the adapter directory ``out`` for ``method_name`` with options ``cfg``; return its budget."""
    import torch

    method = get_method(method_name)
    check_output_path(out, [base], force)  # fail before any work
    with open_checkpoint(base, allow_pickle=allow_pickle) as ckpt:
        given = cfg  # what the metadata records: the options as given
        cfg = getattr(method, "prepare_init", lambda ckpt, cfg: cfg)(ckpt, cfg)  # LoRA's EVA: ranks and A from data
        budget = Budget.of(method, ckpt, cfg)
        # Values may be LazyTensors: made one at a time as write_adapter writes them, so φ is
        # never in memory whole (layers --layers 0-31 on a 7B model is 26 GB of fp32 zeros).
        tensors = method.init(ckpt, cfg, torch.Generator().manual_seed(seed))
        from peftcli.methods.lora.expert_layouts import refuse_on_disk_only
        from peftcli.targets import model_type_of

        shapes = {t.name: tuple(t.shape) for t in ckpt.tensors.values()}
        refuse_on_disk_only(list(tensors), shapes, model_type_of(ckpt.config), method.name)  # fused MoE experts
        derived = method.derived_keys(cfg)
        created = sum(t.numel() for k, t in tensors.items() if k not in derived)  # from shapes: makes nothing
        # Methods that choose their entries by training (LT-SFT) create them in phase 1.
        if created != budget.trainable and method.schedule == ONE_PASS:  # the budget and the init are two views of one method
            raise AssertionError(f"{method.name}: init created {created} parameters but the budget says {budget.trainable}")
        metadata = {
            "peftcli.version": __version__,
            "peftcli.method": method.name,
            "peftcli.options": json.dumps(_recorded(given), sort_keys=True),
            "peftcli.seed": str(seed),
            "peftcli.base": os.path.abspath(base),
        }
        from peftcli.artifacts.adapter_dir import write_adapter

        write_adapter(out, method.adapter_config(ckpt, cfg), tensors, metadata=metadata, inputs=[base], force=force)
    return budget


def _recorded(cfg: Any) -> dict:
    """The config's fields as the adapter's ``peftcli.options`` metadata records them: every
    field but those marked ``recorded=False`` (state read from an adapter, never an option), and
    those marked ``recorded="given"`` when left at their default."""
    fields = dataclasses.fields(cfg)
    skip = {f.name for f in fields if f.metadata.get("recorded") is False}
    skip |= {f.name for f in fields if f.metadata.get("recorded") == "given" and getattr(cfg, f.name) == f.default}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
