"""``peftcli export --to gguf``: a llama.cpp LoRA adapter file, checked against independent references.

The written file is read back with ``gguf.GGUFReader`` (llama.cpp's own Python reader): the
names, shapes and types llama.cpp's ``convert_lora_to_gguf.py`` writes, its metadata keys, and
the ΔW llama.cpp computes from them (``alpha / rank · lora_b · lora_a``, rank from lora_b,
attn_q/attn_k rows un-permuted) equal to PEFT's ΔW (merge_and_unload minus the base). The
q/k un-permutation is done twice: with the GGUF reader's ``unpermute`` and by a direct row
formula written here. No llama.cpp binary runs here (no llama-cpp-python in the env).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from peftcli.cli import cli

peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up", "mlp.gate_proj": "ffn_gate"}


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _llama(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path).eval()


def _peft_adapter(base: str, out, save_embedding_layers="auto", **lora) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(target_modules=lora.pop("target_modules", TARGETS), init_lora_weights=False, **lora)
    get_peft_model(_llama(base), cfg).save_pretrained(str(out), save_embedding_layers=save_embedding_layers)
    return str(out)


def _peft_delta(base: str, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW per module (HF path without .weight) from PEFT's merge_and_unload."""
    from peft import PeftModel

    before = _llama(base).state_dict()
    merged = PeftModel.from_pretrained(_llama(base), adapter).merge_and_unload().state_dict()
    return {n[: -len(".weight")]: merged[n].double() - w.double() for n, w in before.items() if not torch.equal(merged[n], w)}


def _hf_config(base: str) -> dict:
    return json.load(open(os.path.join(base, "config.json")))


def _read(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (numpy shape, type name, fp64 values))."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml's ne is numpy's shape reversed
        values = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        tensors[t.name] = (shape, t.tensor_type.name, torch.from_numpy(values))
    return fields, tensors


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Directly: llama.cpp's row h·d + 2i + half holds Hugging Face's row h·d + half·d/2 + i."""
    d = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for half in (0, 1):
                out[h * d + half * d // 2 + i] = w[h * d + 2 * i + half]
    return out


def _llamacpp_delta(tensors: dict, alpha: float, config: dict, unpermute) -> dict[str, torch.Tensor]:
    """ΔW per module as llama.cpp computes it, back in Hugging Face's row order and names."""
    inverse = {v: k for k, v in GGUF_OF.items()}
    out = {}
    for name, (_, _, a) in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        stem = name[: -len(".lora_a")]
        b = tensors[stem + ".lora_b"][2]
        delta = alpha / b.shape[1] * (b @ a)  # llama-adapter.cpp: scale = alpha / lora_b->ne[0]
        _, layer, kind, _ = stem.split(".")
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(kind)
        if heads is not None:
            delta = unpermute(delta, heads)
        out[f"model.layers.{layer}.{inverse[kind]}"] = delta
    return out


@pytest.fixture(scope="module")
def plain(tiny_llama, tmp_path_factory) -> str:
    return _peft_adapter(tiny_llama, tmp_path_factory.mktemp("gguf") / "plain", r=8, lora_alpha=16)


def test_f32_file_has_llamacpp_names_shapes_metadata_and_peft_delta(tiny_llama, plain, tmp_path):
    from peftcli.checkpoint.gguf_format import unpermute

    out = tmp_path / "a.gguf"
    result = _invoke("export", plain, "--to", "gguf", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: llama.cpp LoRA adapter for llama"), result.output
    fields, tensors = _read(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 16.0
    config = _hf_config(tiny_llama)
    assert config["num_key_value_heads"] < config["num_attention_heads"], "the fixture must have GQA"
    expected_names = {f"blk.{i}.{GGUF_OF[m]}.weight.{ab}" for i in range(config["num_hidden_layers"])
                      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
                      for ab in ("lora_a", "lora_b")}
    assert set(tensors) == expected_names
    base = _llama(tiny_llama).state_dict()
    for name, (shape, type_name, _) in tensors.items():
        assert type_name == "F32"
        out_f, in_f = base[f"model.layers.{name.split('.')[1]}.{ {v: k for k, v in GGUF_OF.items()}[name.split('.')[2]] }.weight"].shape
        assert shape == ((8, in_f) if name.endswith("lora_a") else (out_f, 8)), name
    want = _peft_delta(tiny_llama, plain)
    for unperm in (unpermute, _unpermute_rows):
        got = _llamacpp_delta(tensors, fields["adapter.lora.alpha"], config, unperm)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    # the permutation is not the identity here: without it q/k would be wrong
    plain_q = _llamacpp_delta(tensors, 16.0, config, lambda w, h: w)["model.layers.0.self_attn.q_proj"]
    assert not torch.allclose(plain_q, want["model.layers.0.self_attn.q_proj"], atol=1e-5)


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("bf16", 2e-2)])
def test_16_bit_outtypes_round_only(tiny_llama, plain, tmp_path, outtype, tol):
    from peftcli.checkpoint.gguf_format import unpermute

    out = tmp_path / "a.gguf"
    assert _invoke("export", plain, "--to", "gguf", "--outtype", outtype, "-o", out).exit_code == 0
    fields, tensors = _read(out)
    assert {t for _, t, _ in tensors.values()} == {outtype.upper()}
    got = _llamacpp_delta(tensors, fields["adapter.lora.alpha"], _hf_config(tiny_llama), unpermute)
    want = _peft_delta(tiny_llama, plain)
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k], want[k], atol=tol * scale, rtol=0, msg=k)


