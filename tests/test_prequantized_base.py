"""Pre-quantized checkpoints (a ``quantization_config`` in config.json: bitsandbytes, GPTQ, fp8)
are refused by every command that reads a base, naming the quantization method: their stored
tensors are quantized codes (packed 4-bit bytes, int8 with separate scales), and reading them
as weights counted, diffed and folded codes as if they were weights, silently."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.cli import cli
from tests.helpers import assert_error


def _bnb_nf4(source: str, out: str) -> str:
    """``source`` saved as transformers saves a bitsandbytes 4-bit model: packed uint8 codes
    [n/2, 1] under the weight's own name, with absmax/quant_map/quant_state beside it."""
    shutil.copytree(source, out)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    packed = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            packed[name] = torch.zeros(t.numel() // 2, 1, dtype=torch.uint8)
            packed[name + ".absmax"] = torch.ones(max(1, t.numel() // 64))
            packed[name + ".quant_map"] = torch.linspace(-1, 1, 16)
        else:
            packed[name] = t
    save_file(packed, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    _quantization_config(out, {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    return out


def _quantization_config(directory: str, value) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = value
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def nf4_dir(tiny_llama, tmp_path_factory) -> str:
    return _bnb_nf4(tiny_llama, str(tmp_path_factory.mktemp("prequant") / "nf4"))


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prequant_lora") / "lora")
    assert CliRunner().invoke(cli, ["inject", "lora", tiny_llama, "-o", out]).exit_code == 0
    return out


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{base}"],
        ["inject", "lora", "{base}", "-o", "{out}"],
        ["merge", "{base}", "{lora}", "-o", "{out}"],
        ["diff", "{plain}", "{base}", "--dense", "-o", "{out}"],
        ["train", "{lora}", "--model", "{base}", "--data", "{data}", "--task", "lm", "--steps", "1"],
    ],
    ids=lambda c: c[0],
)
def test_bitsandbytes_nf4_base_is_refused_by_name(command, nf4_dir, lora, tiny_llama, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello world"}\n')
    out = str(tmp_path / ("out.diff" if command[0] == "diff" else "out"))
    args = [a.format(base=nf4_dir, out=out, lora=lora, plain=tiny_llama, data=data) for a in command]
    result = CliRunner().invoke(cli, args)
    assert_error(result, 1, "pre-quantized checkpoint (quant_method 'bitsandbytes')", out)


def test_check_says_the_base_is_prequantized(nf4_dir, lora):
    result = CliRunner().invoke(cli, ["check", nf4_dir, lora])
    assert result.exit_code == 1
    assert "pre-quantized checkpoint (quant_method 'bitsandbytes')" in result.stdout + result.stderr


@pytest.mark.parametrize("value", [{"quant_method": "gptq", "bits": 4}, {"quant_method": "fp8"}, {"bits": 4}, "int4"])
def test_any_quantization_config_is_refused_even_with_float_tensors(value, tiny_llama, tmp_path):
    """The config alone decides: a quantizer whose tensors happen to be float (fp8 scales, GPTQ's
    fp16 g_idx) is not read as plain weights either."""
    base = str(tmp_path / "q")
    shutil.copytree(tiny_llama, base)
    _quantization_config(base, value)
    method = value.get("quant_method") if isinstance(value, dict) else None
    expected = f"quant_method {method!r}" if method else "a quantization_config"
    assert_error(CliRunner().invoke(cli, ["inspect", base]), 1, f"pre-quantized checkpoint ({expected})")


def test_a_model_transformers_loaded_from_a_gguf_is_read(tiny_llama, tmp_path):
    """transformers dequantises a GGUF when it loads one and records quant_method "gguf": the
    tensors it saves are plain, so such a directory is read like any other."""
    base = str(tmp_path / "from_gguf")
    shutil.copytree(tiny_llama, base)
    _quantization_config(base, {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False})
    result = CliRunner().invoke(cli, ["inspect", base])
    assert result.exit_code == 0, result.output
