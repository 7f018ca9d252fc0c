"""Layer groups: counts against the safetensors file, Δθ against a hand-incremented base."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from peftcli.artifacts.adapter_dir import read_adapter, write_adapter
from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods.layers import LayersConfig
from tests.helpers import batch, output_tensor, randomize_

LAYER_PREFIX = {"llama": "model.layers", "bert": "encoder.layer", "gpt2": "transformer.h"}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def arch_base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return request.param, {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _file_tensors(base) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _forward(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def test_counts_match_the_safetensors_file(arch_base, tmp_path):
    arch, base = arch_base
    prefix = LAYER_PREFIX[arch] + ".1."
    expected = {k: t.shape for k, t in _file_tensors(base).items() if k.startswith(prefix)}
    budget = inject(base, "layers", LayersConfig(layers="1"), str(tmp_path / "run"))
    adapter = read_adapter(str(tmp_path / "run"))
    assert {k: t.shape for k, t in adapter.tensors.items()} == expected
    assert {r.module: torch.Size(r.shape) for r in budget.rows} == expected
    assert budget.trainable == sum(s.numel() for s in expected.values())
    assert all(torch.count_nonzero(t) == 0 for t in adapter.tensors.values())
    assert adapter.config["peftcli"] == {"method": "layers", "layers": "1", "modules": None}


def test_delta_gives_the_base_with_incremented_tensors(arch_base, tmp_path):
    arch, base = arch_base
    inject(base, "layers", LayersConfig(layers="0-1"), str(tmp_path / "run"))
    adapter = read_adapter(str(tmp_path / "run"))
    g = torch.Generator().manual_seed(7)
    deltas = {k: torch.randn(t.shape, generator=g) * 0.05 for k, t in adapter.tensors.items()}
    write_adapter(str(tmp_path / "set"), adapter.config, deltas)

    adapted = load_adapted(base, str(tmp_path / "set"))
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == adapted.num_trainable
    by_hand = load_base_model(base)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d)
    inputs = batch()
    ours = _forward(adapted, inputs)
    assert torch.allclose(ours, _forward(by_hand, inputs), atol=1e-5)
    assert not torch.allclose(ours, _forward(load_base_model(base), inputs), atol=1e-3)
    exported = adapted.phi_state_dict()
    assert all(torch.allclose(exported[k], deltas[k], atol=1e-6) for k in deltas)


def test_training_exports_theta_minus_theta0(tiny_llama, tmp_path):
    inject(tiny_llama, "layers", LayersConfig(layers="0", modules="self_attn,input_layernorm"), str(tmp_path / "run"))
    adapted = load_adapted(tiny_llama, str(tmp_path / "run"))
    randomize_(adapted.phi_parameters().values())
    adapted.save(str(tmp_path / "trained"))
    saved = read_adapter(str(tmp_path / "trained")).tensors
    trained = dict(adapted.model.named_parameters())
    theta0 = _file_tensors(tiny_llama)
    for k, delta in saved.items():
        assert torch.allclose(delta, trained[k].detach() - theta0[k], atol=1e-6)


# The FFN and attention of each family, as patterns over the checkpoint's own tensor names.
FFN = {
    "llama": r"model\.layers\.1\.mlp\..*",
    "bert": r"encoder\.layer\.1\.(intermediate|output)\..*",
    "gpt2": r"transformer\.h\.1\.mlp\..*",
}
ATTENTION = {
    "llama": r"model\.layers\.1\.self_attn\..*",
    "bert": r"encoder\.layer\.1\.attention\..*",
    "gpt2": r"transformer\.h\.1\.attn\..*",
}


@pytest.mark.parametrize(
    "arch, modules, pattern",
    [
        ("llama", "mlp", FFN["llama"]),
        ("llama", "q_proj,v_proj", r"model\.layers\.1\.self_attn\.[qv]_proj\.weight"),
        ("llama", "input_layernorm", r"model\.layers\.1\.input_layernorm\.weight"),
        ("bert", "attention.output", r"encoder\.layer\.1\.attention\.output\..*"),
        # `output` is the block's own FFN output module, not also attention.output (a module of the block).
        ("bert", "output", r"encoder\.layer\.1\.output\..*"),
        ("bert", "output.dense", r"encoder\.layer\.1\.output\.dense\..*"),  # a path from the block: the FFN's only
        ("bert", "dense", r"encoder\.layer\.1\.(attention\.output|intermediate|output)\.dense\..*"),  # last piece: every dense
        ("bert", "self", r"encoder\.layer\.1\.attention\.self\..*"),  # a piece inside the path still works
        ("bert", "LayerNorm", r"encoder\.layer\.1\.(attention\.)?output\.LayerNorm\..*"),
        ("gpt2", "attn,ln_1", r"transformer\.h\.1\.(attn|ln_1)\..*"),
        ("gpt2", "c_proj", r"transformer\.h\.1\.(attn|mlp)\.c_proj\..*"),
    ],
)
def test_modules_restrict_the_layers(arch, modules, pattern, tiny_llama, tiny_bert, tiny_gpt2, tmp_path):
    base = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[arch]
    file = _file_tensors(base)
    expected = {k for k in file if re.fullmatch(pattern, k)}
    budget = inject(base, "layers", LayersConfig(layers="1", modules=modules), str(tmp_path / "run"))
    assert expected and {r.module for r in budget.rows} == expected
    assert budget.trainable == sum(file[k].numel() for k in expected)


@pytest.mark.parametrize("alias", ["mlp", "ffn", "attention", "attn", "mlp,attention"])
def test_ffn_and_attention_aliases_follow_the_architecture(arch_base, alias, tmp_path):
    """mlp/ffn and attention/attn name each family's own modules; the adapter attaches with those counts."""
    arch, base = arch_base
    file = _file_tensors(base)
    patterns = [{"mlp": FFN, "ffn": FFN, "attention": ATTENTION, "attn": ATTENTION}[a][arch] for a in alias.split(",")]
    expected = {k for k in file if any(re.fullmatch(p, k) for p in patterns)}
    run = str(tmp_path / "run")
    budget = inject(base, "layers", LayersConfig(layers="1", modules=alias), run)
    assert expected and {r.module for r in budget.rows} == expected
    assert budget.trainable == sum(file[k].numel() for k in expected)
    adapted = load_adapted(base, run)  # attach selects by the same rule, so every tensor is accepted
    assert adapted.num_trainable == budget.trainable
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == budget.trainable


