"""IA³: inject, attach, PEFT parity in both directions, budgets, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from peftcli.artifacts.adapter_dir import read_adapter
from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods.ia3 import IA3Config
from peftcli.methods.ia3.layer import IA3Linear
from tests.helpers import batch, output_tensor, randomize_

peft = pytest.importorskip("peft")

VARIANTS = ("default", "qv-layer1-no-feedforward", "all-linear")
QV = {"llama": "q_proj,v_proj", "bert": "query,value", "gpt2": "c_attn"}
FFN_OUT = {"llama": "down_proj", "bert": "output.dense", "gpt2": "mlp.c_proj"}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _forward(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _model_type(base):
    return json.load(open(os.path.join(base, "config.json")))["model_type"]


def _variant(base, name):
    model_type = _model_type(base)
    if name == "qv-layer1-no-feedforward":
        return IA3Config(targets=QV[model_type], feedforward="", layers="1")
    if name == "all-linear":
        return IA3Config(targets="all-linear", feedforward=FFN_OUT[model_type])
    return IA3Config()


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_adapter_loads_in_peft_with_identical_outputs(base, variant, tmp_path):
    run = str(tmp_path / "run")
    budget = inject(base, "ia3", _variant(base, variant), run, seed=3)
    adapted = load_adapted(base, run)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == budget.trainable == adapted.num_trainable

    inputs = batch()
    base_model = load_base_model(base)
    assert torch.allclose(_forward(adapted, inputs), _forward(base_model, inputs), atol=1e-6)  # l = 1 at init

    randomize_(trainable, scale=0.3)
    ours = _forward(adapted, inputs)
    assert not torch.allclose(ours, _forward(base_model, inputs), atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained")).eval()
    assert torch.allclose(ours, _forward(theirs, inputs), atol=1e-5)


def _peft_ia3(base, tmp_path, **kwargs):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    torch.manual_seed(0)
    # init_ia3_weights=False: random vectors, so parity is not vacuous.
    cfg = PeftIA3Config(init_ia3_weights=False, fan_in_fan_out=_model_type(base) == "gpt2", **kwargs)
    peft_model = get_peft_model(load_base_model(base), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    return peft_model, str(tmp_path / "peft")


def test_adapter_written_by_peft_loads_in_peftcli(base, tmp_path):
    peft_model, path = _peft_ia3(base, tmp_path)
    ours = load_adapted(base, path)
    inputs = batch(1)
    assert torch.allclose(_forward(ours, inputs), _forward(peft_model, inputs), atol=1e-5)
    assert not torch.allclose(_forward(ours, inputs), _forward(load_base_model(base), inputs), atol=1e-4)


def test_peft_regex_config_loads_in_peftcli(tiny_llama, tmp_path):
    peft_model, path = _peft_ia3(
        tiny_llama, tmp_path, target_modules=r".*\.(k_proj|up_proj)", feedforward_modules=r".*up_proj"
    )
    ours = load_adapted(tiny_llama, path)
    inputs = batch(2)
    assert torch.allclose(_forward(ours, inputs), _forward(peft_model, inputs), atol=1e-5)


def test_default_targets_and_shapes_are_peft_defaults(base, tmp_path):
    """Our default selection, feedforward split and φ shapes are exactly what PEFT's defaults give."""
    _, path = _peft_ia3(base, tmp_path)
    theirs = {k: tuple(t.shape) for k, t in read_adapter(path).tensors.items()}
    budget = inject(base, "ia3", IA3Config(), str(tmp_path / "ours"))
    ours = {k: tuple(t.shape) for k, t in read_adapter(str(tmp_path / "ours")).tensors.items()}
    assert ours == theirs
    assert budget.trainable == sum(a * b for a, b in theirs.values())


