"""Trainable tokens as a method of its own (PEFT's TRAINABLE_TOKENS): peftcli's adapter loads in
PEFT with peftcli's logits, PEFT's adapter folds in peftcli as PEFT's merge_and_unload (untied
and tied bases), training changes only the chosen rows, bad input is one line and no output."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from tests.helpers import assert_error, batch, edited_adapter, lm_rows, output_tensor

peft = pytest.importorskip("peft")
IDS = [9, 11, 13]  # the words w5, w7, w9 of the tiny tokenizer (lm_rows uses them)
KEY = "base_model.model.model.embed_tokens.trainable_tokens_delta"
HEAD_KEY = "base_model.model.lm_head.trainable_tokens_delta"


def _inject(base: str, out: str, *args: str):
    return CliRunner().invoke(cli, ["inject", "trainable-tokens", base, "-o", out, "--quiet", *args])


def _seeded_rows(run: str, out: str, seed: int = 3) -> str:
    """Nonzero seeded new rows in peftcli's adapter (the tied head's copy equal to them, as PEFT saves it)."""
    def rows(t: dict) -> None:
        values = torch.randn(t[KEY].shape, generator=torch.Generator().manual_seed(seed))
        for key in (KEY, HEAD_KEY):
            if key in t:
                t[key] = values.clone()

    return edited_adapter(run, out, tensors=rows)


def _causal_lm(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_peftcli_adapter_loads_in_peft_with_peftcli_logits(tiny_llama, tiny_llama_tied, tmp_path, tied):
    from peft import PeftModel

    from peftcli.attach import load_adapted

    base, run = tiny_llama_tied if tied else tiny_llama, str(tmp_path / "run")
    assert _inject(base, run, "--token-indices", ",".join(map(str, IDS))).exit_code == 0
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == IDS
    assert set(load_file(os.path.join(run, "adapter_model.safetensors"))) == ({KEY, HEAD_KEY} if tied else {KEY})
    run = _seeded_rows(run, str(tmp_path / "seeded"))
    inputs = batch()
    inputs["input_ids"][0, :3] = torch.tensor(IDS)  # the new rows are read
    with torch.no_grad():
        ours = output_tensor(load_adapted(base, run)(**inputs))
        theirs = PeftModel.from_pretrained(_causal_lm(base), run).eval()(**inputs).logits
        plain = _causal_lm(base)(**inputs).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the rows matter
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_adapter_merges_as_peft_merge_and_unload(tiny_llama, tiny_llama_tied, tmp_path, tied):
    from peft import TrainableTokensConfig, get_peft_model

    base = tiny_llama_tied if tied else tiny_llama
    model = get_peft_model(_causal_lm(base), TrainableTokensConfig(token_indices=IDS))
    delta = model.base_model.model.model.embed_tokens.trainable_tokens_delta
    with torch.no_grad():
        delta["default"].copy_(torch.randn(delta["default"].shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(str(tmp_path / "peft"))
    reference = model.merge_and_unload()
    expected = reference.get_input_embeddings().weight.detach()
    result = CliRunner().invoke(cli, ["merge", base, str(tmp_path / "peft"), "-o", str(tmp_path / "merged"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(merged["model.embed_tokens.weight"].float(), expected.float(), atol=1e-6, rtol=0)
    base_weight = load_file(os.path.join(base, "model.safetensors"))["model.embed_tokens.weight"]
    changed = (merged["model.embed_tokens.weight"] != base_weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == IDS
    config = json.load(open(tmp_path / "merged" / "config.json"))
    assert ("lm_head.weight" in merged) == (not tied) and config.get("tie_word_embeddings", False) == tied
    if tied:  # loads in transformers with PEFT's merged logits, the head on the replaced rows
        loaded = _causal_lm(str(tmp_path / "merged"))
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
        inputs = batch()
        inputs["input_ids"][0, :3] = torch.tensor(IDS)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_train_changes_only_the_chosen_rows(tiny_llama, tiny_llama_tied, tmp_path, tied):
    base, run = tiny_llama_tied if tied else tiny_llama, str(tmp_path / "run")
    assert _inject(base, run, "--token-indices", ",".join(map(str, IDS))).exit_code == 0
    before = load_file(os.path.join(run, "adapter_model.safetensors"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    result = CliRunner().invoke(cli, ["train", run, "--data", str(data), "--steps", "3", "--batch-size", "4", "--lr", "0.05", "--quiet"])
    assert result.exit_code == 0, result.stderr
    after = load_file(os.path.join(run, "adapter_model.safetensors"))
    assert set(after) == set(before) and not torch.equal(after[KEY], before[KEY])
    if tied:
        assert torch.equal(after[HEAD_KEY], after[KEY])
    result = CliRunner().invoke(cli, ["merge", base, run, "-o", str(tmp_path / "merged"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    merged, stored = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(os.path.join(base, "model.safetensors"))
    assert set(merged) == set(stored)
    for name, t in stored.items():
        if name != "model.embed_tokens.weight":
            assert torch.equal(merged[name], t), name
    rows = (merged["model.embed_tokens.weight"] != stored["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert rows and set(rows) <= set(IDS)
    assert torch.equal(merged["model.embed_tokens.weight"][IDS], after[KEY].to(merged["model.embed_tokens.weight"].dtype))


@pytest.mark.parametrize("ids, message", [("5,256", "token id 256 is not below the 256 rows"), ("", "--token-indices must be comma-separated token ids"),
                                          ("5,5", "lists a token id twice")])
def test_bad_token_ids_are_one_line_and_write_nothing(tiny_llama, tmp_path, ids, message):
    out = str(tmp_path / "run")
    assert_error(_inject(tiny_llama, out, "--token-indices", ids), 2, message, out)


@pytest.mark.parametrize("key, value", [("modules_to_save", ["lm_head"]), ("layers_to_transform", [0]), ("new_peft_option", True)])
def test_a_config_key_on_and_not_implemented_is_refused_by_name(tiny_llama, tmp_path, key, value):
    run = str(tmp_path / "run")
    assert _inject(tiny_llama, run, "--token-indices", "5").exit_code == 0
    bad = edited_adapter(run, tmp_path / "bad", config=lambda c: c.update({key: value}))
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, bad, "-o", out]), 1, key, out)


def test_adapter_token_ids_beyond_the_vocabulary_are_refused(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    assert _inject(tiny_llama, run, "--token-indices", "5").exit_code == 0
    bad = edited_adapter(run, tmp_path / "bad", config=lambda c: c.update({"token_indices": [300]}))
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, bad, "-o", out]), 1, "token id 300 is not below the 256 rows", out)
    empty = edited_adapter(run, tmp_path / "empty", config=lambda c: c.update({"token_indices": []}))
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, empty, "-o", out]), 1, "'token_indices' must be a non-empty list", out)


@pytest.mark.parametrize("tied, targets, warned", [(True, "q_proj,lm_head", "lm_head"), (True, "q_proj,embed_tokens", "model.embed_tokens"),
                                                    (False, "q_proj,embed_tokens", None), (True, "q_proj,v_proj", None)])
def test_lora_on_a_tied_embedding_or_head_warns_once_unless_quiet(tiny_llama, tiny_llama_tied, tmp_path, tied, targets, warned):
    base = tiny_llama_tied if tied else tiny_llama
    result = CliRunner().invoke(cli, ["inject", "lora", base, "-o", str(tmp_path / "a"), "--targets", targets])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "2777" in line]
    assert len(lines) == (1 if warned else 0), result.stderr
    if warned:
        assert lines[0].startswith(f"warning: LoRA on {warned}, ") and "merged ≠ adapted" in lines[0]
        quiet = CliRunner().invoke(cli, ["inject", "lora", base, "-o", str(tmp_path / "b"), "--targets", targets, "--quiet"])
        assert quiet.exit_code == 0 and quiet.stderr == ""