def test_aliases_recognise_a_relabelled_family_by_its_module_names(tiny_bert, tmp_path):
    relabelled = tmp_path / "bert-foo"
    relabelled.mkdir()
    config = json.load(open(os.path.join(tiny_bert, "config.json")))
    json.dump({**config, "model_type": "foo"}, open(relabelled / "config.json", "w"))
    os.link(os.path.join(tiny_bert, "model.safetensors"), relabelled / "model.safetensors")
    file = _file_tensors(tiny_bert)
    budget = inject(str(relabelled), "layers", LayersConfig(layers="1", modules="mlp"), str(tmp_path / "run"))
    assert {r.module for r in budget.rows} == {k for k in file if re.fullmatch(FFN["bert"], k)}


def test_cli_mlp_on_bert_trains_the_ffn(tiny_bert, tmp_path):
    out = str(tmp_path / "layers")
    result = CliRunner().invoke(cli, ["inject", "layers", "--layers", "1", "--modules", "mlp", tiny_bert, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    # intermediate.dense [128, 64] + bias, output.dense [64, 128] + bias, output.LayerNorm (64 + 64).
    assert json.loads(result.stdout)["budget"]["trainable_params"] == 128 * 64 + 128 + 64 * 128 + 64 + 2 * 64


def test_layers_is_required():
    with pytest.raises(UsageError, match="needs `layers`"):
        LayersConfig()


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_llama, tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "layers", LayersConfig(layers="1"), run)
    with pytest.raises(BadInputError, match=r"9 problem\(s\).*no such parameter in the base"):
        attach_adapter(load_base_model(tiny_bert), run)
    adapter = read_adapter(run)
    config = {**adapter.config, "peftcli": {"method": "layers", "layers": "0", "modules": None}}
    write_adapter(str(tmp_path / "other"), config, adapter.tensors)
    with pytest.raises(BadInputError, match="not selected by the config"):
        attach_adapter(load_base_model(tiny_llama), str(tmp_path / "other"))


def test_inject_cli_and_inspect_budget_agree(tiny_llama, tmp_path):
    out = str(tmp_path / "layers")
    result = CliRunner().invoke(cli, ["inject", "layers", "--layers", "1", "--modules", "mlp", tiny_llama, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["budget"]["trainable_params"] == 3 * 64 * 128  # gate, up, down
    args = ["inspect", tiny_llama, "--budget", "layers", "--layers", "1", "--modules", "mlp", "--json"]
    assert json.loads(CliRunner().invoke(cli, args).stdout)["budget"] == doc["budget"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "needs --layers"),
        (["--layers", "2"], "names layer 2, which this model does not have"),
        (["--layers", "1", "--modules", "cross_attn"], "--modules cross_attn matches no tensor"),
        (
            ["--layers", "1", "--modules", "output"],
            "parts of those layers: mlp/ffn (mlp), attention/attn (self_attn), or input_layernorm, mlp.down_proj",
        ),
        (["--layers", "x"], "invalid --layers"),
    ],
)
def test_inject_errors_write_nothing(tiny_llama, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "layers", *args, tiny_llama, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []
