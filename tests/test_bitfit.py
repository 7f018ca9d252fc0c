"""BitFit: selection against an independent reading of the checkpoint, Δb against a hand-incremented base."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from peftcli.artifacts.adapter_dir import read_adapter, write_adapter
from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods.bitfit import BitFitConfig
from tests.helpers import batch, output_tensor, randomize_


@pytest.fixture(params=["bert", "gpt2"])
def base(request, tiny_bert, tiny_gpt2):
    return {"bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _file_tensors(base) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _forward(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _with_biases_added(base, deltas):
    """The base model with Δb added to its biases by hand."""
    model = load_base_model(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d)
    return model


def test_default_trains_every_bias_of_the_checkpoint(base, tmp_path):
    expected = {k: t.shape for k, t in _file_tensors(base).items() if k.endswith(".bias") and t.dim() == 1}
    budget = inject(base, "bitfit", BitFitConfig(), str(tmp_path / "run"))
    adapter = read_adapter(str(tmp_path / "run"))
    assert {k: t.shape for k, t in adapter.tensors.items()} == expected
    assert all(torch.count_nonzero(t) == 0 for t in adapter.tensors.values())  # Δb = 0 at init
    assert budget.trainable == sum(s.numel() for s in expected.values())
    assert adapter.config == {
        "peft_type": "PEFTCLI",
        "peftcli": {"method": "bitfit", "biases": "all", "layers": None},
        "base_model_name_or_path": os.path.abspath(base),
    }


def test_delta_gives_the_base_with_incremented_biases(base, tmp_path):
    inject(base, "bitfit", BitFitConfig(), str(tmp_path / "run"))
    adapter = read_adapter(str(tmp_path / "run"))
    g = torch.Generator().manual_seed(5)
    deltas = {k: torch.randn(t.shape, generator=g) * 0.5 for k, t in adapter.tensors.items()}
    write_adapter(str(tmp_path / "set"), adapter.config, deltas)

    adapted = load_adapted(base, str(tmp_path / "set"))
    assert adapted.num_trainable == sum(d.numel() for d in deltas.values())
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == adapted.num_trainable
    inputs = batch()
    ours = _forward(adapted, inputs)
    assert torch.allclose(ours, _forward(_with_biases_added(base, deltas), inputs), atol=1e-5)
    assert not torch.allclose(ours, _forward(load_base_model(base), inputs), atol=1e-3)
    exported = adapted.phi_state_dict()
    assert exported.keys() == deltas.keys()
    assert all(torch.allclose(exported[k], deltas[k], atol=1e-6) for k in deltas)


def test_training_exports_b_minus_b0(tiny_bert, tmp_path):
    inject(tiny_bert, "bitfit", BitFitConfig(biases="query,value"), str(tmp_path / "run"))
    adapted = load_adapted(tiny_bert, str(tmp_path / "run"))
    randomize_(adapted.phi_parameters().values())
    adapted.save(str(tmp_path / "trained"))
    saved = read_adapter(str(tmp_path / "trained")).tensors
    trained = dict(adapted.model.named_parameters())
    b0 = _file_tensors(tiny_bert)
    assert saved.keys() == adapted.phi_parameters().keys()
    for k, delta in saved.items():
        assert torch.allclose(delta, trained[k].detach() - b0[k], atol=1e-6)
        assert torch.count_nonzero(delta) > 0


@pytest.mark.parametrize(
    "arch, biases, layers, expected",
    [
        ("bert", "query,norm", None, ["encoder.layer.{i}.attention.self.query.bias", "encoder.layer.{i}.attention.output.LayerNorm.bias", "encoder.layer.{i}.output.LayerNorm.bias", "embeddings.LayerNorm.bias"]),
        ("bert", "attn-out,mlp-out", None, ["encoder.layer.{i}.attention.output.dense.bias", "encoder.layer.{i}.output.dense.bias"]),
        ("bert", "mlp-in,key", "1", ["encoder.layer.1.intermediate.dense.bias", "encoder.layer.1.attention.self.key.bias"]),
        ("gpt2", "query,key", None, ["transformer.h.{i}.attn.c_attn.bias"]),
        ("gpt2", "norm", None, ["transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_2.bias", "transformer.ln_f.bias"]),
        ("gpt2", "attn-out,mlp-in,mlp-out", "0", ["transformer.h.0.attn.c_proj.bias", "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_proj.bias"]),
    ],
)
def test_groups_select_the_named_biases(arch, biases, layers, expected, tiny_bert, tiny_gpt2, tmp_path):
    base = {"bert": tiny_bert, "gpt2": tiny_gpt2}[arch]
    names = {e.format(i=i) for e in expected for i in (0, 1)}
    budget = inject(base, "bitfit", BitFitConfig(biases=biases, layers=layers), str(tmp_path / "run"))
    assert {r.module for r in budget.rows} == names
    file = _file_tensors(base)
    assert budget.trainable == sum(file[n].numel() for n in names)


def test_llama_has_no_biases(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="Llama-family checkpoints have no biases; use ia3 or lora"):
        inject(tiny_llama, "bitfit", BitFitConfig(), str(tmp_path / "run"))
    result = CliRunner().invoke(cli, ["inject", "bitfit", tiny_llama, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Llama-family checkpoints have no biases" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_bert, tiny_gpt2, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_bert, "bitfit", BitFitConfig(), run)
    with pytest.raises(BadInputError, match="no such parameter in the base"):
        attach_adapter(load_base_model(tiny_gpt2), run)
    adapter = read_adapter(run)
    config = {**adapter.config, "peftcli": {"method": "bitfit", "biases": "query", "layers": "0"}}
    write_adapter(str(tmp_path / "narrow"), config, adapter.tensors)
    with pytest.raises(BadInputError, match="not selected by the config"):
        attach_adapter(load_base_model(tiny_bert), str(tmp_path / "narrow"))
    bad = dict(adapter.tensors, **{"pooler.dense.bias": torch.zeros(3)})
    write_adapter(str(tmp_path / "shape"), adapter.config, bad)
    with pytest.raises(BadInputError, match=r"pooler.dense.bias: Δ \[3\] but the base has \[64\]"):
        attach_adapter(load_base_model(tiny_bert), str(tmp_path / "shape"))


def test_inject_cli_and_inspect_budget_agree(tiny_bert, tmp_path):
    out = str(tmp_path / "bitfit")
    result = CliRunner().invoke(cli, ["inject", "bitfit", "--biases", "value,mlp-in", tiny_bert, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["budget"]["trainable_params"] == 2 * (64 + 128)  # value [64] and intermediate [128], 2 layers
    args = ["inspect", tiny_bert, "--budget", "bitfit", "--biases", "value,mlp-in", "--json"]
    assert json.loads(CliRunner().invoke(cli, args).stdout)["budget"] == doc["budget"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--biases", "gate"], "invalid --biases"),
        (["--biases", ""], "invalid --biases"),
        (["--layers", "9"], "does not have"),
    ],
)
def test_inject_errors_write_nothing(tiny_bert, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "bitfit", *args, tiny_bert, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_a_new_head_is_saved_with_the_deltas(tiny_bert, tmp_path):
    """With a trained head (modules_to_save) the export still holds Δb, and the head as itself."""
    inject(tiny_bert, "bitfit", BitFitConfig(biases="value"), str(tmp_path / "run"))
    adapted = attach_adapter(load_base_model(tiny_bert, "BertForSequenceClassification"), str(tmp_path / "run"))
    adapted.add_head(["classifier"], "SEQ_CLS")
    randomize_(adapted.phi_parameters().values())
    adapted.save(str(tmp_path / "trained"))
    saved = read_adapter(str(tmp_path / "trained")).tensors
    head = adapted.model.classifier
    assert torch.equal(saved["base_model.model.classifier.weight"], head.weight.detach())
    b0 = _file_tensors(tiny_bert)
    trained = dict(adapted.model.bert.named_parameters())
    for i in (0, 1):
        k = f"encoder.layer.{i}.attention.self.value.bias"
        assert torch.allclose(saved[k], trained[k].detach() - b0[k], atol=1e-6)
    reloaded = attach_adapter(load_base_model(tiny_bert, "BertForSequenceClassification"), str(tmp_path / "trained"))
    inputs = batch()
    assert torch.allclose(_forward(reloaded, inputs), _forward(adapted, inputs), atol=1e-6)
