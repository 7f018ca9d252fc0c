"""Qwen2 in peftcli's three GGUF paths: ``export MODEL --to gguf``, a qwen2 ``.gguf`` as a base,
and ``export RUN --to gguf`` (a LoRA adapter on a Qwen2 base).

llama.cpp's facts checked here (read from ``convert_hf_to_gguf.py``'s ``Qwen2Model`` and gguf-py's
QWEN2 tensor list): ``general.architecture = qwen2``, ``qwen2.*`` keys, the llama tensor names plus
``blk.N.attn_{q,k,v}.bias``, and no q/k row permutation (that is ``LlamaModel``'s). The
references are independent of peftcli: gguf's ``GGUFReader`` (raw tensors equal the source's
bytes, so a permutation shows), transformers' GGUF loader (logits), a file written in the test
with gguf's ``GGUFWriter``, training on the safetensors source, and PEFT's lora_A/lora_B.

The tiny models use a tiny byte-level BPE (the converter's gpt2 path). Its check hash is in no
table, so the round trips add it to peftcli's table as ``qwen2`` for the test (``qwen_hash``);
refusing an unknown hash is checked without it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from peftcli.cli import cli  # noqa: E402
from tests.helpers import lm_rows  # noqa: E402

IDS = torch.tensor([[1, 5, 200, 17, 263, 40, 2, 99]])
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_bpe():
    """A byte-level BPE with 264 tokens: the 256 byte characters, 5 merges, 3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "w"), ("1", "2"), ("Ġw", "1"), ("a", "b"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   additional_special_tokens=list(SPECIALS[1:]))
    fast.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    assert len(fast) == 264
    return fast


def build(out: str, tied: bool, seed: int = 0, **extra) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=264, max_position_embeddings=128, eos_token_id=261, tie_word_embeddings=tied,
                      rope_theta=20000.0, rms_norm_eps=1e-5, **extra)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms away from 1 and biases away from 0: a dropped or misplaced one shows
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model.eval().save_pretrained(out)
    byte_bpe().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    return {"untied": build(str(root / "untied"), False), "tied": build(str(root / "tied"), True, seed=1)}


@pytest.fixture
def qwen_hash(monkeypatch, models):
    """The tiny tokenizer's llama.cpp check hash named ``qwen2`` in peftcli's table (for this test)."""
    from hashlib import sha256

    from transformers import AutoTokenizer

    from peftcli.serving import gguf_model_export as export

    digest = sha256(str(AutoTokenizer.from_pretrained(models["untied"]).encode(export.CHECK_TEXT)).encode()).hexdigest()
    monkeypatch.setitem(export.PRE_TOKENIZERS, digest, "qwen2")


def state(src: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(src, "model.safetensors"))


