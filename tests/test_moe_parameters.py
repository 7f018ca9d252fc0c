"""LoRA on fused MoE expert parameters (PEFT's target_parameters) of models whose checkpoints store
experts one by one and transformers fuses on load (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): peftcli's
injected adapters load in PEFT with peftcli's outputs, PEFT's adapters merge into the per-expert
tensors as merge_and_unload folds them (transformers loading the merged directory), train changes
them, and what peftcli does not know is refused by name.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.attach import load_adapted
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.tiny import VOCAB, word_tokenizer
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import assert_error, batch, lm_rows

peft = pytest.importorskip("peft")
if tuple(int(x) for x in peft.__version__.split(".")[:2]) < (0, 17):
    pytest.skip(f"PEFT {peft.__version__} has no target_parameters (added in 0.17)", allow_module_level=True)

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ADAPTER = "adapter_model.safetensors"
TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _build(model_type: str, out: str) -> None:
    """A seeded tiny MoE causal LM: 2 layers, hidden 32, 4 experts of intermediate 16."""
    import transformers as tf

    common = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3, tie_word_embeddings=False)
    made = {
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **common)),
        "qwen2_moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16,
                                                                      shared_expert_intermediate_size=16, **common)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, **common)),
        "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(num_experts=4, **common)),
    }
    torch.manual_seed(0)
    model = made[model_type]()
    with torch.no_grad():  # distinct experts, so a ΔW put on the wrong expert or rows shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2) if p.dim() == 3 else None
    model.eval().save_pretrained(out)
    word_tokenizer().save_pretrained(out)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    made: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in made:
            made[model_type] = str(tmp_path_factory.mktemp("moe") / model_type)
            _build(model_type, made[model_type])
        return made[model_type]

    return get


def _causal_lm(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _randomize(path: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in load_file(os.path.join(path, ADAPTER)).items()}
    save_file(tensors, os.path.join(path, ADAPTER), metadata={"format": "pt"})
    return tensors


def test_mixtral_checkpoint_stores_experts_one_by_one(moe):
    """The premise: transformers saves Mixtral's experts per expert under block_sparse_moe, and fuses them on load."""
    stored = load_file(os.path.join(moe("mixtral"), "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in stored
    assert not any(k.endswith("gate_up_proj") for k in stored)
    loaded = dict(_causal_lm(moe("mixtral")).named_parameters())
    assert tuple(loaded["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 32, 32)
    # gate (w1) rows before up (w3): the split merge relies on
    assert torch.equal(loaded["model.layers.0.mlp.experts.gate_up_proj"][3, :16], stored["model.layers.0.block_sparse_moe.experts.3.w1.weight"])
    assert torch.equal(loaded["model.layers.0.mlp.experts.gate_up_proj"][3, 16:], stored["model.layers.0.block_sparse_moe.experts.3.w3.weight"])


@pytest.mark.parametrize("model_type", TYPES)
def test_injected_adapter_loads_in_peft_with_our_logits(moe, tmp_path, model_type):
    from peft import PeftModel

    base, run = moe(model_type), str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", "-r", "2", "--alpha", "6", "--target-parameters", ",".join(EXPERTS), base, "-o", run])
    assert result.exit_code == 0, result.output
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in EXPERTS)
    saved = _randomize(run, seed=7)
    assert tuple(saved["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape) == (8, 32)  # gate_up_proj, innermost
    assert tuple(saved["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape) == (32, 8)  # down_proj [E, 32, 16]
    inputs = batch(vocab=len(VOCAB))
    with torch.no_grad():
        ours = load_adapted(base, run)(**inputs).logits
        theirs = PeftModel.from_pretrained(_causal_lm(base), run).eval()(**inputs).logits
        plain = _causal_lm(base)(**inputs).logits
    assert not torch.allclose(theirs, plain, atol=1e-3)  # the adapter changes the outputs
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type, params, modules", [
    ("mixtral", EXPERTS, []),
    ("mixtral", ["experts.down_proj", "mlp.gate.weight"], []),  # the router, stored as block_sparse_moe.gate.weight
    ("qwen2_moe", EXPERTS, ["q_proj"]),  # beside LoRA on modules
    ("olmoe", ["experts.gate_up_proj"], []),
], ids=["mixtral", "mixtral-router", "qwen2_moe-mixed", "olmoe"])
def test_peft_adapter_merges_into_the_per_expert_tensors(moe, tmp_path, model_type, params, modules):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    base = moe(model_type)
    pm = get_peft_model(_causal_lm(base), PeftLoraConfig(r=2, lora_alpha=6, target_modules=modules, target_parameters=params)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    inputs = batch(vocab=len(VOCAB))
    with torch.no_grad():
        want_logits = pm(**inputs).logits
    merged_model = pm.merge_and_unload()
    theirs = merged_model.state_dict()
    result = CliRunner().invoke(cli, ["merge", base, str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    ours, stored = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(os.path.join(base, "model.safetensors"))
    assert set(ours) == set(stored)  # the on-disk, per-expert layout
    assert [k for k in ours if not torch.equal(ours[k], stored[k])]
    loaded = dict(_causal_lm(str(tmp_path / "merged")).state_dict())
    assert set(loaded) == set(theirs)
    for k in loaded:
        assert torch.allclose(loaded[k], theirs[k], atol=1e-5, rtol=0), k
    with torch.no_grad():
        assert torch.allclose(_causal_lm(str(tmp_path / "merged"))(**inputs).logits, want_logits, atol=1e-5, rtol=0)
        assert torch.allclose(merged_model(**inputs).logits, want_logits, atol=1e-5, rtol=0)


def test_train_changes_the_expert_lora(moe, tmp_path):
    run = str(tmp_path / "run")
    inject(moe("mixtral"), "lora", LoraConfig(rank=2, target_parameters=",".join(EXPERTS)), run)
    before = load_file(os.path.join(run, ADAPTER))
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    train(run, TrainConfig(data=str(data), steps=3, batch_size=4, lr=1e-2, schedule="constant"))
    after = load_file(os.path.join(run, ADAPTER))
    assert set(after) == set(before) and len(after) == 8
    for k in after:
        assert not torch.equal(after[k], before[k]), k  # A and B of every expert tensor trained
    assert all(float(after[k].abs().max()) > 0 for k in after if "lora_B" in k)


@pytest.mark.parametrize("args, words", [
    (["--target-parameters", "experts.gate_proj"], "names experts.gate_proj, which is no parameter of this model"),
    # the on-disk per-expert tensors are no parameter of transformers' loaded model
    (["--target-parameters", "experts.0.w1.weight"], "names experts.0.w1.weight, which is no parameter of this model"),
    (["--target-parameters", "block_sparse_moe.gate.weight"], "names block_sparse_moe.gate.weight, which is no parameter"),
    # the router: block_sparse_moe.gate on disk, mlp.gate once loaded; PEFT refuses a module targeted both ways
    (["-r", "2", "--targets", "gate", "--target-parameters", "mlp.gate.weight"], "model.layers.0.mlp.gate is targeted both by --targets and by --target-parameters"),
], ids=["unknown", "per-expert", "on-disk-name", "twice"])
def test_inject_refuses_names_of_no_loaded_parameter(moe, tmp_path, args, words):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", *args, moe("mixtral"), "-o", out])
    assert_error(result, 1, words, out)


def _copy_with(base: str, dst: str, config: dict | None = None, tensors=None) -> str:
    shutil.copytree(base, dst)
    if config is not None:
        old = json.load(open(os.path.join(dst, "config.json")))
        json.dump({**old, **config}, open(os.path.join(dst, "config.json"), "w"))
    if tensors is not None:
        stored = load_file(os.path.join(dst, "model.safetensors"))
        save_file(tensors(stored), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_model_type_without_a_declared_mapping_is_refused(moe, tmp_path):
    """Another MoE type with the same per-expert names: its fusing is not declared, so no fused parameter."""
    base = _copy_with(moe("qwen2_moe"), str(tmp_path / "other"), {"model_type": "dbrx_like"})
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", "--target-parameters", EXPERTS[0], base, "-o", out])
    assert_error(result, 1, "stores its experts one by one and peftcli does not know how transformers fuses them for dbrx_like", out)


def test_fused_experts_stored_as_such_are_refused(moe, tmp_path):
    def fuse(stored):
        out = {k: v for k, v in stored.items() if ".experts." not in k}
        for i in (0, 1):
            p = f"model.layers.{i}.mlp.experts"
            out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([stored[f"{p}.{e}.gate_proj.weight"], stored[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
            out[f"{p}.down_proj"] = torch.stack([stored[f"{p}.{e}.down_proj.weight"] for e in range(4)])
        return out

    base = _copy_with(moe("qwen2_moe"), str(tmp_path / "fused"), tensors=fuse)
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", "--target-parameters", EXPERTS[1], base, "-o", out])
    assert_error(result, 1, "a fused expert tensor stored as such in a qwen2_moe checkpoint", out)


def test_incomplete_experts_are_refused(moe, tmp_path):
    base = _copy_with(moe("mixtral"), str(tmp_path / "partial"),
                      tensors=lambda s: {k: v for k, v in s.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"})
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", "--target-parameters", EXPERTS[0], base, "-o", out])
    assert_error(result, 1, "model.layers.1.block_sparse_moe.experts: the per-expert tensors of this mixtral checkpoint", out)


@pytest.mark.parametrize("model_type, args, module", [
    ("mixtral", ["lora", "--targets", "w1,w2"], "block_sparse_moe.experts.0.w1"),
    ("mixtral", ["ia3"], "block_sparse_moe.experts.0.w2"),  # PEFT's IA³ defaults for mixtral name w2
    ("mixtral", ["layers", "--layers", "1"], "block_sparse_moe."),  # every tensor of the layer, the router renamed on load
    ("qwen2_moe", ["lora", "--targets", "gate_proj"], "mlp.experts.0.gate_proj"),
])
def test_inject_refuses_per_expert_modules_transformers_fuses_on_load(moe, tmp_path, model_type, args, module):
    """An adapter keyed by one expert's on-disk module names nothing the loaded model has (before
    this check, inject wrote it and `train`/PEFT refused it later)."""
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["inject", *args, moe(model_type), "-o", str(out), "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and module in lines[0] and ("target-parameters" in lines[0] or "target_parameters" in lines[0])
    assert not out.exists()


def test_inject_of_attention_only_on_a_moe_model_is_unaffected(moe, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["inject", "lora", moe("mixtral"), "--targets", "q_proj,v_proj", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / ADAPTER).is_file()
