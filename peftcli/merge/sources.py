"""What a merge input contributes: for each base tensor it touches, its fp32 task vector φ.

Three kinds of input, all opened lazily and read one tensor at a time:
- a ``.diff`` (checked against the base's fingerprint): φ scattered from idx/val or dense;
- an adapter directory whose method folds (LoRA, DoRA, IA³, BitFit, layers): φ = ΔW from
  the method's ``deltas``, computed from the base tensor;
- a full checkpoint with the base's tensors: φ = θ_ft − θ₀, read in lockstep with the base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftcli.artifacts.adapter_dir import ADAPTER_CONFIG, read_adapter
from peftcli.artifacts.sparse_diff import check_base, read_diff
from peftcli.checkpoint.fingerprint import file_sha256, summarize_differences, table_differences, tensor_table
from peftcli.checkpoint.reader import Checkpoint, open_checkpoint
from peftcli.errors import BadInputError, UsageError


@dataclass
class Source:
    path: str
    kind: str  # "diff" | "adapter" | "checkpoint"
    deltas: dict[str, Callable[[torch.Tensor], torch.Tensor]]  # base tensor name -> φ from the base tensor
    hashes: dict[str, str] = field(default_factory=dict)  # weight file -> sha256
    close: Callable[[], None] = lambda: None
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # a trained task head: tensor name -> value
    labels: list[str] | None = None  # the head's label names, from the run's labels.json


def open_source(path: str, base: Checkpoint, allow_pickle: bool = False) -> Source:
    """Open merge input ``path`` against ``base``; every mismatch is a one-line error."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        return _adapter_source(path, base)
    if path.endswith(".diff"):
        return _diff_source(path, base)
    return _checkpoint_source(path, base, allow_pickle)


def _hashes(files: list[str]) -> dict[str, str]:
    return {os.path.basename(f): file_sha256(f) for f in files}


def _diff_source(path: str, base: Checkpoint) -> Source:
    diff = read_diff(path)
    # The content hash too, when the diff has one: a diff of another base with the same
    # architecture has the same tensor table but would merge into silently wrong weights.
    check_base(diff, base, content=diff.fingerprint.content is not None)

    def delta(name: str):
        def compute(stored: torch.Tensor) -> torch.Tensor:
            idx, val = diff.get(name)
            if idx is None:
                return val.float()
            phi = torch.zeros(stored.numel(), dtype=torch.float32)
            phi[idx.long()] = val.float()
            return phi.view(stored.shape)

        return compute

    return Source(path, "diff", {n: delta(n) for n in diff.names}, _hashes([path]), diff.close)


def _adapter_source(path: str, base: Checkpoint) -> Source:
    from peftcli.methods import method_for_adapter_config

    adapter = read_adapter(path)
    method = method_for_adapter_config(adapter.config, path)
    if not hasattr(method, "deltas"):
        raise UsageError(
            f"{path}: {method.name} adds computation (new modules or inputs) that no weight change reproduces",
            "only LoRA, DoRA, IA³, BitFit and layers adapters fold into the weights",
        )
    from peftcli.methods.base import PEFT_PREFIX

    heads = {}
    for head in adapter.config.get("modules_to_save") or []:
        for key, t in adapter.tensors.items():
            if key.startswith(f"{PEFT_PREFIX}{head}."):
                heads[key[len(PEFT_PREFIX) :]] = t
    cfg = method.config_from_adapter(adapter.config)
    deltas = method.deltas(cfg, {k: t for k, t in adapter.tensors.items() if k[len(PEFT_PREFIX) :] not in heads}, base)
    labels = None
    labels_path = os.path.join(path, "labels.json")
    if heads and os.path.isfile(labels_path):
        from peftcli.checkpoint.reader import load_json

        labels = load_json(labels_path, "labels").get("labels")
    return Source(path, "adapter", deltas, _hashes([os.path.join(path, "adapter_model.safetensors")]), heads=heads, labels=labels)


def _checkpoint_source(path: str, base: Checkpoint, allow_pickle: bool) -> Source:
    ft = open_checkpoint(path, allow_pickle=allow_pickle)
    differences = table_differences(tensor_table(base), tensor_table(ft), "the base", path)
    if differences:
        ft.close()
        raise BadInputError(f"{path} does not have the base's tensors: {summarize_differences(differences)}", "merge fine-tunes of this base only")

    def delta(name: str):
        def compute(stored: torch.Tensor) -> torch.Tensor:
            phi = ft.get(name).float()
            return phi.sub_(stored)  # upcasts stored element by element: no second fp32 copy

        return compute

    floating = [t.name for t in base.tensors.values() if t.dtype in ("F16", "BF16", "F32", "F64")]
    return Source(path, "checkpoint", {n: delta(n) for n in floating}, _hashes(ft.files), ft.close)
