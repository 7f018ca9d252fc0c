"""peftcli merge of full checkpoints whose vocabularies differ: refused by default, merged by token
with `--tokenizer-source base|union|MODEL` (mergekit's rule for the rows a model lacks)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.checkpoint.reader import open_checkpoint

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _variant(base: str, out: str, added: list[str], seed: int, scale: float = 0.05) -> str:
    """A fine-tune of ``base`` with ``added`` tokens: the tokenizer extended, the embeddings resized
    (the new rows random), every tensor plus seeded noise."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(base)
    model = tf.AutoModelForCausalLM.from_pretrained(base)
    if added:
        tok.add_tokens(added)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    a = _variant(tiny_llama, str(d / "a"), ["x0", "x1", "x2", "x3"], seed=1)  # 4 added tokens: 260
    b = _variant(tiny_llama, str(d / "b"), ["x2", "x3", "x9"], seed=2)  # 2 shared with a, at other ids
    same = _variant(tiny_llama, str(d / "same"), [], seed=3)  # the base's vocabulary
    return {"base": tiny_llama, "a": a, "b": b, "same": same}


def _vocab(path: str) -> dict[str, int]:
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(path).get_vocab()


def _tensors(path: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.get(n).clone() for n in ckpt}


def _merge(*args: str):
    return CliRunner().invoke(cli, ["merge", *args])


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_differing_rows_refused_naming_sizes(models, tmp_path):
    out = tmp_path / "out"
    result = _merge(models["base"], models["a"], "-o", str(out))
    _one_line_error(result, "260", "256", "lm_head.weight", "--tokenizer-source base|union|MODEL")
    assert result.exit_code == 1 and not out.exists()  # the files disagree: a wrong input


def test_same_shape_other_tokenizer_refused(models, tmp_path):
    """Equal shapes, but the tokenizer gives another token at an id: a row-by-row merge would mix tokens."""
    other = tmp_path / "swapped"
    os.makedirs(other)
    for name in os.listdir(models["same"]):
        data = open(os.path.join(models["same"], name), "rb").read()
        if name == "tokenizer.json":
            doc = json.loads(data)
            vocab = doc["model"]["vocab"]
            vocab["w0"], vocab["w1"] = vocab["w1"], vocab["w0"]
            data = json.dumps(doc).encode()
        (other / name).write_bytes(data)
    out = tmp_path / "out"
    result = _merge(models["base"], str(other), "-o", str(out))
    _one_line_error(result, "'w0'", "--tokenizer-source")
    assert result.exit_code == 1 and not out.exists()
    assert _merge(models["base"], models["same"], "-o", str(out)).exit_code == 0  # the same tokenizer merges as before


def _reference(models, names, weights, out_vocab, rows):
    """fp64 task arithmetic by token, with mergekit's rows for missing tokens, written from its rule."""
    vocabs = {k: _vocab(models[k]) for k in names}
    tensors = {k: _tensors(models[k]) for k in names}
    ref = {}
    for t in (EMBED, HEAD):
        out = torch.zeros((rows, tensors["base"][t].shape[1]), dtype=torch.float64)
        for token, i in out_vocab.items():
            have = {k: tensors[k][t][vocabs[k][token]].double() for k in names if token in vocabs[k]}
            if len(have) == 1:
                fill = next(iter(have.values()))
            elif "base" in have:
                fill = have["base"]
            else:
                fill = torch.stack(list(have.values())).mean(dim=0)
            row = {k: have.get(k, fill) for k in names}
            out[i] = row["base"] + sum(w * (row[k] - row["base"]) for k, w in zip(names[1:], weights))
        ref[t] = out
    return ref, tensors


def test_base_source_keeps_base_vocab_and_merges_rows_by_token(models, tmp_path):
    out = str(tmp_path / "out")
    result = _merge(models["base"], models["a"], models["b"], "--weights", "0.6,0.7", "--tokenizer-source", "base", "-o", out)
    assert result.exit_code == 0, result.output
    base_vocab = _vocab(models["base"])
    ref, tensors = _reference(models, ["base", "a", "b"], [0.6, 0.7], base_vocab, 256)
    merged = _tensors(out)
    for t in (EMBED, HEAD):
        assert merged[t].shape == (256, 64)
        torch.testing.assert_close(merged[t].double(), ref[t], rtol=0, atol=1e-6)
    # a token every model has at the same id: the plain linear merge of that row
    i = base_vocab["w7"]
    plain = tensors["base"][EMBED][i] + 0.6 * (tensors["a"][EMBED][i] - tensors["base"][EMBED][i]) + 0.7 * (tensors["b"][EMBED][i] - tensors["base"][EMBED][i])
    torch.testing.assert_close(merged[EMBED][i], plain, rtol=0, atol=1e-6)
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 256
    assert open(os.path.join(out, "tokenizer.json"), "rb").read() == open(os.path.join(models["base"], "tokenizer.json"), "rb").read()


