"""inject and train LoRA on embeddings, on lm_head (tied too) and trainable tokens, in PEFT's
layout: PEFT loads what inject writes and computes peftcli's logits; peftcli's merge is PEFT's
merge_and_unload, and the merged config's tie flag is true to its tensors; training trains
exactly the named rows.

(tests/test_embedding_lora.py: the same options read from adapters PEFT made.)
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
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import assert_error, batch, lm_rows, output_tensor
from tests.test_peft_layouts import peft_merged

peft = pytest.importorskip("peft")

EMBED = "model.embed_tokens.weight"
TOKENS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
IDS = [int(i) for i in batch()["input_ids"].flatten().unique()[:3]]  # rows the batch reads
CASES = {
    "embedding": ["--targets", "q_proj,embed_tokens"],
    "lm-head": ["--targets", "q_proj,lm_head"],
    "embedding-and-lm-head": ["--targets", "embed_tokens,lm_head"],
    "tokens": ["--targets", "q_proj", "--trainable-tokens", ",".join(map(str, IDS))],
    "tokens-dict": ["--targets", "v_proj", "--trainable-tokens", f"embed_tokens={IDS[2]},{IDS[0]}"],
}


# LoRA on an untied lm_head is a linear target inject always took (the training test covers its keys)
PAIRS = [(arch, case) for arch in ("llama", "llama-tied") for case in sorted(CASES) if (arch, case) != ("llama", "lm-head")]


@pytest.fixture(params=["llama", "llama-tied"])
def base(request, tiny_llama, tiny_llama_tied):
    return {"llama": tiny_llama, "llama-tied": tiny_llama_tied}[request.param]


def _base(arch: str, request) -> str:
    return request.getfixturevalue({"llama": "tiny_llama", "llama-tied": "tiny_llama_tied"}[arch])


def _inject(base: str, out: str, *flags: str) -> str:
    result = CliRunner().invoke(cli, ["inject", "lora", "--rank", "4", *flags, base, "-o", out])
    assert result.exit_code == 0, result.output
    return out


def _randomised(adapter: str) -> dict:
    """Every φ tensor moved off its initial value (A = 0 and tokens = their rows would make the
    comparisons vacuous), saved back; the tensors."""
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(7)
    tensors = {k: t + torch.randn(t.shape, generator=g) * 0.1 for k, t in sorted(tensors.items())}
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def _peft_logits(base: str, adapter: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()
    with torch.no_grad():
        return output_tensor(model(**batch()))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**batch()))


@pytest.mark.parametrize("arch, case", PAIRS)
def test_injected_adapter_loads_in_peft_with_peftclis_logits(arch, case, request, tmp_path):
    base = _base(arch, request)
    adapter = _inject(base, str(tmp_path / "adapter"), *CASES[case])
    keys = set(_randomised(adapter))
    written = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert ("trainable_token_indices" in written) == case.startswith("tokens")
    assert any("embed_tokens" in k or "lm_head" in k for k in keys)
    ours = _logits(load_adapted(base, adapter))
    assert not torch.allclose(ours, _logits(load_base_model(base)), atol=1e-3)  # the adapter changes the output
    assert torch.allclose(ours, _peft_logits(base, adapter), atol=1e-5)


@pytest.mark.parametrize("arch, case", PAIRS)
def test_merge_is_pefts_and_the_tie_flag_true_to_the_tensors(arch, case, request, tmp_path):
    base = _base(arch, request)
    adapter = _inject(base, str(tmp_path / "adapter"), *CASES[case])
    _randomised(adapter)
    merged = CliRunner().invoke(cli, ["merge", base, adapter, "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    theirs, logits = peft_merged(base, adapter)
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    stored = load_file(os.path.join(base, "model.safetensors"))
    assert set(ours) == set(stored)
    for key, t in ours.items():
        assert torch.allclose(t.float(), theirs[key].float(), atol=1e-5), key
    tied = json.load(open(tmp_path / "merged" / "config.json")).get("tie_word_embeddings", True)
    head = ours.get("lm_head.weight")
    # true to the tensors: tied means one tensor (no lm_head of its own), untied two
    assert tied == (head is None)
    assert tied == json.load(open(os.path.join(base, "config.json"))).get("tie_word_embeddings", True)
    if not tied and case.startswith(("embedding", "tokens")):
        assert torch.equal(head, stored["lm_head.weight"]) != (case == "embedding-and-lm-head")
    model = load_base_model(str(tmp_path / "merged"))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert torch.allclose(_logits(model), logits, atol=1e-5)


def _train(base: str, run: str, tmp_path, *flags: str) -> tuple[dict, dict]:
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    _inject(base, run, *flags)
    before = load_file(os.path.join(run, "adapter_model.safetensors"))
    train(run, TrainConfig(data=str(data), steps=2, batch_size=4, lr=1e-2))
    return before, load_file(os.path.join(run, "adapter_model.safetensors"))


def test_training_changes_only_the_named_rows(base, tmp_path):
    from transformers import AutoTokenizer

    words = AutoTokenizer.from_pretrained(base)(lm_rows(1)[0]["text"])["input_ids"]
    rows = sorted(set(words))[:3]  # ids the data holds: their rows get gradients as inputs too
    before, after = _train(base, str(tmp_path / "run"), tmp_path, "--targets", "q_proj", "--trainable-tokens", ",".join(map(str, rows)))
    stored = load_file(os.path.join(base, "model.safetensors"))
    assert torch.equal(before[TOKENS], stored[EMBED][rows].float())  # PEFT's init: the rows as they are
    assert not torch.equal(after[TOKENS], before[TOKENS])
    merged = CliRunner().invoke(cli, ["merge", base, str(tmp_path / "run"), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    others = [i for i in range(stored[EMBED].shape[0]) if i not in rows]
    assert torch.equal(got[EMBED][others], stored[EMBED][others])
    assert torch.equal(got[EMBED][rows], after[TOKENS].to(got[EMBED].dtype))
    if "lm_head.weight" in stored:
        assert torch.equal(got["lm_head.weight"], stored["lm_head.weight"])


def test_training_trains_lora_on_the_embedding_and_lm_head(base, tmp_path):
    before, after = _train(base, str(tmp_path / "run"), tmp_path, "--targets", "embed_tokens,lm_head")
    a = "base_model.model.model.embed_tokens.lora_embedding_A"
    assert not before[a].any() and before[a.replace("_A", "_B")].std() > 0.5  # PEFT's init: A zeros, B N(0, 1)
    assert not before["base_model.model.lm_head.lora_B.weight"].any()
    assert set(after) == set(before)
    for key in (a, "base_model.model.lm_head.lora_B.weight"):
        assert not torch.equal(after[key], before[key]), key
    run = str(tmp_path / "run")
    assert torch.allclose(_logits(load_adapted(base, run)), _peft_logits(base, run), atol=1e-5)  # PEFT finds every key


@pytest.mark.parametrize("flags, message", [
    (["--targets", "embed_tokens", "--dora"], "takes plain LoRA only"),
    (["--targets", "q_proj,embed_tokens", "--layers", "0"], "which is in no layer that --layers selects"),
    (["--targets", "embed_tokens", "--trainable-tokens", "3"], "whose rows --trainable-tokens trains whole"),
    (["--trainable-tokens", "3,x"], "--trainable-tokens must be token ids"),
    (["--trainable-tokens", "3,3"], "lists a token id twice"),
    (["--trainable-tokens", "3,999"], "token ids must be distinct and below its 256 rows"),
    (["--trainable-tokens", "lm_head=3"], "--trainable-tokens names lm_head, which is no embedding of this base"),
    (["--targets", "embed_tokens,q_proj", "--rank-pattern", "embed.*=2"], "--rank-pattern regex 'embed.*' selects the embedding model.embed_tokens"),
])
def test_bad_embedding_options_are_refused(flags, message, tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["inject", "lora", *flags, tiny_llama, "-o", str(tmp_path / "out")])
    assert_error(result, 2, message)  # the user's flags: usage errors, not an adapter made for another base
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("scale", [2.5, "buffer"])
def test_a_scaled_embeddings_lora_is_scaled_like_its_lookup(scale):
    """Gemma keeps embed_scale as a buffer, BioGPT and BART as a Python float: LoRA's lookup is
    scaled by it either way (PEFT's _get_embed_scale), never a crash on the float."""
    from peftcli.methods.lora.embedding_layers import LoraEmbedding

    class Scaled(torch.nn.Embedding):
        def forward(self, x):
            return super().forward(x) * self.embed_scale

    base = Scaled(10, 4)
    if scale == "buffer":
        base.register_buffer("embed_scale", torch.tensor(1.5))
    else:
        base.embed_scale = scale
    g = torch.Generator().manual_seed(0)
    layer = LoraEmbedding(base, rank=2, scaling=0.5)
    a, b = torch.randn(2, 10, generator=g), torch.randn(4, 2, generator=g)
    layer.load_phi(a, b)
    x = torch.tensor([[1, 3, 7]])
    factor = float(base.embed_scale)
    expected = (base.weight[x] + 0.5 * (b @ a).T[x]) * factor  # the scaled lookup of W + s·(B·A)ᵀ
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("flags", [["--targets", "q_proj", "--trainable-tokens", "5,6,7"], ["--targets", "q_proj,lm_head"]])
def test_a_tied_base_storing_both_heads_is_not_merged_into_two_heads(flags, tiny_llama_tied, tmp_path):
    """A tied config over a checkpoint that stores lm_head.weight too (equal to the embedding):
    a merge changing one of them would write a tied config over two different tensors, which
    transformers unties on load. Refused, nothing written."""
    import shutil

    base = str(tmp_path / "both")
    shutil.copytree(tiny_llama_tied, base)
    tensors = load_file(os.path.join(base, "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(base, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    run = str(tmp_path / "run")
    assert CliRunner().invoke(cli, ["inject", "lora", base, *flags, "-o", run]).exit_code == 0
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", base, run, "-o", out]), 1, "the merged config would tie two different heads", out)


def test_lora_on_a_tied_head_beside_trainable_tokens_of_its_embedding_is_refused_at_inject(tiny_llama_tied, tmp_path):
    """merge and train refuse the pair (one tensor, changed two ways): inject says so first."""
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", tiny_llama_tied, "--targets", "q_proj,lm_head", "--trainable-tokens", "3,4", "-o", out])
    assert_error(result, 2, "puts LoRA on lm_head, tied to model.embed_tokens", out)
