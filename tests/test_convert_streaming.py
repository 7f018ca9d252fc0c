"""LoRA extraction from a full fine-tune is streamed: a tensor pair at a time, no ``.diff`` in between.

``peftcli convert FT --base BASE --to lora`` reads each changed weight of the fine-tune and of
the base, factors θ_ft − θ₀ and drops them: every tensor a checkpoint hands out, and every ΔW,
is watched through a weak reference, and at no read may more than the current pair (and the
ΔW being factored) be alive. No sparse diff is written on the way.
"""

from __future__ import annotations

import os
import weakref

import torch
from click.testing import CliRunner

from peftcli import lowrank
from peftcli.artifacts import sparse_diff
from peftcli.checkpoint.reader import Checkpoint, open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli


def _finetune(tiny_llama: str, out: str) -> str:
    g = torch.Generator().manual_seed(11)
    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    for name, t in sd.items():
        if name.endswith("proj.weight"):
            t.add_(0.01 * torch.randn(t.shape, generator=g))
    save_state_dict(sd, out, source_dir=tiny_llama)
    return out


def test_extraction_holds_one_tensor_pair_at_a_time_and_writes_no_diff(tiny_llama, tmp_path, monkeypatch):
    ft = _finetune(tiny_llama, str(tmp_path / "ft"))
    alive: list[weakref.ref] = []
    peak = [0]
    reads = [0]
    original = Checkpoint.get

    def watched(self, name):
        tensor = original(self, name)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(tensor))
        peak[0] = max(peak[0], len(alive))
        reads[0] += 1
        return tensor

    def no_diff(*args, **kwargs):
        raise AssertionError("a .diff was written during extraction")

    deltas: list[weakref.ref] = []
    held = [0]
    extract = lowrank.extract

    def watched_items(items):
        for name, make in items:
            def made(make=make):
                delta = make()
                held[0] = max(held[0], sum(1 for r in deltas if r() is not None))
                deltas.append(weakref.ref(delta))
                return delta
            yield name, made

    monkeypatch.setattr(lowrank, "extract", lambda items, *a, **k: extract(watched_items(items), *a, **k))
    monkeypatch.setattr(Checkpoint, "get", watched)
    monkeypatch.setattr(sparse_diff, "write_diff", no_diff)
    out = str(tmp_path / "lora")
    result = CliRunner().invoke(cli, ["convert", ft, "--base", tiny_llama, "--to", "lora", "--rank", "4", "-o", out, "--quiet"])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    changed = sum(1 for n in open_checkpoint(ft).tensors if n.endswith("proj.weight"))
    assert reads[0] >= 2 * changed  # every changed weight was read from both checkpoints...
    assert peak[0] <= 3  # ...and never more than one pair (plus one) held at once
    assert len(deltas) >= changed and held[0] <= 1  # at most the previous ΔW (its loop variable) alive as the next is made