def test_union_has_every_token_rows_by_mergekit_rule(models, tmp_path):
    import transformers as tf

    out = str(tmp_path / "out")
    result = _merge(models["base"], models["a"], models["b"], "--weights", "0.6,0.7", "--tokenizer-source", "union", "-o", out)
    assert result.exit_code == 0, result.output
    tok = tf.AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert set(vocab) == set(_vocab(models["base"])) | {"x0", "x1", "x2", "x3", "x9"} and len(vocab) == 261
    assert all(vocab[t] == i for t, i in _vocab(models["base"]).items())  # the base's ids kept
    ref, tensors = _reference(models, ["base", "a", "b"], [0.6, 0.7], vocab, 261)
    merged = _tensors(out)
    for t in (EMBED, HEAD):
        assert merged[t].shape == (261, 64)
        torch.testing.assert_close(merged[t].double(), ref[t], rtol=0, atol=1e-6)
    va, vb = _vocab(models["a"]), _vocab(models["b"])
    # a token only a has keeps a's row exactly; one a and b share (not the base) is their mean
    # moved by each one's task vector from it
    assert torch.equal(merged[EMBED][vocab["x0"]], tensors["a"][EMBED][va["x0"]])
    assert torch.equal(merged[HEAD][vocab["x9"]], tensors["b"][HEAD][vb["x9"]])
    ra, rb = tensors["a"][EMBED][va["x2"]].double(), tensors["b"][EMBED][vb["x2"]].double()
    mean = (ra + rb) / 2
    torch.testing.assert_close(merged[EMBED][vocab["x2"]].double(), mean + 0.6 * (ra - mean) + 0.7 * (rb - mean), rtol=0, atol=1e-6)
    # it loads, and the tokenizer gives the added tokens the ids whose rows were written
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 261
    with open_checkpoint(out) as ckpt:
        provenance = json.loads(ckpt.metadata["peftcli.merge"])
    assert (provenance["tokenizer_source"], provenance["vocab_size"]) == ("union", 261)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (261, 64)
    ids = tok("w3 x0 x9 x2", add_special_tokens=False)["input_ids"]
    assert ids == [vocab["w3"], vocab["x0"], vocab["x9"], vocab["x2"]]
    torch.testing.assert_close(model.get_input_embeddings().weight[ids[1]], tensors["a"][EMBED][va["x0"]], rtol=0, atol=0)
    # untied stays untied: the head loads as its own merged tensor, not as the embedding
    assert json.load(open(os.path.join(out, "config.json"))).get("tie_word_embeddings") is not True
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight.detach(), merged[HEAD], rtol=0, atol=0)


def test_model_source_takes_that_models_vocabulary(models, tmp_path):
    out = str(tmp_path / "out")
    result = _merge(models["base"], models["a"], models["same"], "--tokenizer-source", models["a"], "-o", out)
    assert result.exit_code == 0, result.output
    va = _vocab(models["a"])
    ref, _ = _reference(models, ["base", "a", "same"], [1.0, 1.0], va, 260)
    merged = _tensors(out)
    torch.testing.assert_close(merged[EMBED].double(), ref[EMBED], rtol=0, atol=1e-6)
    assert open(os.path.join(out, "tokenizer.json"), "rb").read() == open(os.path.join(models["a"], "tokenizer.json"), "rb").read()
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 260


def test_tied_embeddings_stay_tied(tiny_llama_tied, tmp_path):
    import transformers as tf

    a = _variant(tiny_llama_tied, str(tmp_path / "a"), ["x0", "x1"], seed=4)
    out = str(tmp_path / "out")
    result = _merge(tiny_llama_tied, a, "--tokenizer-source", "union", "-o", out)
    assert result.exit_code == 0, result.output
    merged = _tensors(out)
    assert HEAD not in merged and merged[EMBED].shape == (258, 64)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_mergekit_yaml_union_equals_flags(models, tmp_path):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\ntokenizer_source: union\nmodels:\n"
        f"  - model: {models['a']}\n    parameters: {{weight: 0.6}}\n  - model: {models['b']}\n    parameters: {{weight: 0.7}}\n"
    )
    yml, flags = str(tmp_path / "yml"), str(tmp_path / "flags")
    assert _merge("--config", str(cfg), "-o", yml).exit_code == 0
    result = _merge(models["base"], models["a"], models["b"], "--weights", "0.6,0.7", "--tokenizer-source", "union", "-o", flags)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(yml)) == sorted(os.listdir(flags))
    for name in os.listdir(flags):  # weights (and their provenance), tokenizer, config: byte for byte
        assert open(os.path.join(yml, name), "rb").read() == open(os.path.join(flags, name), "rb").read(), name


