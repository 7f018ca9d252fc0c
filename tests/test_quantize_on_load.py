"""Quantise-on-load (``peftcli.quantize.on_load``): the NF4 base built from the checkpoint one
linear weight at a time is the model loading whole and quantising after gives, bit for bit,
and while it loads the deferred weights hold no memory.

The reference is the other path of the same code base (loading whole, then quantising),
which ``tests/test_train_lowprec.py`` holds against PEFT on an independently dequantised base.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from peftcli.artifacts.adapter_dir import read_adapter
from peftcli.attach import attach_adapter, load_base_model
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.quantize import nf4, on_load
from peftcli.training import precision
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import lm_rows


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("onload") / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    return str(path)


def _run(base, tmp_path, name, **lora):
    run = str(tmp_path / name)
    inject(base, "lora", LoraConfig(rank=4, **lora), run)
    return run


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of memory the model's tensors own (each storage once; placeholders own one element)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_llama_tied", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_base_equals_loading_whole_then_quantising(arch, dtype, request, tmp_path):
    base = request.getfixturevalue(arch)
    adapter = read_adapter(_run(base, tmp_path, "run"))
    assert on_load.eligible(adapter, "lm", full=False)

    whole = attach_adapter(load_base_model(base, "AutoModelForCausalLM", dtype=dtype), adapter)
    precision.quantize_frozen_linears(whole.model, base)

    model, _, deferred = on_load.load_deferred(base, dtype)
    linears = on_load.deferred_linears(model)
    weights = [model.get_submodule(n).weight for n in linears]
    assert linears and all(deferred.name_of(w) is not None for w in weights)  # still placeholders
    assert all(bool(w.flatten()[0].isnan()) for w in weights)  # used before quantising: NaN, never a value
    del weights
    # Only the tensors that are not deferred are held: the linears own one element each.
    tensors = [*model.named_parameters(), *model.named_buffers()]
    kept = sum(t.numel() * t.element_size() for n, t in tensors if n.rpartition(".")[0] not in linears or not n.endswith("weight"))
    assert _held_bytes(model) <= kept + 16 * len(linears)
    adapted = attach_adapter(model, adapter)
    precision.quantize_frozen_linears(adapted.model, base, deferred)

    ours, theirs = adapted.model.state_dict(), whole.model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert any(isinstance(m, nf4.NF4Linear) for m in adapted.model.modules())
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert not any(deferred.name_of(p) for p in adapted.model.parameters())


def test_train_with_nf4_uses_the_deferred_load_and_writes_the_same_adapter(tiny_llama, lm_data, tmp_path, monkeypatch):
    loads = []
    real = on_load.load_deferred
    monkeypatch.setattr(on_load, "load_deferred", lambda *a: loads.append(real(*a)) or loads[-1])
    cfg = TrainConfig(data=lm_data, steps=3, batch_size=4, lr=1e-2, quantize="nf4")
    deferred_run = _run(tiny_llama, tmp_path, "deferred")
    train(deferred_run, cfg)
    assert loads and loads[0] is not None

    monkeypatch.setattr(on_load, "load_deferred", lambda *a: None)  # load whole, quantise after
    whole_run = _run(tiny_llama, tmp_path, "whole")
    train(whole_run, cfg)
    ours = load_file(os.path.join(deferred_run, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(whole_run, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(float(t.abs().max()) > 0 for k, t in ours.items() if "lora_B" in k)  # trained: not a zero update


def test_runs_that_touch_the_base_weights_load_whole(tiny_llama, tmp_path):
    plain = read_adapter(_run(tiny_llama, tmp_path, "plain"))
    assert not on_load.eligible(plain, "classify", full=False)  # a new head is initialised
    assert not on_load.eligible(plain, "lm", full=True)
    assert not on_load.eligible(None, "lm", full=False)

    import types

    saving = types.SimpleNamespace(config={**plain.config, "modules_to_save": ["lm_head"]}, path=plain.path)
    assert not on_load.eligible(saving, "lm", full=False)  # a trained copy is made from the base's weights


def test_checkpoints_whose_names_transformers_maps_load_whole(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name in os.listdir(tiny_llama):
        if name != "model.safetensors":
            (renamed / name).write_bytes(open(os.path.join(tiny_llama, name), "rb").read())
    tensors = load_file(os.path.join(tiny_llama, "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(renamed / "model.safetensors"))
    assert on_load.load_deferred(str(renamed), torch.float32) is None


def test_a_placeholder_no_nf4_layer_takes_gets_its_real_weight(tiny_llama):
    model, _, deferred = on_load.load_deferred(tiny_llama, torch.float32)
    kept = model.model.layers[0].mlp.down_proj.weight
    kept.requires_grad_(True)  # as if it were φ: quantize_frozen_linears leaves this layer alone
    for p in model.parameters():
        if p is not kept:
            p.requires_grad_(False)
    precision.quantize_frozen_linears(model, tiny_llama, deferred)
    restored = model.model.layers[0].mlp.down_proj.weight
    stored = load_file(os.path.join(tiny_llama, "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(restored, stored) and restored.requires_grad



def _quantizable_methods() -> list[str]:
    """One-pass methods whose φ lives outside the base's tensors: the ones ``quantize`` trains."""
    from peftcli.methods import METHODS
    from tests import matrices

    return [n for n in matrices.one_pass() if not METHODS[n].trains_in_place]


@pytest.mark.parametrize("method", [*_quantizable_methods(), "dora"])
def test_every_method_trains_the_same_on_a_deferred_base(method, tiny_llama, lm_data, tmp_path, monkeypatch):
    """Attaching must not read the placeholders: each method trains on the deferred base to the
    adapter it trains on the base loaded whole, bit for bit."""
    from peftcli.methods import METHODS
    from peftcli.options import from_options
    from tests import matrices

    name = "lora" if method == "dora" else method
    cfg = from_options(METHODS[name].config_cls, matrices.options(name, **({"dora": True} if method == "dora" else {})))
    train_cfg = TrainConfig(data=lm_data, steps=2, batch_size=4, lr=1e-2, quantize="nf4")
    loads = []
    real = on_load.load_deferred
    monkeypatch.setattr(on_load, "load_deferred", lambda *a: loads.append(real(*a)) or loads[-1])
    runs = {}
    for kind in ("deferred", "whole"):
        runs[kind] = str(tmp_path / kind)
        inject(tiny_llama, name, cfg, runs[kind])
        if kind == "whole":
            monkeypatch.setattr(on_load, "load_deferred", lambda *a: None)
        train(runs[kind], train_cfg)
    assert loads and loads[0] is not None  # the first run did load deferred
    ours = load_file(os.path.join(runs["deferred"], "adapter_model.safetensors"))
    theirs = load_file(os.path.join(runs["whole"], "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(bool(t.isfinite().all()) for t in ours.values())
