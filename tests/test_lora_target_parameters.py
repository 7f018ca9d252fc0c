"""LoRA on nn.Parameters (PEFT's target_parameters, lora.ParamWrapper) on a tiny Llama 4 text
model, whose fused 3-D expert tensors are stored as they are (transformers saves Mixtral-style
experts one by one): PEFT's adapters fold as merge_and_unload folds them, inject's load in PEFT
with peftcli's outputs, train changes them, and what peftcli does not do is refused by name.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.tiny import VOCAB, word_tokenizer
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import assert_error, batch, lm_rows, output_tensor

peft = pytest.importorskip("peft")
if tuple(int(x) for x in peft.__version__.split(".")[:2]) < (0, 17):
    pytest.skip(f"PEFT {peft.__version__} has no target_parameters (added in 0.17)", allow_module_level=True)

EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
GATE_UP = "model.layers.0.feed_forward.experts.gate_up_proj"
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> str:
    """A seeded tiny Llama 4 text model: 4 experts of [E, in, out] gate_up_proj / down_proj per layer."""
    import transformers as tf

    out = str(tmp_path_factory.mktemp("models") / "llama4")
    torch.manual_seed(0)
    cfg = tf.Llama4TextConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=24, intermediate_size_mlp=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=4, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    model = tf.Llama4ForCausalLM(cfg)
    with torch.no_grad():  # transformers leaves gate_up_proj at zero: give the experts weights
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2) if p.dim() == 3 else None
    model.eval().save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


def _randomize(path: str, seed: int) -> dict:
    """Give every φ tensor of the adapter at ``path`` non-zero values (B = 0 makes comparisons vacuous)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in load_file(os.path.join(path, ADAPTER)).items()}
    save_file(tensors, os.path.join(path, ADAPTER), metadata={"format": "pt"})
    return tensors


def _peft_model(base: str, **config):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return get_peft_model(model, PeftLoraConfig(r=2, lora_alpha=6, **config)).eval()


@pytest.mark.parametrize("config", [
    dict(target_modules=[], target_parameters=EXPERTS),
    # beside modules, a 2-D parameter of an nn.Linear (PEFT wraps o_proj's weight, not the layer)
    dict(target_modules=["v_proj"], target_parameters=["feed_forward.experts.down_proj", "self_attn.o_proj.weight"]),
], ids=["experts", "mixed"])
def test_peft_adapter_folds_as_merge_and_unload(llama4, tmp_path, config):
    pm = _peft_model(llama4, **config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        want_logits = pm(**batch(vocab=len(VOCAB))).logits
    theirs = pm.merge_and_unload().state_dict()
    result = CliRunner().invoke(cli, ["merge", llama4, str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    ours, base = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(os.path.join(llama4, "model.safetensors"))
    assert set(ours) == set(base)
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert changed and all(k.endswith(("experts.gate_up_proj", "experts.down_proj", "o_proj.weight", "v_proj.weight")) for k in changed)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=0), k
    merged = load_base_model(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.allclose(output_tensor(merged(**batch(vocab=len(VOCAB)))), want_logits, atol=1e-5)


def test_injected_adapter_loads_in_peft_with_our_logits(llama4, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", "-r", "2", "--alpha", "6", "--targets", "q_proj",
                                      "--target-parameters", ",".join(EXPERTS), llama4, "-o", run])
    assert result.exit_code == 0, result.output
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{i}.{n}" for i in (0, 1) for n in EXPERTS)
    saved = _randomize(run, seed=7)
    # PEFT's layout: the first registered parameter (gate_up_proj [4, 16, 48]) wrapped innermost
    assert tuple(saved["base_model.model.model.layers.0.feed_forward.experts.base_layer.lora_A.weight"].shape) == (8, 48)
    assert tuple(saved["base_model.model.model.layers.0.feed_forward.experts.lora_B.weight"].shape) == (24, 8)
    inputs = batch(vocab=len(VOCAB))
    with torch.no_grad():
        ours = output_tensor(load_adapted(llama4, run)(**inputs))
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama4), run).eval()(**inputs).logits
        plain = AutoModelForCausalLM.from_pretrained(llama4).eval()(**inputs).logits
    assert not torch.allclose(theirs, plain, atol=1e-3)  # the adapter changes the outputs
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_train_changes_the_expert_lora(llama4, tmp_path):
    run = str(tmp_path / "run")
    inject(llama4, "lora", LoraConfig(rank=2, target_parameters=",".join(EXPERTS)), run)
    before = load_file(os.path.join(run, ADAPTER))
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    train(run, TrainConfig(data=str(data), steps=3, batch_size=4, lr=1e-2, schedule="constant"))
    after = load_file(os.path.join(run, ADAPTER))
    assert set(after) == set(before) and len(after) == 8
    for k in after:
        assert not torch.equal(after[k], before[k]), k  # A and B of every expert tensor trained
    assert all(float(after[k].abs().max()) > 0 for k in after if "lora_B" in k)