def export(src: str, out: str, *flags: str) -> dict:
    result = CliRunner().invoke(cli, ["export", src, "--to", "gguf", "-o", out, *flags, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def fails(args: list[str], expected: str, code: int = 1) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def read(path: str) -> tuple[dict, dict]:
    """gguf's reader: the metadata (scalars and strings) and each tensor in numpy order."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            fields[name] = field.contents() if len(field.types) == 1 else len(field.data)
        elif len(field.types) == 1:
            fields[name] = field.parts[field.data[0]][0].item()
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
    return fields, tensors


def gguf_names(hf: str) -> str:
    """The llama.cpp name of a Hugging Face Qwen2 tensor (gguf-py's TensorNameMap for QWEN2)."""
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    return mapping.get_name(hf, try_suffixes=(".weight", ".bias"))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.double()


# -- (1) export MODEL --to gguf ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_f32_export_is_llamacpp_qwen2_and_reads_back_exactly(models, which, tmp_path, qwen_hash):
    from transformers import AutoModelForCausalLM

    from peftcli.checkpoint.reader import open_checkpoint

    src, out = models[which], str(tmp_path / "model.gguf")
    doc = export(src, out)
    assert doc["gguf"]["architecture"] == "qwen2" and doc["gguf"]["tokenizer"] == "gpt2"
    fields, tensors = read(out)
    assert fields["general.architecture"] == "qwen2" and fields["general.type"] == "model"
    expected = {"qwen2.block_count": 2, "qwen2.context_length": 128, "qwen2.embedding_length": 64, "qwen2.feed_forward_length": 80,
                "qwen2.attention.head_count": 4, "qwen2.attention.head_count_kv": 2, "general.file_type": 0,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.eos_token_id": 261}
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["qwen2.rope.freq_base"] == 20000.0 and abs(fields["qwen2.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert not [k for k in fields if k.startswith("llama.")]
    # Qwen2Model is a plain TextModel: none of LlamaModel's vocab_size / rope.dimension_count keys
    assert "qwen2.vocab_size" not in fields and "qwen2.rope.dimension_count" not in fields
    # every tensor under gguf-py's QWEN2 name, its values the source's as stored (no q/k permutation)
    source = state(src)
    assert set(tensors) == {gguf_names(k) for k in source}
    assert {n for n in tensors if n.endswith(".bias")} == {f"blk.{i}.attn_{x}.bias" for i in range(2) for x in "qkv"}
    assert ("output.weight" in tensors) == (which == "untied")
    for hf, value in source.items():
        assert np.array_equal(tensors[gguf_names(hf)], value.numpy()), hf
    # transformers' GGUF loader (which un-permutes llama's q/k, and not qwen2's) gives the source's logits
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf").eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    ref = logits_of(AutoModelForCausalLM.from_pretrained(src).eval())
    torch.testing.assert_close(logits_of(theirs), ref, rtol=0, atol=1e-5)
    # peftcli's own reader: every tensor exactly
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.tensors) == set(source)
        for hf, value in source.items():
            assert torch.equal(ckpt.get(hf), value), hf


def test_qwen2_export_refusals(models, tmp_path, qwen_hash):
    import shutil

    window = build(str(tmp_path / "window"), False, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    fails(["export", window, "--to", "gguf", "-o", str(tmp_path / "w.gguf")], "use_sliding_window")
    rope = build(str(tmp_path / "rope"), False, rope_scaling={"rope_type": "linear", "factor": 2.0})
    fails(["export", rope, "--to", "gguf", "-o", str(tmp_path / "r.gguf")], "RoPE scaling 'linear'")
    # a tokenizer.model: Qwen2Model.set_vocab tries sentencepiece first, which peftcli does not read
    spm = str(tmp_path / "spm")
    shutil.copytree(models["untied"], spm)
    open(os.path.join(spm, "tokenizer.model"), "wb").close()
    fails(["export", spm, "--to", "gguf", "-o", str(tmp_path / "s.gguf")], "sentencepiece")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".gguf")]


def test_an_unknown_pre_tokenizer_hash_is_still_refused(models, tmp_path):
    fails(["export", models["untied"], "--to", "gguf", "-o", str(tmp_path / "m.gguf")], "byte-level BPE pre-tokenizer (llama.cpp check hash")


# -- (2) a qwen2 .gguf as a base -----------------------------------------------------------------


def write_independently(src: str, out: str) -> str:
    """A qwen2 GGUF written here with gguf's GGUFWriter alone: names from gguf-py's map, the
    rows as stored, the keys llama.cpp's qwen2 reads."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    w = gguf.GGUFWriter(out, "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(20000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for hf, value in state(src).items():
        w.add_tensor(gguf_names(hf), value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_peftcli_reads_an_independently_written_qwen2_gguf(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftcli.attach import load_base_model
    from peftcli.checkpoint.reader import open_checkpoint

    for which in ("untied", "tied"):
        src = models[which]
        path = write_independently(src, str(tmp_path / f"{which}.gguf"))
        source = state(src)
        with open_checkpoint(path) as ckpt:
            assert set(ckpt.tensors) == set(source)
            for hf, value in source.items():
                assert torch.equal(ckpt.get(hf), value), hf
            config = ckpt.config
        assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
        eps = float(np.float32(1e-5))  # GGUF stores it as a float32
        assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (20000.0, eps, which == "tied")
        ours = load_base_model(path)
        assert type(ours).__name__ == "Qwen2ForCausalLM"
        ref = logits_of(AutoModelForCausalLM.from_pretrained(src).eval())
        torch.testing.assert_close(logits_of(ours), ref, rtol=0, atol=1e-6)


def test_a_qwen2_gguf_without_its_biases_is_refused(models, tmp_path):
    from transformers import AutoConfig

    src, path = models["untied"], str(tmp_path / "nobias.gguf")
    cfg = AutoConfig.from_pretrained(src)
    w = gguf.GGUFWriter(path, "qwen2")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 128), (w.add_embedding_length, 64), (w.add_feed_forward_length, 80),
                   (w.add_head_count, 4), (w.add_head_count_kv, 2)):
        add(v)
    for hf, value in state(src).items():
        if not hf.endswith("k_proj.bias"):
            w.add_tensor(gguf_names(hf), value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cfg.num_hidden_layers == 2
    fails(["inspect", path], "no tensor 'blk.0.attn_k.bias'")


def test_inspect_check_and_train_on_a_qwen2_gguf_base(models, tmp_path, qwen_hash, monkeypatch):
    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig
    from peftcli.training import batching, one_pass

    src = models["untied"]
    path = str(tmp_path / "base.gguf")
    export(src, path)
    result = CliRunner().invoke(cli, ["inspect", path, "--json"])
    assert result.exit_code == 0, result.stderr
    assert "Qwen2ForCausalLM" in result.stdout
    result = CliRunner().invoke(cli, ["check", path])
    assert result.exit_code == 0, (result.stdout, result.stderr)

    # the tokenizer transformers builds from the exported metadata encodes as the source's
    from transformers import AutoTokenizer

    text = "w12 w5 ab hello <|im_start|> x\n"
    assert batching.load_tokenizer(path).encode(text) == AutoTokenizer.from_pretrained(src).encode(text)
    # the same tokenizer for both runs (the source's), so both see the same ids; the model is the GGUF's
    real = batching.load_tokenizer
    monkeypatch.setattr(one_pass, "load_tokenizer", lambda p: real(src if p.endswith(".gguf") else p))
    monkeypatch.setattr(batching, "load_tokenizer", lambda p: real(src if p.endswith(".gguf") else p))
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    runs = {}
    for name, base in (("st", src), ("gg", path)):
        run = str(tmp_path / name)
        inject(base, "lora", LoraConfig(rank=4), run)
        result = CliRunner().invoke(cli, ["train", run, "--data", str(data), "--steps", "3", "--batch-size", "4", "--quiet", "--log-every", "1"])
        assert result.exit_code == 0, result.stderr
        runs[name] = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl")) if "loss" in json.loads(line)]
    assert runs["gg"] and runs["gg"] == runs["st"]
    assert open(tmp_path / "gg" / "adapter_model.safetensors", "rb").read() == open(tmp_path / "st" / "adapter_model.safetensors", "rb").read()


# -- (3) export RUN --to gguf on a Qwen2 base ----------------------------------------------------


def test_lora_adapter_on_a_qwen2_base_has_llamacpp_names_and_peft_tensors(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = models["untied"]
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B is zero at init: a permutation of its rows would not show
    run = str(tmp_path / "run")
    model.save_pretrained(run)
    out = str(tmp_path / "a.gguf")
    result = CliRunner().invoke(cli, ["export", run, "--to", "gguf", "--base", base, "-o", out, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["gguf"]["architecture"] == "qwen2"
    fields, tensors = read(out)
    assert fields["general.architecture"] == "qwen2" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 16.0
    peft = load_file(os.path.join(run, "adapter_model.safetensors"))
    want = {}
    for key, value in peft.items():  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        module, kind = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        want[f"{gguf_names(module + '.weight')}.lora_{kind[-1].lower()}"] = value.numpy()
    assert set(tensors) == set(want) and len(want) == 2 * 5 * 2
    for name, value in want.items():
        assert np.array_equal(tensors[name], value), name  # B as PEFT stores it: qwen2's q/k rows are not permuted


def peft_run(base: str, out: str, targets: list[str]) -> str:
    """A PEFT LoRA (r 8, alpha 16) on ``base`` with a random, non-zero lora_B, saved at ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(out, save_embedding_layers=False)  # PEFT would save lm_head's base weight (a saved module) too
    return out


@pytest.mark.parametrize("arch", ["Gemma", "Gemma2", "Gemma3"])
def test_lora_adapter_on_a_gemma_base_has_llamacpp_names_and_peft_tensors(arch, tmp_path):
    """convert_hf_to_gguf's GemmaModel/Gemma2Model/Gemma3Model shift the norms and permute nothing:
    the adapter's tensors are PEFT's, under gguf-py's names for that architecture."""
    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}{'Text' if arch == 'Gemma3' else ''}Config")(
        hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=264, max_position_embeddings=128, tie_word_embeddings=False)  # untied: lm_head is refused even so
    base = str(tmp_path / "base")
    getattr(transformers, f"{arch}ForCausalLM")(cfg).save_pretrained(base)
    run = peft_run(base, str(tmp_path / "run"), ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    out = str(tmp_path / "a.gguf")
    result = CliRunner().invoke(cli, ["export", run, "--to", "gguf", "--base", base, "-o", out])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    fields, tensors = read(out)
    name = arch.lower()
    assert fields["general.architecture"] == name and fields["adapter.lora.alpha"] == 16.0
    mapping = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, name.upper()), 2)
    want = {}
    for key, value in load_file(os.path.join(run, "adapter_model.safetensors")).items():
        module, kind = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        want[f"{mapping.get_name(module + '.weight', try_suffixes=('.weight',))}.lora_{kind[-1].lower()}"] = value.numpy()
    assert set(tensors) == set(want) and len(want) == 20
    for key, value in want.items():
        assert np.array_equal(tensors[key], value), key
    if arch == "Gemma":  # llama.cpp's gemma has no output tensor (the converter skips lm_head): no name for its LoRA
        head = peft_run(base, str(tmp_path / "head"), ["q_proj", "lm_head"])
        fails(["export", head, "--to", "gguf", "--base", base, "-o", str(tmp_path / "h.gguf")], "has no llama.cpp gemma tensor name")


def test_q8_0_keeps_qwen2_biases_and_norms_f32(models, tmp_path, qwen_hash):
    from peftcli.checkpoint.reader import open_checkpoint

    out = str(tmp_path / "q8.gguf")
    doc = export(models["untied"], out, "--outtype", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {n for n, t in types.items() if t == "F32"} == {n for n in types if n.endswith((".bias", "_norm.weight"))}
    assert {n for n, t in types.items() if t == "F16"} == {f"blk.{i}.ffn_down.weight" for i in range(2)}  # rows of 80: not whole blocks
    assert doc["gguf"]["tensor_types"] == {"F16": 2, "F32": 2 * 5 + 1, "Q8_0": 2 * 6 + 2}
    source = state(models["untied"])
    with open_checkpoint(out) as ckpt:
        for hf, value in source.items():
            got = ckpt.get(hf)
            assert got.shape == value.shape
            if value.ndim == 1:
                assert torch.equal(got, value), hf
