"""LoRA / DoRA / rsLoRA: inject, attach, PEFT parity in both directions."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from tests.helpers import batch, output_tensor, randomize_

peft = pytest.importorskip("peft")

VARIANTS = {
    "lora": dict(rank=4),
    "dora": dict(rank=4, dora=True),
    "rslora": dict(rank=4, alpha=6.0, rslora=True),
    "gaussian-all-linear": dict(rank=2, init="gaussian", targets="all-linear"),
}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _forward(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trained_adapter_loads_in_peft_with_identical_outputs(base, variant, tmp_path):
    run = str(tmp_path / "run")
    budget = inject(base, "lora", LoraConfig(**VARIANTS[variant]), run, seed=3)
    adapted = load_adapted(base, run)
    assert adapted.num_trainable == budget.trainable
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == budget.trainable  # exactly φ requires grad

    inputs = batch()
    base_model = load_base_model(base)
    assert torch.allclose(_forward(adapted, inputs), _forward(base_model, inputs), atol=1e-6)  # ΔW = 0 at init

    randomize_(trainable)
    ours = _forward(adapted, inputs)
    assert not torch.allclose(ours, _forward(base_model, inputs), atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained")).eval()
    assert torch.allclose(ours, _forward(theirs, inputs), atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_adapter_written_by_peft_loads_in_peftcli(base, variant, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model_type = json.load(open(os.path.join(base, "config.json")))["model_type"]
    targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}[model_type]
    torch.manual_seed(0)
    cfg = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=variant == "dora",
        use_rslora=variant == "rslora", fan_in_fan_out=model_type == "gpt2",
    )  # rsLoRA: α/√r = 4, not α/r = 2, so reading use_rslora wrong would change the outputs
    peft_model = get_peft_model(load_base_model(base), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapted(base, str(tmp_path / "peft"))
    inputs = batch(1)
    assert torch.allclose(_forward(ours, inputs), _forward(peft_model, inputs), atol=1e-5)
    assert not torch.allclose(_forward(ours, inputs), _forward(load_base_model(base), inputs), atol=1e-4)


def test_delta_weight_matches_peft_merge_and_unload(tiny_llama, tmp_path):
    from peft import PeftModel

    run = str(tmp_path / "run")
    inject(tiny_llama, "lora", LoraConfig(rank=4, dora=True), run)
    adapted = load_adapted(tiny_llama, run)
    randomize_([p for p in adapted.parameters() if p.requires_grad])
    adapted.save(str(tmp_path / "t"))
    merged = PeftModel.from_pretrained(load_base_model(tiny_llama), str(tmp_path / "t")).merge_and_unload()
    base_sd = load_base_model(tiny_llama).state_dict()
    from peftcli.methods.lora.layer import LoraLinear

    checked = 0
    for name, module in adapted.model.named_modules():
        if isinstance(module, LoraLinear):
            expected = merged.state_dict()[name + ".weight"] - base_sd[name + ".weight"]
            assert torch.allclose(module.delta_weight(), expected, atol=1e-5), name
            checked += 1
    assert checked == 4


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_llama, tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "lora", LoraConfig(rank=4), run)
    with pytest.raises(BadInputError, match="no such module in the base"):
        attach_adapter(load_base_model(tiny_bert), run)
    cfg = json.load(open(os.path.join(run, "adapter_config.json")))
    cfg["r"] = 8
    with open(os.path.join(run, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(BadInputError, match="rank 4 in the tensors but r=8"):
        attach_adapter(load_base_model(tiny_llama), run)


def test_inject_cli_reports_and_writes(tiny_llama, tmp_path):
    out = str(tmp_path / "runs" / "lora") + "/"
    result = CliRunner().invoke(cli, ["inject", "lora", "--rank", "8", tiny_llama, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["budget"]["trainable_params"] == 2 * (8 * 128 + 8 * 96)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    inspect = json.loads(CliRunner().invoke(cli, ["inspect", out, "--json"]).stdout)
    assert inspect["format"] == "adapter" and inspect["num_params"] == doc["budget"]["trainable_params"]
    again = CliRunner().invoke(cli, ["inject", "lora", tiny_llama, "-o", out])
    assert again.exit_code == 2 and "already exists" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "--rank must be positive"),
        (["--rank", "100"], "larger than min(out, in)"),
        (["--targets", "nope"], "matches no linear module"),
        (["--init", "xavier"], "--init must be one of"),
        (["--targets", r".*\.nope"], "linear modules here: lm_head, mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj"),
        (["--targets", "nope"], "linear modules here: lm_head, mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj"),
        (["--targets", "lm_head", "--layers", "0"], "matches no linear module in --layers 0"),
    ],
)
def test_inject_errors_write_nothing(tiny_llama, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "lora", *args, tiny_llama, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_inject_reads_no_tensor_and_dora_only_its_targets(tiny_llama, tmp_path, monkeypatch):
    from peftcli.checkpoint.reader import Checkpoint

    read = []
    real_get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: read.append(name) or real_get(self, name))
    inject(tiny_llama, "lora", LoraConfig(rank=4, targets="all-linear"), str(tmp_path / "a"))
    assert read == []
    inject(tiny_llama, "lora", LoraConfig(rank=4, dora=True), str(tmp_path / "b"))
    assert sorted(read) == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj"))


def test_dora_magnitude_is_the_row_norm_of_the_base_weight(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file

    inject(tiny_gpt2, "lora", LoraConfig(rank=2, dora=True), str(tmp_path / "d"))
    phi = load_file(str(tmp_path / "d" / "adapter_model.safetensors"))
    base = load_file(os.path.join(tiny_gpt2, "model.safetensors"))
    w = base["transformer.h.0.attn.c_attn.weight"].T  # Conv1D stores [in, out]
    assert torch.allclose(phi["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"], w.norm(dim=1))


def test_unmatched_target_hint_lists_each_block_module_once_and_is_capped():
    from peftcli.errors import UsageError
    from peftcli.targets import resolve_targets

    shapes = {f"blocks.{i}.part{j}.weight": (4, 4) for i in range(3) for j in range(30)}
    with pytest.raises(UsageError) as err:
        resolve_targets(shapes, None, "nope", None)
    listed = err.value.hint.removeprefix("linear modules here: ").split(", ")
    assert len(listed) == 24 and listed[0] == "part0" and listed[-1].endswith("(and 6 more)")
    assert len(set(listed)) == 24


@pytest.mark.parametrize("model_type", ["openai-gpt", "imagegpt", "decision_transformer"])
def test_conv1d_families_other_than_gpt2_are_transposed(tiny_gpt2, model_type, tmp_path):
    """GPT-2's tensors under another Conv1D model_type: [in, out] storage is still read as [out, in]."""
    from safetensors.torch import load_file

    relabelled = tmp_path / model_type
    relabelled.mkdir()
    for name in os.listdir(tiny_gpt2):
        if name != "config.json":
            os.link(os.path.join(tiny_gpt2, name), relabelled / name)
    config = json.load(open(os.path.join(tiny_gpt2, "config.json")))
    json.dump({**config, "model_type": model_type}, open(relabelled / "config.json", "w"))
    run = str(tmp_path / "run")
    budget = inject(str(relabelled), "lora", LoraConfig(rank=2), run)
    stored = load_file(os.path.join(tiny_gpt2, "model.safetensors"))["transformer.h.0.attn.c_attn.weight"]
    d_in, d_out = stored.shape  # Conv1D: [in, out] = [64, 192]
    phi = load_file(os.path.join(run, "adapter_model.safetensors"))
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    assert phi[prefix + ".lora_A.weight"].shape == (2, d_in) and phi[prefix + ".lora_B.weight"].shape == (d_out, 2)
    assert json.load(open(os.path.join(run, "adapter_config.json")))["fan_in_fan_out"] is True
    assert budget.trainable == 2 * 2 * (d_in + d_out)
    adapted = load_adapted(str(relabelled), run)  # transformers builds GPT2LMHeadModel (Conv1D) from `architectures`
    assert adapted.num_trainable == budget.trainable


def test_every_error_in_the_method_and_target_modules_carries_a_hint():
    """`raise UsageError(msg)` without a hint leaves the user with no next step (the CLI contract)."""
    import ast

    import peftcli

    root = os.path.dirname(peftcli.__file__)
    files = ["targets.py"] + [f"methods/{m}.py" for m in ("layers", "ia3/method", "ia3/layer", "adapter/method", "adapter/layer", "lora/method", "lora/layer")]
    errors = {"PeftcliError", "BadInputError", "UsageError", "ResourceError", "Interrupted"}
    bare = []
    for rel in files:
        tree = ast.parse(open(os.path.join(root, rel)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in errors:
                if len(node.args) < 2 and not any(k.arg == "hint" for k in node.keywords):
                    bare.append(f"{rel}:{node.lineno}")
    assert bare == []
