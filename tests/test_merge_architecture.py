"""A merge of full checkpoints of two architectures is refused, on both merge paths.

A Mistral checkpoint has every tensor, name and shape a Llama one has, so nothing in the tensors
stops an element-wise merge; the output would be written under the base's config, a model
neither input was. The fine-tune here is tiny_llama's tensors under a Mistral config.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.merging import fast_linear


def _as_mistral(tiny_llama: str, tmp_path) -> str:
    out = str(tmp_path / "mistral-ft")
    shutil.copytree(tiny_llama, out)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    json.dump(config, open(path, "w"))
    return out


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_finetune_of_another_architecture_is_refused_and_nothing_written(tiny_llama, tmp_path, monkeypatch, method):
    ft = _as_mistral(tiny_llama, tmp_path)
    out = str(tmp_path / "out")
    ran = []
    monkeypatch.setattr(fast_linear.FastMerge, "run", lambda self, *a, **k: ran.append(1))  # must not be reached
    args = ["merge", tiny_llama, ft, ft, "-o", out] + (["--method", method, "--density", "0.5"] if method != "linear" else [])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "'mistral'" in lines[0] and "'llama'" in lines[0] and "model_type" in lines[0]
    assert not ran and not os.path.exists(out)


def test_the_same_architecture_still_merges(tiny_llama, tmp_path):
    out = str(tmp_path / "out")
    r = CliRunner().invoke(cli, ["merge", tiny_llama, tiny_llama, "-o", out, "--quiet"])
    assert r.exit_code == 0, r.output
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_an_input_config_nested_too_deeply_is_a_clean_error(tiny_llama, tmp_path):
    ft = str(tmp_path / "ft")
    shutil.copytree(tiny_llama, ft)
    with open(os.path.join(ft, "config.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    out = str(tmp_path / "out")
    r = CliRunner().invoke(cli, ["merge", tiny_llama, ft, "-o", out])
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error" not in lines[0] and not os.path.exists(out)
