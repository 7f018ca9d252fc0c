"""Prefix tuning: inject, attach, PEFT parity in both directions (GQA included), the projection MLP."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.inject import inject
from peftcli.methods.prefix import PrefixTuningConfig
from tests.helpers import batch, output_tensor, randomize_

peft = pytest.importorskip("peft")
# PEFT 0.21 still hands the prefix over as past_key_values, which transformers 5 renamed to cache.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
VARIANTS = {"plain": None, "projection": 8}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _config(path: str) -> dict:
    return json.load(open(os.path.join(path, "config.json")))


def _kv_dim_and_layers(path: str) -> tuple[int, int]:
    """From the Hugging Face config, independently of peftcli: key/value width per layer, layers."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return kv_heads * head_dim, c.num_hidden_layers


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _peft_model(path: str, n: int, projection: int | None):
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig
    from peft import get_peft_model

    cfg = PeftPrefixTuningConfig(
        task_type=TASK[_config(path)["model_type"]], num_virtual_tokens=n,
        prefix_projection=projection is not None, encoder_hidden_size=projection,
    )
    return get_peft_model(load_base_model(path), cfg).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trained_adapter_loads_in_peft_with_identical_outputs(base, variant, tmp_path):
    run = str(tmp_path / "run")
    budget = inject(base, "prefix", PrefixTuningConfig(virtual_tokens=5, projection=VARIANTS[variant]), run, seed=3)
    adapted = load_adapted(base, run)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == budget.trainable == adapted.num_trainable

    inputs = batch()
    base_out = output_tensor(_forward(load_base_model(base), inputs))
    randomize_(trainable)
    ours = output_tensor(_forward(adapted, inputs))
    assert ours.shape == base_out.shape and not torch.allclose(ours, base_out, atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained")).eval()
    assert torch.allclose(ours, output_tensor(_forward(theirs, inputs)), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_written_by_peft_loads_in_peftcli(base, variant, tmp_path):
    peft_model = _peft_model(base, 6, VARIANTS[variant])
    randomize_([p for p in peft_model.parameters() if p.requires_grad], scale=0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))  # with projection: the MLP's output only
    ours = load_adapted(base, str(tmp_path / "peft"))
    inputs = batch(1)
    assert torch.allclose(output_tensor(_forward(ours, inputs)), output_tensor(_forward(peft_model, inputs)), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_config_and_budget_are_peft_s(base, variant, tmp_path):
    projection = VARIANTS[variant]
    budget = inject(base, "prefix", PrefixTuningConfig(virtual_tokens=4, projection=projection), str(tmp_path / "ours"))
    peft_model = _peft_model(base, 4, projection)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    theirs = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    theirs.pop("peft_version")
    assert ours.pop("inference_mode") is False and theirs.pop("inference_mode") is True  # PEFT saves for inference
    assert os.path.samefile(ours.pop("base_model_name_or_path"), theirs.pop("base_model_name_or_path"))
    assert ours == theirs

    kv_dim, layers = _kv_dim_and_layers(base)
    assert ours["token_dim"] == kv_dim  # GQA: the key/value width (32 on the tiny Llama), not the hidden size
    prefix = 4 * layers * 2 * kv_dim
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    # PEFT counts what trains: the prefix, or with a projection the MLP only. So do we.
    assert budget.trainable == peft_trainable
    if projection is None:
        assert peft_trainable == prefix


def test_projection_trains_the_mlp_and_saves_its_output(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=3, projection=16), run)
    adapted = load_adapted(tiny_llama, run)
    phi = adapted.phi_parameters()
    assert "prompt_embeddings" not in phi  # derived from the MLP: never trained directly
    assert adapted.num_trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    before = {k: p.detach().clone() for k, p in phi.items()}
    opt = torch.optim.Adam(phi.values(), lr=1e-2)
    adapted.train()
    output_tensor(adapted(**batch())).pow(2).mean().backward()
    opt.step()
    adapted.eval()
    changed = {k for k in phi if not torch.equal(before[k], phi[k])}
    assert changed == set(phi)

    trained = output_tensor(_forward(adapted, batch()))
    adapted.save(str(tmp_path / "trained"))
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(tiny_llama), str(tmp_path / "trained")).eval()
    assert torch.allclose(output_tensor(_forward(theirs, batch())), trained, atol=1e-5)
    again = load_adapted(tiny_llama, str(tmp_path / "trained"))
    assert again.num_trainable == adapted.num_trainable  # the MLP is back, training can resume
    assert torch.allclose(output_tensor(_forward(again, batch())), trained, atol=1e-6)


