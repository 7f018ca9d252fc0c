"""peftcli convert: adapter → .diff (exact ΔW) and .diff → LoRA (truncated SVD, kept energy)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.methods.lora import LoraConfig
from tests.helpers import batch, output_tensor, randomize_


def _trained_lora(base, tmp_path, rank=4):
    inject(base, "lora", LoraConfig(rank=rank), str(tmp_path / "init"))
    adapted = load_adapted(base, str(tmp_path / "init"))
    randomize_([p for p in adapted.parameters() if p.requires_grad], scale=0.3)
    adapted.save(str(tmp_path / "lora"))
    return adapted, str(tmp_path / "lora")


def _run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.stderr
    return result


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_round_trip_lora_diff_lora(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    adapted, lora = _trained_lora(base, tmp_path)
    _run("convert", lora, "--to", "diff", "--dense", "--values", "fp32", "-o", str(tmp_path / "l.diff"))
    # the diff merges to the same model as the adapter
    merge(base, [lora], str(tmp_path / "m_lora"))
    merge(base, [str(tmp_path / "l.diff")], str(tmp_path / "m_diff"))
    a = load_file(str(tmp_path / "m_lora" / "model.safetensors"))
    b = load_file(str(tmp_path / "m_diff" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # and back to a rank-4 LoRA that reproduces the adapted model (a rank-4 φ is kept whole)
    doc = json.loads(_run("convert", str(tmp_path / "l.diff"), "--to", "lora", "--rank", "4", "-o", str(tmp_path / "back"), "--json").stdout)
    assert doc["kept_energy"] == pytest.approx(1.0, abs=1e-5)
    back = load_adapted(base, str(tmp_path / "back"))
    with torch.no_grad():
        assert torch.allclose(output_tensor(back(**batch())), output_tensor(adapted(**batch())), atol=1e-4)


def test_lower_rank_keeps_the_top_singular_energy(tiny_llama, tmp_path):
    _, lora = _trained_lora(tiny_llama, tmp_path)
    _run("convert", lora, "--to", "diff", "--dense", "--values", "fp32", "-o", str(tmp_path / "l.diff"))
    doc = json.loads(_run("convert", str(tmp_path / "l.diff"), "--to", "lora", "--rank", "2", "-o", str(tmp_path / "r2"), "--json").stdout)
    phi = load_file(str(tmp_path / "l.diff"))
    total = kept = 0.0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        s = torch.linalg.svdvals(phi[name].double())  # independent: singular values of each φ
        total += float((s**2).sum())
        kept += float((s[:2] ** 2).sum())
    assert doc["kept_energy"] == pytest.approx(kept / total, rel=1e-5)
    assert 0.0 < doc["kept_energy"] < 1.0
    config = json.load(open(tmp_path / "r2" / "adapter_config.json"))
    assert config["r"] == 2 and config["lora_alpha"] == 2


def test_sparse_conversion_and_errors(tiny_llama, tiny_bert, tmp_path):
    _, lora = _trained_lora(tiny_llama, tmp_path)
    doc = json.loads(_run("convert", lora, "--to", "diff", "--density", "0.1", "-o", str(tmp_path / "s.diff"), "--json").stdout)
    assert doc["k"] == round(0.1 * doc["n"])
    bad = CliRunner().invoke(cli, ["convert", str(tmp_path / "s.diff"), "--to", "lora", "--density", "0.1", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "only applies with --to diff" in bad.stderr
    inject(tiny_bert, "bitfit", __import__("peftcli.methods.bitfit", fromlist=["BitFitConfig"]).BitFitConfig(), str(tmp_path / "bitfit"))
    _run("convert", str(tmp_path / "bitfit"), "--to", "diff", "--dense", "-o", str(tmp_path / "b.diff"))
    biases_only = CliRunner().invoke(cli, ["convert", str(tmp_path / "b.diff"), "--to", "lora", "-o", str(tmp_path / "y")])
    assert biases_only.exit_code == 1 and "no linear layer" in biases_only.stderr
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
