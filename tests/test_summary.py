"""The inspect summary: module tree grouping, config keys, formats."""

from __future__ import annotations

import json
import os

import torch

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.summary import config_summary, summarize


def _rows(path, depth=4):
    with open_checkpoint(path) as ckpt:
        return {r["name"]: r for r in summarize(ckpt, max_depth=depth)["modules"]}


def test_repeated_layers_are_shown_once_with_a_count(tiny_llama):
    rows = _rows(tiny_llama)
    layers = rows["model.layers.{0..1}"]
    assert layers["count"] == 2 and layers["label"] == "layers.{0..1}"
    per_layer = 2 * 64 + (64 * 64 + 32 * 64 * 2 + 64 * 64) + 3 * 64 * 128
    assert layers["params"] == 2 * per_layer
    q = rows["model.layers.{0..1}.self_attn.q_proj"]
    assert q["count"] == 2 and q["params"] == 2 * 64 * 64
    with open_checkpoint(tiny_llama) as ckpt:
        top = sum(r["params"] for r in summarize(ckpt)["modules"] if r["depth"] == 0)
        assert top == ckpt.num_params


def test_layers_with_different_shapes_are_not_merged(tmp_path):
    sd = {f"blocks.{i}.w": torch.zeros(4 if i < 3 else 8) for i in range(5)}
    save_state_dict(sd, str(tmp_path / "m.safetensors"))
    rows = _rows(str(tmp_path / "m.safetensors"))
    assert rows["blocks"]["count"] == 1
    assert rows["blocks.{0..2}"]["count"] == 3 and rows["blocks.{0..2}"]["params"] == 12
    assert rows["blocks.{3..4}"]["count"] == 2 and rows["blocks.{3..4}"]["params"] == 16


def test_tied_embeddings_and_gpt2_config_keys(tiny_llama_tied, tiny_gpt2):
    with open_checkpoint(tiny_llama_tied) as ckpt:
        report = summarize(ckpt)
        assert report["config"]["tie_word_embeddings"] is True
        assert "lm_head.weight" not in ckpt  # stored once
    with open_checkpoint(tiny_gpt2) as ckpt:
        cfg = summarize(ckpt)["config"]
    assert (cfg["model_type"], cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]) == (
        "gpt2", 2, 64, 4, 256
    )
    assert cfg["num_key_value_heads"] == 4


def test_config_summary_without_config():
    assert config_summary(None) is None


def test_adapter_directory_is_recognised(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    save_state_dict({"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q"]}))
    with open_checkpoint(str(d)) as ckpt:
        report = summarize(ckpt)
    assert report["format"] == "adapter" and report["adapter_config"]["r"] == 2


def test_sparse_diff_is_recognised_and_described(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from peftcli.cli import cli

    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n) + 0.01 for n in ckpt}
    save_state_dict(sd, str(tmp_path / "ft"), source_dir=tiny_llama)
    path = str(tmp_path / "t.diff")
    assert CliRunner().invoke(cli, ["diff", tiny_llama, str(tmp_path / "ft"), "-o", path, "--density", "0.1"]).exit_code == 0
    assert os.path.isfile(path)
    with open_checkpoint(path) as ckpt:
        report = summarize(ckpt)
    assert report["format"] == "sparse-diff"
    assert report["diff"]["method"] == "magnitude" and abs(float(report["diff"]["density"]) - 0.1) < 1e-3


def test_tiny_models_are_reproducible(tmp_path):
    from peftcli import tiny

    a = tiny.build("gpt2", str(tmp_path / "a"))
    b = tiny.build("gpt2", str(tmp_path / "b"))
    with open(os.path.join(a, "model.safetensors"), "rb") as fa, open(os.path.join(b, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()


def test_tiny_command_builds_once_and_refuses_foreign_paths(tmp_path):
    from click.testing import CliRunner

    from peftcli.cli.prepare import prepare

    out = str(tmp_path / "m")
    first = CliRunner().invoke(prepare, ["tiny", out, "--arch", "bert"])
    assert first.exit_code == 0 and first.stdout == out + "\n"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "bert"
    assert CliRunner().invoke(prepare, ["tiny", out]).exit_code == 0  # rerun reuses it
    (tmp_path / "file").write_text("x")
    refused = CliRunner().invoke(prepare, ["tiny", str(tmp_path / "file")])
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'file'} exists and is not a model directory (choose another path)"
    ]


def test_quickstart_runs_end_to_end_on_the_tiny_model(tmp_path):
    from examples import quickstart

    result = quickstart.run("tiny", str(tmp_path / "qs"), steps=4, log=lambda line: None)
    assert result["merged_agreement"] == 1.0 and result["merged_max_logit_gap"] < 1e-4
    assert result["steps"] == 4 and 0 < result["trainable_params"] < result["base_params"]
    assert os.path.getsize(tmp_path / "qs" / "task.diff") == result["diff_bytes"]