@pytest.mark.parametrize("args, code, words", [
    (["--target-parameters", "experts.gate_proj"], 1, "names experts.gate_proj, which is no parameter of this model"),
    (["--target-parameters", "input_layernorm.weight"], 1, "a 1-D parameter"),
    (["--target-parameters", EXPERTS[0], "--dropout", "0.1"], 2, "with --dropout: PEFT"),
    (["--target-parameters", EXPERTS[0], "--dora"], 2, "with --dora"),
    (["--target-parameters", EXPERTS[0], "--lora-bias"], 2, "with --lora-bias"),
    (["--target-parameters", EXPERTS[0], "--init", "gaussian"], 2, "gaussian"),
    (["--target-parameters", EXPERTS[0], "--layers", "0"], 2, "with --layers: PEFT applies layers_to_transform to modules"),
    (["--target-parameters", "self_attn.q_proj.weight", "--targets", "q_proj"], 1, "targeted both by --targets and by --target-parameters"),
], ids=["unknown", "1-D", "dropout", "dora", "lora-bias", "init", "layers", "twice"])
def test_inject_refuses_naming_it(llama4, tmp_path, args, code, words):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", *args, llama4, "-o", out])
    assert_error(result, code, words, out)


def test_3d_parameters_of_a_model_type_of_unknown_layout_are_refused(llama4, tmp_path):
    """Whether experts are stored transposed (PEFT's other layout) is in modeling code, not in the checkpoint."""
    import shutil

    base = str(tmp_path / "other")
    shutil.copytree(llama4, base)
    config = json.load(open(os.path.join(base, "config.json")))
    json.dump({**config, "model_type": "gpt_oss"}, open(os.path.join(base, "config.json"), "w"))
    result = CliRunner().invoke(cli, ["inject", "lora", "--target-parameters", EXPERTS[0], base, "-o", str(tmp_path / "run")])
    assert_error(result, 1, "3-D parameter model.layers.0.feed_forward.experts.gate_up_proj of a gpt_oss model", str(tmp_path / "run"))


def test_a_tied_embedding_is_refused(tiny_llama_tied, tmp_path):
    """PEFT's wrapped embedding changes the input only, its merge the one tied tensor: no fold is right."""
    result = CliRunner().invoke(cli, ["inject", "lora", "--target-parameters", "embed_tokens.weight", tiny_llama_tied, "-o", str(tmp_path / "run")])
    assert_error(result, 1, "names model.embed_tokens.weight, which this model ties to its output head", str(tmp_path / "run"))


def test_conv1d_targets_beside_parameters_are_refused(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D targets make the config's fan_in_fan_out true, which PEFT's ParamWrapper refuses."""
    result = CliRunner().invoke(cli, ["inject", "lora", "--targets", "c_attn", "--target-parameters", "wpe.weight", tiny_gpt2, "-o", str(tmp_path / "run")])
    assert_error(result, 2, "beside the Conv1D target transformer.h.0.attn.c_attn", str(tmp_path / "run"))


def test_merge_refuses_an_adapter_in_another_layout(llama4, tmp_path):
    """lora_A/lora_B laid out for the other orientation of [E, d1, d2] would fold a wrong ΔW: refused."""
    run = str(tmp_path / "run")
    inject(llama4, "lora", LoraConfig(rank=2, target_parameters=EXPERTS[0]), run)
    tensors = _randomize(run, seed=3)
    key = "base_model.model.model.layers.0.feed_forward.experts.lora_A.weight"
    tensors[key] = torch.randn(8, 16)  # [r·E, d1] instead of [r·E, d2]
    save_file(tensors, os.path.join(run, ADAPTER), metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["merge", llama4, run, "-o", str(tmp_path / "m")])
    assert_error(result, 1, "do not fit r=2 on model.layers.0.feed_forward.experts.gate_up_proj", str(tmp_path / "m"))


def test_adapter_config_target_parameters_must_be_names(llama4, tmp_path):
    run = str(tmp_path / "run")
    inject(llama4, "lora", LoraConfig(rank=2, target_parameters=EXPERTS[0]), run)
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    json.dump({**config, "target_parameters": "feed_forward.experts.gate_up_proj"}, open(os.path.join(run, "adapter_config.json"), "w"))
    result = CliRunner().invoke(cli, ["merge", llama4, run, "-o", str(tmp_path / "m")])
    assert_error(result, 1, "'target_parameters' must be a list of parameter names", str(tmp_path / "m"))


def test_export_refuses_lora_on_parameters(llama4, tmp_path):
    run = str(tmp_path / "run")
    inject(llama4, "lora", LoraConfig(rank=2, target_parameters=EXPERTS[1]), run)
    result = CliRunner().invoke(cli, ["export", run, "-o", str(tmp_path / "out")])
    assert_error(result, 1, "puts LoRA on parameters (target_parameters), which peftcli does not export", str(tmp_path / "out"))
