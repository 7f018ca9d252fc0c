"""Adapters PEFT itself makes with its other LoRA options: merged as PEFT merges them, or refused alike.

Each adapter is built by PEFT (``get_peft_model``, trainable weights moved off their initial
values, ``save_pretrained``) on the tiny models. ``peftcli check`` and ``peftcli merge`` must give
the same verdict: merged, every tensor within 1e-5 of PEFT's ``merge_and_unload`` (and a head
model's logits too); refused, one line naming the option.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from tests.helpers import batch, output_tensor

peft = pytest.importorskip("peft")

# name: (base, head class or None, LoraConfig options)
MERGED = {
    "seq-cls-bert": ("bert", "BertForSequenceClassification", dict(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "seq-cls-llama": ("llama", "LlamaForSequenceClassification", dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])),
    "exclude-names": ("llama", None, dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])),
    "exclude-regex": ("bert", None, dict(target_modules=["query", "value"], exclude_modules=r".*\.1\.attention\.self\.value")),
    "lora-bias": ("bert", None, dict(target_modules=["query", "value"], lora_bias=True)),
    "lora-bias-gpt2": ("gpt2", None, dict(target_modules=["c_attn"], lora_bias=True, fan_in_fan_out=True)),
    "lm-head-lora": ("llama", None, dict(target_modules=["lm_head", "q_proj"])),
    "lm-head-saved": ("llama", None, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    # PEFT matches modules_to_save names as suffixes: it saves model.embed_tokens for "embed_tokens"
    "embed-saved-by-suffix": ("llama", None, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "embedding-lora": ("llama", None, dict(target_modules=["embed_tokens", "q_proj"])),
    # layers_to_transform: PEFT adapts q_proj of layer 0 and skips the embedding (no layer index)
    "embedding-name-with-layers": ("llama", None, dict(target_modules=["embed_tokens", "q_proj"], layers_to_transform=[0])),
    # every linear target excluded: the embedding is all the adapter changes
    "embedding-lora-linear-excluded": ("llama", None, dict(target_modules=["embed_tokens", "q_proj"], exclude_modules=["q_proj"])),
    "embedding-lora-tied": ("llama-tied", None, dict(target_modules=["embed_tokens", "q_proj"])),
    "trainable-tokens": ("llama", None, dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    "trainable-tokens-tied": ("llama-tied", None, dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
}
# name: (base, LoraConfig options, words the one refusal line must hold)
REFUSED = {
    "lora-bias-no-base-bias": ("llama", dict(target_modules=["q_proj", "v_proj"], lora_bias=True), "lora_bias"),
    "lm-head-saved-tied": ("llama-tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save names lm_head"),
    "embedding-dora": ("llama", dict(target_modules=["embed_tokens", "q_proj"], use_dora=True), "use_dora"),
}


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_llama_tied, tiny_bert, tiny_gpt2) -> dict[str, str]:
    return {"llama": tiny_llama, "llama-tied": tiny_llama_tied, "bert": tiny_bert, "gpt2": tiny_gpt2}


def peft_adapter(base: str, out: str, head: str | None = None, **kw) -> str:
    """An adapter made and saved by PEFT, every trainable weight moved off its initial value."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(base, head), peft.LoraConfig(r=4, lora_alpha=8, **kw))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(out)
    return out


