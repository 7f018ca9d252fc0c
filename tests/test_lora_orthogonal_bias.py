"""inject lora --init orthogonal (PEFT's init_lora_weights="orthogonal") and --lora-bias (PEFT's
lora_bias): PEFT's own initialisation, adapters PEFT loads with the same outputs, merges equal
to PEFT's merge_and_unload, and the combinations PEFT refuses."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.methods.lora import LoraConfig
from tests.helpers import assert_error, batch, output_tensor, randomize_

peft = pytest.importorskip("peft")

Q0 = "model.layers.0.self_attn.q_proj"


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _peft_load(base: str, adapter: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()


def test_orthogonal_a_and_b_are_peft_orthogonal_init_from_the_same_seed(tiny_llama, tmp_path):
    """One target, seed 5: PEFT's LoraLayer.orthogonal_init run after torch.manual_seed(5)
    draws what inject draws from its generator seeded 5 (the same Mersenne Twister stream)."""
    run = str(tmp_path / "run")
    inject(tiny_llama, "lora", LoraConfig(rank=4, targets=Q0.replace(".", r"\."), init="orthogonal"), run, seed=5)
    ours = load_file(os.path.join(run, "adapter_model.safetensors"))
    assert json.load(open(os.path.join(run, "adapter_config.json")))["init_lora_weights"] == "orthogonal"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(tiny_llama), peft.LoraConfig(r=4, target_modules=[Q0]))
    layer = model.get_submodule("base_model.model." + Q0)
    torch.manual_seed(5)
    layer.orthogonal_init("default")
    a, b = ours[f"base_model.model.{Q0}.lora_A.weight"], ours[f"base_model.model.{Q0}.lora_B.weight"]
    assert torch.equal(a, layer.lora_A["default"].weight.detach()) and torch.equal(b, layer.lora_B["default"].weight.detach())
    assert a.abs().min() > 0 and b.abs().max() > 1e-3 and (b @ a).abs().max() < 1e-6  # both non-zero, ΔW = 0


@pytest.mark.parametrize("kw", [dict(init="orthogonal", dora=True), dict(init="orthogonal", rslora=True, rank_pattern="v_proj=2")])
def test_orthogonal_adapter_loads_in_peft_with_equal_outputs(tiny_llama, tmp_path, kw):
    run = str(tmp_path / "run")
    budget = inject(tiny_llama, "lora", LoraConfig(rank=4, **kw), run, seed=2)
    adapted = load_adapted(tiny_llama, run).eval()
    assert adapted.num_trainable == budget.trainable
    base = _forward(load_base_model(tiny_llama).eval(), batch())
    assert torch.allclose(_forward(adapted, batch()), base, atol=1e-5)  # B·A = 0: the base's outputs
    randomize_([p for p in adapted.parameters() if p.requires_grad])
    ours = _forward(adapted, batch())
    adapted.save(str(tmp_path / "trained"))
    assert torch.allclose(ours, _forward(_peft_load(tiny_llama, str(tmp_path / "trained")), batch()), atol=1e-5)


@pytest.fixture(scope="module")
def bias_run(tiny_bert, tmp_path_factory):
    """A --lora-bias adapter on BERT's query/value (biased linears), its φ moved off zero."""
    d = tmp_path_factory.mktemp("bias")
    run = str(d / "run")
    budget = inject(tiny_bert, "lora", LoraConfig(rank=2, lora_bias=True), run)
    adapted = load_adapted(tiny_bert, run)
    assert adapted.num_trainable == budget.trainable
    assert any(n.endswith("lora_B.bias") for n in adapted.phi_parameters())
    randomize_([p for p in adapted.parameters() if p.requires_grad])
    adapted.save(str(d / "trained"))
    return str(d / "trained"), _forward(adapted.eval(), batch())


def test_lora_bias_adapter_loads_in_peft_and_merges_as_merge_and_unload(tiny_bert, bias_run, tmp_path):
    trained, ours = bias_run
    assert json.load(open(os.path.join(trained, "adapter_config.json")))["lora_bias"] is True
    theirs = _peft_load(tiny_bert, trained)
    assert torch.allclose(ours, _forward(theirs, batch()), atol=1e-5)
    want = theirs.merge_and_unload().state_dict()
    merge(tiny_bert, [trained], str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    stored = load_file(os.path.join(tiny_bert, "model.safetensors"))
    biases = [n for n in merged if n.endswith("query.bias") and not torch.equal(merged[n], stored[n])]
    assert biases  # the bias of lora_B was folded
    for name, t in merged.items():
        assert torch.allclose(t, want[name], atol=1e-5), name


def test_plain_config_has_no_lora_bias_key(tiny_bert, tmp_path):
    inject(tiny_bert, "lora", LoraConfig(rank=2), str(tmp_path / "run"))
    assert "lora_bias" not in json.load(open(tmp_path / "run" / "adapter_config.json"))


@pytest.mark.parametrize("base, args, message", [
    ("llama", ["--lora-bias"], "--lora-bias needs targets with a bias to merge lora_B's bias into, and model.layers.0.self_attn.q_proj has none"),
    ("bert", ["--lora-bias", "--dora"], "--lora-bias goes with plain LoRA only"),
    ("bert", ["--lora-bias", "--init", "gaussian"], "--lora-bias goes with plain LoRA only"),
    ("llama", ["--init", "orthogonal", "--rank", "3"], "--init orthogonal needs even ranks"),
    ("llama", ["--init", "orthogonal", "--rank-pattern", "v_proj=5"], "got 5"),
])
def test_refused_combinations_are_one_line_usage_errors(tiny_llama, tiny_bert, tmp_path, base, args, message):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", *args, {"llama": tiny_llama, "bert": tiny_bert}[base], "-o", out])
    assert_error(result, 2, message, out)