def test_q8_0_quantises_whole_block_rows_and_writes_the_rest_f16(plain, tmp_path):
    out = tmp_path / "a.gguf"
    result = _invoke("export", plain, "--to", "gguf", "--outtype", "q8_0", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    _, tensors = _read(out)
    for name, (shape, type_name, _) in tensors.items():
        assert type_name == ("Q8_0" if shape[-1] % 32 == 0 else "F16"), name  # rank 8: lora_b rows are 8 long
    assert json.loads(result.output)["gguf"]["tensor_types"] == {"F16": 10, "Q8_0": 10}


@pytest.mark.parametrize("lora", [
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 4, "layers.1.self_attn.q_proj": 12},
         alpha_pattern={"down_proj": 3}),
], ids=["rslora", "patterns"])
def test_rslora_and_patterns_fold_into_one_alpha_exactly(tiny_llama, tmp_path, lora):
    from peftcli.checkpoint.gguf_format import unpermute

    run = _peft_adapter(tiny_llama, tmp_path / "run", **lora)
    out = tmp_path / "a.gguf"
    result = _invoke("export", run, "--to", "gguf", "-o", out)
    assert result.exit_code == 0, result.output
    assert "repaired scaling" in result.output
    fields, tensors = _read(out)
    got = _llamacpp_delta(tensors, fields["adapter.lora.alpha"], _hf_config(tiny_llama), unpermute)
    want = _peft_delta(tiny_llama, run)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


def test_tied_base_exports_and_a_tied_lm_head_lora_is_refused(tiny_llama_tied, tmp_path):
    from peftcli.checkpoint.gguf_format import unpermute

    run = _peft_adapter(tiny_llama_tied, tmp_path / "run", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "a.gguf"
    assert _invoke("export", run, "--to", "gguf", "-o", out).exit_code == 0
    fields, tensors = _read(out)
    got = _llamacpp_delta(tensors, fields["adapter.lora.alpha"], _hf_config(tiny_llama_tied), unpermute)
    want = _peft_delta(tiny_llama_tied, run)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    # PEFT saves lm_head's base_layer.weight too by default (refused as a saved module); without
    # it the LoRA pair itself has no llama.cpp name, as the converter says ("ignored in base model")
    for saved, why in (("auto", "base_layer.weight"), (False, "ties lm_head")):
        head = _peft_adapter(tiny_llama_tied, tmp_path / f"head{saved}", save_embedding_layers=saved, r=4, lora_alpha=8,
                             target_modules=["q_proj", "lm_head"])
        (tmp_path / f"out{saved}").mkdir()
        line = _refused(head, tmp_path / f"out{saved}" / "a.gguf")
        assert "lm_head" in line and why in line, line


def _refused(run, out, *extra, code=1):
    """Export ``run``: exit ``code``, one line on stderr, nothing written next to ``out``."""
    result = _invoke("export", run, "--to", "gguf", "-o", out, *extra)
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert os.listdir(os.path.dirname(out)) == [], "nothing written, not even a temporary"
    return lines[0]


def test_dora_is_refused_with_the_way_out(tiny_llama, tmp_path):
    run = _peft_adapter(tiny_llama, tmp_path / "run", r=8, lora_alpha=16, use_dora=True)
    (tmp_path / "out").mkdir()
    line = _refused(run, tmp_path / "out" / "a.gguf")
    assert "DoRA" in line and "peftcli merge" in line


def test_modules_to_save_is_refused(tiny_llama, tmp_path):
    run = _peft_adapter(tiny_llama, tmp_path / "run", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    (tmp_path / "out").mkdir()
    assert "modules_to_save" in _refused(run, tmp_path / "out" / "a.gguf")


def test_unknown_architecture_is_refused_naming_it(tiny_gpt2, tmp_path):
    run = _peft_adapter(tiny_gpt2, tmp_path / "run", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    (tmp_path / "out").mkdir()
    assert "GPT2LMHeadModel" in _refused(run, tmp_path / "out" / "a.gguf")


def test_a_base_that_is_no_local_directory_is_refused(plain, tmp_path):
    (tmp_path / "out").mkdir()
    line = _refused(plain, tmp_path / "out" / "a.gguf", "--base", tmp_path / "nowhere")
    assert "--base" in line


@pytest.mark.parametrize("extra,what", [
    (("--outtype", "q4_k"), "--outtype"),
    (("--outtype", "q4_1"), "is not a type llama.cpp's adapter converter writes"),  # a whole model's type only
    (("--max-lora-rank", "16"), "--max-lora-rank"),
])
def test_bad_options_are_one_line_usage_errors(plain, tmp_path, extra, what):
    (tmp_path / "out").mkdir()
    assert what in _refused(plain, tmp_path / "out" / "a.gguf", *extra, code=2)


def test_gguf_options_with_vllm_are_usage_errors(plain, tmp_path):
    result = _invoke("export", plain, "--to", "vllm", "--outtype", "f16", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "--outtype" in result.stderr and not os.path.exists(tmp_path / "x")


def test_check_lints_and_writes_nothing(tiny_llama, tmp_path):
    run = _peft_adapter(tiny_llama, tmp_path / "run", r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"])
    result = _invoke("export", run, "--to", "gguf", "--check")
    assert result.exit_code == 1 and "FAIL scaling" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["run"]
