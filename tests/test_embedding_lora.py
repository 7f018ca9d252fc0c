"""PEFT's LoRA on embedding layers and trainable tokens: folded by merge as PEFT's merge_and_unload
folds them (a tied embedding changes once and stays tied), attached with PEFT's forward.

(tests/test_peft_layouts.py compares every merged tensor with PEFT's for the list forms; here:
the merged model's logits, the tied layout, the dict form and what stays refused.)
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from tests.helpers import batch, edited_adapter, output_tensor
from tests.test_peft_layouts import check_and_merge, peft_adapter, peft_merged

peft = pytest.importorskip("peft")

EMBED = "model.embed_tokens.weight"
CASES = {
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
    "tokens-dict": dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [9, 2]}),
    "embedding-only": dict(target_modules=["embed_tokens"]),
}


@pytest.fixture(params=["llama", "llama-tied"])
def base(request, tiny_llama, tiny_llama_tied):
    return {"llama": tiny_llama, "llama-tied": tiny_llama_tied}[request.param]


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_computes_pefts_logits_and_stays_tied(case, base, tmp_path):
    adapter = peft_adapter(base, str(tmp_path / "adapter"), **CASES[case])
    checked, merged = check_and_merge(base, adapter, str(tmp_path / "merged"))
    assert checked.exit_code == 0 and merged.exit_code == 0, (checked.output, merged.output)
    theirs, logits = peft_merged(base, adapter)
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    stored = load_file(os.path.join(base, "model.safetensors"))
    assert set(ours) == set(stored)  # a tied base stays one embedding tensor, no lm_head of its own
    assert not torch.equal(ours[EMBED], stored[EMBED])
    assert torch.allclose(ours[EMBED], theirs[EMBED], atol=1e-5)
    model = load_base_model(str(tmp_path / "merged"))
    tied = json.load(open(os.path.join(base, "config.json"))).get("tie_word_embeddings")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == bool(tied)
    with torch.no_grad():
        assert torch.allclose(output_tensor(model(**batch())), logits, atol=1e-5)


def test_trainable_tokens_replace_exactly_their_rows(tiny_llama, tmp_path):
    """PEFT's saved "delta" is the rows' new value (index_copy), not an addition."""
    adapter = peft_adapter(tiny_llama, str(tmp_path / "adapter"), target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    # new tokens often start near 0: there θ₀ + (t − θ₀) rounds away from t
    saved[key] = torch.randn(saved[key].shape, generator=torch.Generator().manual_seed(3)) * 1e-3
    save_file(saved, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    rows = saved[key]
    assert CliRunner().invoke(cli, ["merge", tiny_llama, adapter, "-o", str(tmp_path / "m")]).exit_code == 0
    got = load_file(str(tmp_path / "m" / "model.safetensors"))[EMBED]
    was = load_file(os.path.join(tiny_llama, "model.safetensors"))[EMBED]
    assert torch.equal(got[[3, 5, 7]], rows)  # written as saved: θ₀ + (t − θ₀) would round
    others = [i for i in range(was.shape[0]) if i not in (3, 5, 7)]
    assert torch.equal(got[others], was[others])


@pytest.mark.parametrize("case", sorted(CASES))
def test_attach_computes_pefts_unmerged_logits(case, base, tmp_path):
    """Attached (evaluate, train), not merged: PEFT's forward, where a tied lm_head keeps the
    base weight under LoRA on the embedding and reads the new rows of trainable tokens."""
    adapter = peft_adapter(base, str(tmp_path / "adapter"), **CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()
    with torch.no_grad():
        assert torch.allclose(output_tensor(load_adapted(base, adapter)(**batch())), output_tensor(theirs(**batch())), atol=1e-5)


def test_token_ids_beyond_the_vocabulary_are_refused_by_check_and_merge(tiny_llama, tmp_path):
    adapter = peft_adapter(tiny_llama, str(tmp_path / "adapter"), target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])
    bad = edited_adapter(adapter, tmp_path / "bad", config=lambda c: c.update(trainable_token_indices=[3, 5, 999]))
    checked, merged = check_and_merge(tiny_llama, bad, str(tmp_path / "merged"))
    assert checked.exit_code == 1 and "trainable_token_indices" in checked.stdout, checked.stdout
    lines = merged.stderr.strip().splitlines()
    assert merged.exit_code == 1 and len(lines) == 1 and "trainable_token_indices" in lines[0], merged.stderr
    assert not os.path.exists(tmp_path / "merged")