def test_source_not_among_inputs_refused(models, tmp_path):
    out = tmp_path / "out"
    result = _merge(models["base"], models["a"], "--tokenizer-source", models["same"], "-o", str(out))
    _one_line_error(result, "none of the merged models")
    assert not out.exists()


def test_missing_tokenizer_refused(models, tmp_path):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(models["a"]):
        if not name.startswith("tokenizer"):
            (bare / name).write_bytes(open(os.path.join(models["a"], name), "rb").read())
    out = tmp_path / "out"
    result = _merge(models["base"], str(bare), "--tokenizer-source", "union", "-o", str(out))
    _one_line_error(result, "no tokenizer.json", str(bare))
    assert result.exit_code == 1 and not out.exists()


def test_new_tokenizer_needs_a_directory(models, tmp_path):
    """A single .safetensors file has no room for the union's tokenizer: refused, not written without it."""
    out = tmp_path / "merged.safetensors"
    result = _merge(models["base"], models["a"], "--tokenizer-source", "union", "-o", str(out))
    _one_line_error(result, "model directory", "--tokenizer-source")
    assert not out.exists()
    ok = _merge(models["base"], models["a"], "--tokenizer-source", "base", "-o", str(out))  # the base's vocabulary: a file will do
    assert ok.exit_code == 0, ok.output
    assert _tensors(str(out))[EMBED].shape == (256, 64)


def test_diff_input_not_merged_by_token(models, tmp_path):
    diff = str(tmp_path / "same.diff")
    assert CliRunner().invoke(cli, ["diff", models["base"], models["same"], "-o", diff, "--dense"]).exit_code == 0
    out = tmp_path / "out"
    result = _merge(models["base"], models["a"], diff, "--tokenizer-source", "union", "-o", str(out))
    _one_line_error(result, "same.diff", "full checkpoints")
    assert not out.exists()