def test_forward_arguments_match_peft(tiny_llama, tiny_gpt2, tmp_path):
    """Labels are untouched (same loss as PEFT); position ids are shifted past the prefix, as PEFT."""
    for path in (tiny_llama, tiny_gpt2):
        peft_model = _peft_model(path, 4, None)
        randomize_([p for p in peft_model.parameters() if p.requires_grad], scale=0.5)
        out = str(tmp_path / os.path.basename(path))
        peft_model.save_pretrained(out)
        ours = load_adapted(path, out)
        inputs = batch()
        labels = {**inputs, "labels": inputs["input_ids"].clone()}
        assert torch.allclose(_forward(ours, labels).loss, _forward(peft_model, labels).loss, atol=1e-6)
        positions = {**inputs, "position_ids": torch.arange(7).expand(2, 7)}
        got = output_tensor(_forward(ours, positions))
        assert torch.allclose(got, output_tensor(_forward(peft_model, positions)), atol=1e-5)
        assert torch.allclose(got, output_tensor(_forward(ours, inputs)), atol=1e-5)  # what the default gives


def test_inject_cli_with_projection(tiny_llama, tmp_path):
    out = str(tmp_path / "prefix")
    args = ["inject", "prefix", "--virtual-tokens", "20", "--projection", "32", tiny_llama, "-o", out, "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    kv, layers = _kv_dim_and_layers(tiny_llama)
    out_dim = layers * 2 * kv
    mlp = 20 * kv + (kv * 32 + 32) + (32 * out_dim + out_dim)
    assert json.loads(result.stdout)["budget"]["trainable_params"] == mlp  # the prefix is the MLP's output
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["prefix_projection"] is True and config["encoder_hidden_size"] == 32


def test_inspect_budget_cli(tiny_llama):
    result = CliRunner().invoke(cli, ["inspect", tiny_llama, "--budget", "prefix", "--virtual-tokens", "10", "--json"])
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    kv, layers = _kv_dim_and_layers(tiny_llama)
    assert budget["trainable_params"] == 10 * layers * 2 * kv
    assert [t["module"] for t in budget["targets"]] == [f"model.layers.{i}.self_attn" for i in range(layers)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--virtual-tokens", "-1"], "--virtual-tokens must be positive"),
        (["--virtual-tokens", "64"], "leaves no position for the input"),
        (["--projection", "0"], "--projection must be positive"),
    ],
)
def test_inject_errors_write_nothing(tiny_gpt2, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "prefix", *args, tiny_gpt2, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_llama, tiny_gpt2, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=4), run)
    with pytest.raises(BadInputError, match=r"2 problem\(s\).*token_dim.*prompt_embeddings is \[4, 128\], not \[4, 256\]"):
        attach_adapter(load_base_model(tiny_gpt2), run)


def test_inconsistent_projection_adapters_are_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=4, projection=8), run)
    weights = os.path.join(run, "adapter_model.safetensors")
    tensors = load_file(weights)
    save_file({**tensors, "prompt_embeddings": tensors["prompt_embeddings"] + 1}, weights)
    with pytest.raises(BadInputError, match="not the output of the prefix_encoder MLP"):
        attach_adapter(load_base_model(tiny_llama), run)
    save_file(tensors, weights)
    cfg_path = os.path.join(run, "adapter_config.json")
    json.dump({**json.load(open(cfg_path)), "prefix_projection": False}, open(cfg_path, "w"))
    with pytest.raises(BadInputError, match="its config has no prefix_projection"):
        attach_adapter(load_base_model(tiny_llama), run)


def test_forward_with_a_cache_is_refused(tiny_gpt2, tmp_path):
    inject(tiny_gpt2, "prefix", PrefixTuningConfig(virtual_tokens=2), str(tmp_path / "run"))
    ours = load_adapted(tiny_gpt2, str(tmp_path / "run"))
    from transformers import DynamicCache

    with pytest.raises(UsageError, match="incremental decoding"):
        ours(**batch(), cache=DynamicCache())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_classification_head_sees_the_prefix(arch, tiny_bert, tiny_llama, tmp_path):
    """PEFT 0.21 refuses prefix tuning under a classification head on transformers 5; we pass the
    cache to the backbone (BERT's head forward takes none: through a hook). Reference: the same
    adapter on the bare backbone (PEFT-checked above), then the head by hand."""
    import transformers

    path = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    run = str(tmp_path / "run")
    inject(path, "prefix", PrefixTuningConfig(virtual_tokens=4), run, seed=2)
    torch.manual_seed(0)
    head_model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    ours = attach_adapter(head_model, run)
    backbone = attach_adapter(transformers.AutoModel.from_pretrained(path).eval(), run)
    inputs = batch()
    got = _forward(ours, inputs).logits
    hidden = _forward(backbone, inputs)
    with torch.no_grad():
        if arch == "bert":
            want = head_model.classifier(hidden.pooler_output)
        else:  # the last position holds no padding here (left padding)
            want = head_model.score(hidden.last_hidden_state[:, -1])
    assert torch.allclose(got, want, atol=1e-5)
    plain = _forward(head_model, inputs).logits  # outside the adapted forward the hook adds nothing
    assert not torch.allclose(plain, got, atol=1e-4)