def peft_merged(base: str, adapter: str, head: str | None = None):
    """PEFT's reading of the adapter: (merge_and_unload's state dict, its logits on a batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(load_base_model(base, head), adapter).eval()
        merged = model.merge_and_unload()
    with torch.no_grad():
        logits = output_tensor(merged(**batch()))
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, logits


def check_and_merge(base: str, adapter: str, out: str):
    runner = CliRunner()
    checked = runner.invoke(cli, ["check", base, adapter])
    merged = runner.invoke(cli, ["merge", base, adapter, "-o", out])
    return checked, merged


# Tensors a saved module replaces: PEFT's merge writes them as saved, and so must ours, bit for bit
# (θ₀ + (t − θ₀) in floating point is not t).
EXACT = {"lm-head-saved": ("lm_head.weight",), "embed-saved-by-suffix": ("model.embed_tokens.weight",)}


@pytest.mark.parametrize("name", sorted(MERGED))
def test_merged_as_peft_merges(name, bases, tmp_path):
    arch, head, kw = MERGED[name]
    base = bases[arch]
    adapter = peft_adapter(base, str(tmp_path / "adapter"), head, **kw)
    checked, merged = check_and_merge(base, adapter, str(tmp_path / "merged"))
    assert checked.exit_code == 0, checked.output
    assert merged.exit_code == 0, merged.output
    theirs, logits = peft_merged(base, adapter, head)
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    stored = load_file(os.path.join(base, "model.safetensors"))
    changed = 0
    for key, t in ours.items():
        assert key in theirs, key
        assert torch.allclose(t, theirs[key], atol=1e-5), (key, (t - theirs[key]).abs().max())
        if key in EXACT.get(name, ()):
            assert torch.equal(t, theirs[key]), (key, int((t != theirs[key]).sum()))
        was = stored.get(key, stored.get(key.split(".", 1)[-1]))  # a head model names bert.encoder...
        changed += was is not None and not torch.equal(t, was)
    assert changed >= 1
    if head is not None:  # the merged head model computes PEFT's logits
        model = load_base_model(str(tmp_path / "merged"))
        with torch.no_grad():
            assert torch.allclose(output_tensor(model(**batch())), logits, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_alike_naming_the_option(name, bases, tmp_path):
    arch, kw, words = REFUSED[name]
    base = bases[arch]
    adapter = peft_adapter(base, str(tmp_path / "adapter"), **kw)
    checked, merged = check_and_merge(base, adapter, str(tmp_path / "merged"))
    assert checked.exit_code == 1, checked.output
    fail = [line for line in checked.stdout.splitlines() if line.startswith(f"{adapter}: FAIL")]
    assert len(fail) == 1 and words in fail[0] and "another base" not in fail[0], checked.stdout
    assert merged.exit_code == 1 and not os.path.exists(tmp_path / "merged")
    lines = merged.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], merged.stderr
    assert "another base" not in lines[0]


def test_lora_bias_forward_equals_peft(bases, tmp_path):
    """Attached (evaluate's path), lora_B.bias joins the output as in PEFT's forward."""
    base = bases["bert"]
    adapter = peft_adapter(base, str(tmp_path / "a"), target_modules=["query", "value"], lora_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()
    with torch.no_grad():
        want = output_tensor(theirs(**batch()))
        got = output_tensor(load_adapted(base, adapter)(**batch()))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_load_adapted_is_in_eval_mode(bases, tmp_path):
    """Dropout off: two calls on the same inputs give the same logits."""
    base = bases["llama"]
    adapter = peft_adapter(base, str(tmp_path / "a"), target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    model = load_adapted(base, adapter)
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        first, second = (output_tensor(model(**batch())) for _ in range(2))
    assert torch.equal(first, second)


def test_a_trimming_method_trims_a_saved_module_too(bases, tmp_path):
    """Writing a saved module as saved holds for a weighted sum only: TIES keeps half of its change."""
    base = bases["llama"]
    adapter = peft_adapter(base, str(tmp_path / "adapter"), None, **MERGED["lm-head-saved"][2])
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    result = CliRunner().invoke(cli, ["merge", base, adapter, "--method", "ties", "--density", "0.5", "-o", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    got = load_file(str(tmp_path / "t" / "model.safetensors"))["lm_head.weight"]
    was = load_file(os.path.join(base, "model.safetensors"))["lm_head.weight"]
    changed = (got != was).float().mean().item()
    assert not torch.equal(got, saved) and 0.4 < changed < 0.6  # half of the entries moved, as trimmed