def test_padding_rows_keep_the_sources(models, tmp_path):
    """A base padded to 260 rows with 256 tokens, an input whose 4 added tokens fill those ids: the same
    shapes, so only the tokenizers tell them apart; with `base` the padding rows stay the base's."""
    import transformers as tf

    padded = str(tmp_path / "padded")
    model = tf.AutoModelForCausalLM.from_pretrained(models["base"])
    model.resize_token_embeddings(260, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[256:] = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    model.save_pretrained(padded)
    tf.AutoTokenizer.from_pretrained(models["base"]).save_pretrained(padded)
    out = tmp_path / "out"
    _one_line_error(_merge(padded, models["a"], "-o", str(out)), "'x0'", "--tokenizer-source")
    result = _merge(padded, models["a"], "--tokenizer-source", "base", "-o", str(out))
    assert result.exit_code == 0, result.output
    merged, base, a = _tensors(str(out)), _tensors(padded), _tensors(models["a"])
    assert torch.equal(merged[EMBED][256:], base[EMBED][256:])  # not a's x0..x3
    torch.testing.assert_close(merged[EMBED][:256], a[EMBED][:256], rtol=0, atol=1e-6)  # θ₀ + (θ_a − θ₀)


def test_recipe_step_takes_tokenizer_source(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"steps:\n  merge: {{base: '{models['base']}', inputs: ['{models['a']}', '{models['b']}'], weights: '0.6,0.7', "
        f"tokenizer_source: union, output: m}}\n"
    )
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", "wd", "--quiet"])
    assert result.exit_code == 0, result.output
    flags = str(tmp_path / "flags")
    assert _merge(models["base"], models["a"], models["b"], "--weights", "0.6,0.7", "--tokenizer-source", "union", "-o", flags).exit_code == 0
    got, want = _tensors(str(tmp_path / "wd" / "m")), _tensors(flags)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert open(tmp_path / "wd" / "m" / "tokenizer.json", "rb").read() == open(os.path.join(flags, "tokenizer.json"), "rb").read()


def test_unknown_per_token_tensor_refused(models, tmp_path):
    """A tensor with one entry per token that is neither an embedding nor a head is not guessed at."""
    import shutil

    from safetensors.torch import save_file

    odd = tmp_path / "odd"
    shutil.copytree(models["base"], odd)
    sd = _tensors(models["base"])
    sd["model.token_scale"] = torch.ones(256)
    save_file(sd, str(odd / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = _merge(str(odd), models["a"], "--tokenizer-source", "union", "-o", str(out))
    _one_line_error(result, "'model.token_scale'", "256 rows")
    assert not out.exists()


def test_model_source_moves_the_special_token_ids_to_its_vocabulary(models, tmp_path):
    """The base's eos/bos/pad ids must name the same tokens in MODEL's numbering (config.json and
    generation_config.json), never the ids of other tokens."""
    import transformers as tf

    swapped = tmp_path / "swapped"
    os.makedirs(swapped)
    base_tok = tf.AutoTokenizer.from_pretrained(models["base"])
    eos = base_tok.eos_token
    for name in os.listdir(models["same"]):
        data = open(os.path.join(models["same"], name), "rb").read()
        if name == "tokenizer.json":  # eos and the plain token w0 trade ids
            doc = json.loads(data)
            vocab, w0_id, eos_id = doc["model"]["vocab"], doc["model"]["vocab"]["w0"], base_tok.eos_token_id
            for added in doc["added_tokens"]:
                if added["content"] == eos:
                    added["id"] = w0_id
            if eos in vocab:
                vocab[eos] = w0_id
            vocab["w0"] = eos_id
            data = json.dumps(doc).encode()
        (swapped / name).write_bytes(data)
    out = tmp_path / "out"
    result = _merge(models["base"], str(swapped), "--tokenizer-source", str(swapped), "-o", str(out))
    assert result.exit_code == 0, result.output
    written = tf.AutoTokenizer.from_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert written.convert_ids_to_tokens(config["eos_token_id"]) == eos
    generation = out / "generation_config.json"
    if generation.exists() and "eos_token_id" in json.loads(generation.read_text()):
        assert written.convert_ids_to_tokens(json.loads(generation.read_text())["eos_token_id"]) == eos


def test_an_input_whose_tokenizer_files_cannot_be_compared_is_refused(models, tmp_path):
    """Rows of the base's count may still name other tokens: an input whose tokenizer shares no
    file with the base's, or whose shared file differs, is refused; one saved with no tokenizer is
    taken to use the base's."""
    bare, other = tmp_path / "bare", tmp_path / "other"
    for d in (bare, other):
        os.makedirs(d)
        for name in os.listdir(models["same"]):
            if name != "tokenizer.json":
                (d / name).write_bytes(open(os.path.join(models["same"], name), "rb").read())
    (other / "vocab.json").write_text(json.dumps({"w0": 1, "w1": 0}))
    out = tmp_path / "out"
    result = _merge(models["base"], str(other), "-o", str(out))
    _one_line_error(result, "cannot tell whether", "vocab.json", "--tokenizer-source")
    assert result.exit_code == 1 and not out.exists()
    (other / "tokenizer.model").write_bytes(b"one")
    base_copy = tmp_path / "base"
    os.makedirs(base_copy)
    for name in os.listdir(models["base"]):
        (base_copy / name).write_bytes(open(os.path.join(models["base"], name), "rb").read())
    (base_copy / "tokenizer.model").write_bytes(b"two")
    result = _merge(str(base_copy), str(other), "-o", str(out))
    _one_line_error(result, "tokenizer.model is not the base's")
    assert not out.exists()
    assert _merge(models["base"], str(bare), "-o", str(out)).exit_code == 0  # no tokenizer: the base's


def test_a_malformed_base_tokenizer_is_refused_whatever_the_inputs(tiny_llama, tmp_path):
    """The merge copies the base's tokenizer.json to the output, so it is read and checked even
    when no input has a tokenizer of its own (an adapter) or the input's is the same bytes."""
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(tiny_llama, bad)
    path = os.path.join(bad, "tokenizer.json")
    tok = json.load(open(path))
    tok["model"]["vocab"][list(tok["model"]["vocab"])[-1]] = "oops"  # the last: not also an added token
    json.dump(tok, open(path, "w"))
    same = str(tmp_path / "same")
    shutil.copytree(bad, same)
    lora = str(tmp_path / "lora")
    assert CliRunner().invoke(cli, ["inject", "lora", "--rank", "2", tiny_llama, "-o", lora, "--quiet"]).exit_code == 0
    for i, inp in enumerate([lora, same]):
        out = tmp_path / f"out{i}"
        _one_line_error(_merge(bad, inp, "-o", str(out)), "tokenizer.json")
        assert not out.exists()
