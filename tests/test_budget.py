"""The LoRA budget: r·(d+k) per target, target resolution per architecture, percentages."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.cli import cli
from peftcli.errors import UsageError
from peftcli.methods import get_method
from peftcli.methods.base import Budget
from peftcli.methods.lora import LoraConfig
from peftcli.targets import parse_layers, resolve_targets
from tests.safetensors_craft import make_file


def _budget(path, **cfg):
    with open_checkpoint(path) as ckpt:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        rows = get_method("lora").budget(shapes, ckpt.config, LoraConfig(**cfg))
        return Budget("lora", rows, ckpt.num_params)


def test_gpt3_sized_matrix_from_a_sparse_file(tmp_path):
    # The LoRA paper's example: one 12288×12288 matrix, r=16 -> 16·(12288+12288) = 393,216.
    n = 12288
    path = str(tmp_path / "gpt3.safetensors")
    with open(path, "wb") as f:
        f.write(make_file({"attn.q.weight": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}, b""))
        f.truncate(f.tell() + 4 * n * n)
    b = _budget(path, rank=16, targets="q")
    assert b.trainable == 393_216
    assert b.base_params == n * n
    assert b.pct_of_base == pytest.approx(100 * 393_216 / 150_994_944)  # 0.2604%
    assert b.reduction_pct == pytest.approx(99.739583, abs=1e-6)  # 1 - 1/384
    assert b.pct_of_total == pytest.approx(100 / 385)  # PEFT's print_trainable_parameters convention
    assert b.reduction_pct_of_total == pytest.approx(100 * 384 / 385)  # 99.74026%: "99.7402%" truncated


def test_llama_defaults_to_q_and_v_with_gqa_shapes(tiny_llama):
    b = _budget(tiny_llama, rank=4)
    kinds = sorted({r.module.rsplit(".", 1)[-1] for r in b.rows})
    assert kinds == ["q_proj", "v_proj"] and len(b.rows) == 4
    shapes = {r.module.rsplit(".", 1)[-1]: r.shape for r in b.rows}
    assert shapes["q_proj"] == (64, 64) and shapes["v_proj"] == (32, 64)  # 2 KV heads of 16
    assert b.trainable == 2 * (4 * (64 + 64) + 4 * (32 + 64))


def test_bert_defaults_to_query_and_value(tiny_bert):
    b = _budget(tiny_bert, rank=8)
    assert sorted({r.module.rsplit(".", 1)[-1] for r in b.rows}) == ["query", "value"]
    assert b.trainable == 4 * 8 * (64 + 64)


def test_gpt2_conv1d_shapes_are_reported_out_by_in(tiny_gpt2):
    b = _budget(tiny_gpt2, rank=2)
    assert [r.shape for r in b.rows] == [(192, 64), (192, 64)]  # c_attn stored [64, 192]
    assert b.trainable == 2 * 2 * (192 + 64)


def test_all_linear_excludes_the_output_head(tiny_llama, tiny_llama_tied):
    b = _budget(tiny_llama, rank=1, targets="all-linear")
    assert not any("lm_head" in r.module for r in b.rows)
    assert len(b.rows) == 2 * 7
    assert len(_budget(tiny_llama_tied, rank=1, targets="all-linear").rows) == 2 * 7


def test_regex_layers_and_dora(tiny_llama):
    b = _budget(tiny_llama, rank=2, targets=r".*\.mlp\.(up|down)_proj", layers="1")
    assert [r.module for r in b.rows] == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    dora = _budget(tiny_llama, rank=2, targets="q_proj", dora=True)
    assert dora.trainable == 2 * (2 * (64 + 64) + 64)


def test_bad_budget_options(tiny_llama):
    with pytest.raises(UsageError, match="layer 7"):
        _budget(tiny_llama, layers="7")
    with pytest.raises(UsageError, match="must be positive"):
        LoraConfig(rank=-1)
    with pytest.raises(UsageError):
        parse_layers("3-1")
    assert parse_layers("0,2,4-6") == {0, 2, 4, 5, 6}
    with pytest.raises(UsageError, match="matches no linear module"):
        resolve_targets({"a.weight": (2, 2)}, None, "q_proj", None)


def test_budget_on_the_cli_agrees_with_the_api(tiny_llama):
    result = CliRunner().invoke(cli, ["inspect", tiny_llama, "--budget", "lora", "--rank", "16", "--targets", "q_proj,v_proj", "--json"])
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    api = _budget(tiny_llama, rank=16, targets="q_proj,v_proj")
    assert budget["trainable_params"] == api.trainable == 2 * (16 * 128 + 16 * 96)
    assert [t["module"] for t in budget["targets"]] == [r.module for r in api.rows]
    text = CliRunner().invoke(cli, ["inspect", tiny_llama, "--budget", "lora", "--rank", "16"]).stdout
    assert f"trainable {api.trainable:,} of" in text