def _relabelled(base: str, out, model_type: str, rename=None) -> str:
    """A copy of checkpoint ``base`` whose config.json says ``model_type`` (tensors renamed by ``rename``)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    config = json.load(open(os.path.join(base, "config.json")))
    json.dump({**config, "model_type": model_type}, open(out / "config.json", "w"))
    tensors = load_file(os.path.join(base, "model.safetensors"))
    save_file({(rename(k) if rename else k): t for k, t in tensors.items()}, str(out / "model.safetensors"))
    return str(out)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_unknown_model_type_gets_its_family_defaults_by_module_names(arch, tiny_llama, tiny_bert, tmp_path):
    """A fine-tune relabelled `foo` selects what its real model_type selects (itself PEFT's defaults)."""
    real = {"llama": tiny_llama, "bert": tiny_bert}[arch]
    foo = _relabelled(real, tmp_path / "foo", "foo")
    budget = inject(foo, "ia3", IA3Config(), str(tmp_path / "ours"))
    reference = inject(real, "ia3", IA3Config(), str(tmp_path / "real"))
    ours, theirs = read_adapter(str(tmp_path / "ours")), read_adapter(str(tmp_path / "real"))
    assert {k: t.shape for k, t in ours.tensors.items()} == {k: t.shape for k, t in theirs.tensors.items()}
    for key in ("target_modules", "feedforward_modules"):
        assert ours.config[key] == theirs.config[key] and ours.config[key]
    assert budget.trainable == reference.trainable


def test_unrecognised_modules_are_an_error_listing_the_linear_modules(tiny_llama, tmp_path):
    renames = {"self_attn": "attn", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "down_proj": "w2"}

    def rename(key):
        for old, new in renames.items():
            key = key.replace(old, new)
        return key

    foo = _relabelled(tiny_llama, tmp_path / "foo", "foo", rename)
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "ia3", foo, "-o", out])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no default IA³ targets for model_type 'foo'" in result.stderr
    assert "linear modules here: attn.wk, attn.wo, attn.wq, attn.wv, lm_head, mlp.gate_proj, mlp.up_proj, mlp.w2" in result.stderr
    assert not os.path.exists(out)
    # Given --targets, the feedforward split still needs a family or --feedforward.
    result = CliRunner().invoke(cli, ["inject", "ia3", "--targets", "wk,wv", foo, "-o", out])
    assert result.exit_code == 2 and "pass --feedforward NAMES" in result.stderr and "attn.wk" in result.stderr
    result = CliRunner().invoke(cli, ["inject", "ia3", "--targets", "wk,wv,w2", "--feedforward", "w2", foo, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["budget"]["trainable_params"] == 2 * (32 + 32 + 128)  # k, v outputs; w2 inputs


def test_bert_attention_output_dense_is_feedforward_as_in_peft(tiny_bert, tmp_path):
    inject(tiny_bert, "ia3", IA3Config(), str(tmp_path / "run"))
    cfg = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert "encoder.layer.0.attention.output.dense" in cfg["feedforward_modules"]
    assert "encoder.layer.0.output.dense" in cfg["feedforward_modules"]
    assert "encoder.layer.0.attention.self.key" in cfg["target_modules"]
    assert "encoder.layer.0.attention.self.key" not in cfg["feedforward_modules"]
    assert cfg["peft_type"] == "IA3" and cfg["task_type"] is None and cfg["fan_in_fan_out"] is False


def test_layer_scales_output_with_bias_or_input_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    x = torch.randn(2, 5)
    out_scaled = IA3Linear(linear, feedforward=False)
    out_scaled.load_phi(torch.randn(3, 1))
    expected = (x @ linear.weight.T + linear.bias) * out_scaled.ia3_l.detach().view(1, 3)
    assert torch.allclose(out_scaled(x), expected, atol=1e-6)
    in_scaled = IA3Linear(linear, feedforward=True)
    in_scaled.load_phi(torch.randn(1, 5))
    expected = (x * in_scaled.ia3_l.detach()) @ linear.weight.T + linear.bias
    assert torch.allclose(in_scaled(x), expected, atol=1e-6)


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_llama, tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "ia3", IA3Config(), run)
    with pytest.raises(BadInputError, match="no such module in the base"):
        attach_adapter(load_base_model(tiny_bert), run)
    cfg = json.load(open(os.path.join(run, "adapter_config.json")))
    cfg["feedforward_modules"] = []  # down_proj's [1, in] vector no longer fits
    with open(os.path.join(run, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(BadInputError, match=r"2 problem\(s\).*down_proj: ia3_l \[1, 128\] does not fit"):
        attach_adapter(load_base_model(tiny_llama), run)


def test_feedforward_must_be_among_the_targets(tiny_llama):
    from peftcli.methods import get_method
    from peftcli.checkpoint.reader import open_checkpoint

    with open_checkpoint(tiny_llama) as ckpt:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        with pytest.raises(UsageError, match="`feedforward` up_proj matches none of the targets"):
            get_method("ia3").budget(shapes, ckpt.config, IA3Config(feedforward="up_proj"))


def test_inject_cli_and_inspect_budget_agree(tiny_gpt2, tmp_path):
    out = str(tmp_path / "ia3")
    result = CliRunner().invoke(cli, ["inject", "ia3", tiny_gpt2, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    # c_attn: 3·64 outputs per layer; mlp.c_proj (feedforward): 4·64 inputs per layer; 2 layers.
    assert doc["budget"]["trainable_params"] == 2 * (3 * 64 + 4 * 64)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["fan_in_fan_out"] is True and cfg["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    inspect = json.loads(CliRunner().invoke(cli, ["inspect", tiny_gpt2, "--budget", "ia3", "--json"]).stdout)
    assert inspect["budget"] == doc["budget"]
    adapter = json.loads(CliRunner().invoke(cli, ["inspect", out, "--json"]).stdout)
    assert adapter["num_params"] == doc["budget"]["trainable_params"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--targets", "nope"], "matches no linear module"),
        (["--feedforward", "up_proj"], "matches none of the targets"),
        (["--feedforward", "("], "invalid --feedforward regex"),
        (["--layers", "7"], "does not have"),
    ],
)
def test_inject_errors_write_nothing(tiny_llama, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "ia3", *args, tiny_llama, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []
