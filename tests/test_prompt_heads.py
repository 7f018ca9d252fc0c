"""Prompt and prefix tuning with a trained classification head: written as PEFT writes it.

PEFT's prompt-learning models wrap the transformers model directly, so a trained head is saved
as ``base_model.classifier.weight`` (LoRA's: ``base_model.model.classifier.weight``). A run
peftcli trains is loaded by ``PeftModel.from_pretrained`` with peftcli's logits; an adapter PEFT
trains is evaluated by peftcli with PEFT's logits; runs written in the old layout still load.
"""

from __future__ import annotations

import json
import os
import random
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcli.attach import load_base_model
from peftcli.evaluation import EvalOptions, _load, _predictions
from peftcli.injection import inject
from peftcli.methods.prompting.prefix import PrefixTuningConfig
from peftcli.methods.prompting.prompt import PromptTuningConfig
from peftcli.training.batching import collate, encode, load_tokenizer
from peftcli.training.config import TrainConfig
from peftcli.training.data import load_dataset
from peftcli.training.loop import train
from tests.helpers import randomize_

peft = pytest.importorskip("peft")

LABELS = ["neg", "pos"]
HEAD = {"bert": "classifier", "llama": "score"}
CONFIGS = {"prompt": PromptTuningConfig(virtual_tokens=3), "prefix": PrefixTuningConfig(virtual_tokens=3)}


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    rng = random.Random(0)
    rows = [{"text": f"{'w1' if i % 2 else 'w2'} " + " ".join(f"w{rng.randint(5, 60)}" for _ in range(4)), "label": LABELS[i % 2]} for i in range(24)]
    path = d / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def bases(tiny_bert, tiny_llama):
    return {"bert": tiny_bert, "llama": tiny_llama}


def _trained(base: str, method: str, data: str, run: str) -> str:
    inject(base, method, CONFIGS[method], run, seed=1)
    train(run, TrainConfig(data=data, steps=3, batch_size=8, lr=5e-2))
    return run


def _peftcli_logits(run: str, data: str, base: str) -> tuple[torch.Tensor, dict]:
    """The logits ``peftcli evaluate`` computes, and the batch it computes them on."""
    opts = EvalOptions(data=data, base=base, batch_size=64, device="cpu")
    tokenizer = load_tokenizer(base)
    items = encode(load_dataset(data), tokenizer, 128, LABELS)
    loaded = _load(run, opts, "classify", LABELS, tokenizer.pad_token_id)
    _, logits = _predictions(loaded, items, tokenizer.pad_token_id, 64, torch.device("cpu"), "classify")
    batch = collate(items, tokenizer.pad_token_id, loaded.left_pad)
    batch.pop("labels")
    return logits, batch


def _peft_model(base: str, adapter: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_base_model(base, "AutoModelForSequenceClassification", num_labels=len(LABELS))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(base).pad_token_id
        return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prompt_run_with_a_head_loads_in_peft_with_peftclis_logits(arch, bases, cls_data, tmp_path):
    base = bases[arch]
    run = _trained(base, "prompt", cls_data, str(tmp_path / "run"))
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    assert f"base_model.{HEAD[arch]}.weight" in saved and not any(k.startswith("base_model.model.") for k in saved)
    ours, batch = _peftcli_logits(run, cls_data, base)
    with torch.no_grad():
        theirs = _peft_model(base, run)(**batch).logits
    assert torch.allclose(ours, theirs.float(), atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prefix_run_with_a_head_loads_in_peft_with_its_weights(arch, bases, cls_data, tmp_path):
    """PEFT 0.21 loads a SEQ_CLS prefix adapter but refuses its forward on transformers 5
    ("does not support past key values"), so the comparison is of what it loaded: the trained
    head in the head model and the prefix in the prompt encoder."""
    base = bases[arch]
    run = _trained(base, "prefix", cls_data, str(tmp_path / "run"))
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    theirs = _peft_model(base, run)
    head = theirs.base_model.get_submodule(HEAD[arch])
    trained_head = {k: v for k, v in saved.items() if k.startswith(f"base_model.{HEAD[arch]}.")}
    assert trained_head and not any(k.startswith("base_model.model.") for k in saved)
    for key, t in trained_head.items():
        assert torch.equal(head.get_parameter(key.rsplit(".", 1)[-1]).detach(), t), key
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight.detach(), saved["prompt_embeddings"])
    # peftcli's evaluate reads the same head back (logits from the trained head, not a new one).
    ours, _ = _peftcli_logits(run, cls_data, base)
    assert ours.shape == (24, 2)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_runs_written_in_the_old_layout_still_evaluate(method, tiny_bert, cls_data, tmp_path):
    run = _trained(tiny_bert, method, cls_data, str(tmp_path / "run"))
    want, _ = _peftcli_logits(run, cls_data, tiny_bert)
    weights = os.path.join(run, "adapter_model.safetensors")
    old = {("base_model.model." + k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in load_file(weights).items()}
    assert "base_model.model.classifier.weight" in old
    os.unlink(weights)
    save_file(old, weights)
    got, _ = _peftcli_logits(run, cls_data, tiny_bert)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peft_prompt_adapter_with_a_trained_head_is_evaluated_with_pefts_logits(arch, bases, cls_data, tmp_path):
    base = bases[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = load_base_model(base, "AutoModelForSequenceClassification", num_labels=len(LABELS))
        model.config.pad_token_id = load_tokenizer(base).pad_token_id
        made = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
        randomize_([p for _, p in sorted(made.named_parameters()) if p.requires_grad], scale=0.5)
        made.save_pretrained(str(tmp_path / "peft"))
    (tmp_path / "peft" / "labels.json").write_text(json.dumps({"labels": LABELS}))
    ours, batch = _peftcli_logits(str(tmp_path / "peft"), cls_data, base)
    with torch.no_grad():
        theirs = made.eval()(**batch).logits
    assert torch.allclose(ours, theirs.float(), atol=1e-5), (ours - theirs).abs().max()
