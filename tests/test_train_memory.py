"""Training-memory prediction (``peftcli check BASE RUN --train``) held against measured peaks.

Each configuration runs in a fresh process (the peak RSS of a process only grows; VmHWM, since
``ru_maxrss`` would keep the forking test runner's): the
prediction first (the meta device: no memory), then one real training step; the measured
peak must be within ±25% of the predicted one. glibc's malloc is told to return large
blocks to the system (``MALLOC_MMAP_THRESHOLD_``) so that RSS follows live memory, which is
what the prediction is of (the module docstring says why a default CPU run's RSS is
higher). The model is small but its activations are a third or more of each peak, so an
activation count off by half would fail."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.training.memory import TrainMemoryOptions, nf4_bytes, predict
from tests.helpers import assert_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = """
import json, sys
import torch
torch.set_num_threads(1)
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from peftcli.training.memory import TrainMemoryOptions, predict
base, run, data, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
predicted = predict(base, run, TrainMemoryOptions(**options)).peak
train(run, TrainConfig(data=data, steps=1, lr=1e-3, **options))
from peftcli.training.one_pass import peak_rss
print(json.dumps({"predicted": predicted, "measured": peak_rss()}))
"""


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """A Llama of 3M parameters and rows longer than any max_length below."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.tiny import word_tokenizer

    d = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(str(d / "model"))
    word_tokenizer().save_pretrained(str(d / "model"))
    rng = random.Random(0)
    (d / "lm.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(250)}" for _ in range(600))}) + "\n" for _ in range(32)))
    return {"model": str(d / "model"), "data": str(d / "lm.jsonl"), "dir": d}


def _inject(mid, name: str, *args: str) -> str:
    run = str(mid["dir"] / name)
    result = CliRunner().invoke(cli, ["inject", *args, mid["model"], "-o", run, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.mark.parametrize(
    "method, options",
    [
        (["lora", "--targets", "all-linear"], {"batch_size": 16, "max_length": 256}),
        (["lora", "--targets", "all-linear"], {"batch_size": 16, "max_length": 256, "gradient_checkpointing": True}),
        (["lora", "--targets", "all-linear"], {"batch_size": 8, "max_length": 256, "base_dtype": "bf16"}),
        (["lora"], {"batch_size": 8, "max_length": 512, "quantize": "nf4"}),
        (["lora"], {"batch_size": 8, "max_length": 512, "quantize": "nf4", "gradient_checkpointing": True}),
        (["prompt", "--virtual-tokens", "16"], {"batch_size": 16, "max_length": 256}),
    ],
    ids=["fp32", "checkpointing", "bf16", "nf4", "nf4-checkpointing", "prompt"],
)
def test_predicted_peak_is_within_a_quarter_of_the_measured_one(mid, tmp_path, method, options):
    run = _inject(mid, f"run-{tmp_path.name}", *method)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, mid["model"], run, mid["data"], json.dumps(options)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.75 <= got["predicted"] / got["measured"] <= 1.25, got


def test_nf4_bytes_are_what_the_quantised_layer_holds():
    from peftcli.quantize.nf4 import NF4Linear

    for shape in [(64, 64), (688, 256), (100, 30)]:
        layer = NF4Linear(torch.nn.Linear(shape[1], shape[0], bias=False), transposed=False)
        held = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
        assert abs(nf4_bytes(shape[0] * shape[1]) - held) <= 8, (shape, held)


def test_prediction_reads_no_weight(mid, tmp_path):
    import shutil

    run = _inject(mid, "noweights-run", "lora")
    bare = tmp_path / "bare"
    shutil.copytree(mid["model"], bare, ignore=shutil.ignore_patterns("*.safetensors"))
    opts = TrainMemoryOptions(batch_size=4, max_length=64, quantize="nf4")
    with_weights, without = predict(mid["model"], run, opts), predict(str(bare), run, opts)
    assert (with_weights.weights, with_weights.activations) == (without.weights, without.activations)
    from safetensors.torch import load_file, save_file

    adapter = load_file(os.path.join(run, "adapter_model.safetensors"))
    assert without.phi == 4 * sum(t.numel() for t in adapter.values())  # φ in fp32, as the adapter holds it
    # NF4: loading reads one weight at a time, quantising each; a checkpoint whose names
    # transformers maps loads whole, holding every weight in full precision first.
    assert without.details["loads"] == with_weights.details["loads"] == "one weight at a time"
    largest = max(t.numel() for t in load_file(os.path.join(mid["model"], "model.safetensors")).values() if t.dim() == 2)
    assert with_weights.weights < with_weights.load <= with_weights.weights + largest * 24
    renamed = tmp_path / "renamed"
    shutil.copytree(mid["model"], renamed, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(os.path.join(mid["model"], "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(renamed / "model.safetensors"))
    whole = predict(str(renamed), run, opts)
    full = sum(t.numel() * t.element_size() for t in tensors.values())
    assert whole.details["loads"] == "whole" and whole.load >= full


@pytest.mark.parametrize(
    "args",
    [["ia3"], ["loha"], ["lokr"], ["adapter"], ["prefix", "--virtual-tokens", "4"], ["layers", "--layers", "1"]],
    ids=lambda a: a[0],
)
def test_every_method_traces_on_the_meta_device(tiny_llama, tmp_path, args):
    run = str(tmp_path / "run")
    assert CliRunner().invoke(cli, ["inject", *args, tiny_llama, "-o", run, "--quiet"]).exit_code == 0
    m = predict(tiny_llama, run, TrainMemoryOptions(batch_size=2, max_length=16))
    assert m.activations > 0 and m.phi > 0 and m.weights > 0


def test_check_train_cli_line_json_and_refusals(mid, tmp_path):
    run = _inject(mid, "cli-run", "lora")
    runner = CliRunner()
    result = runner.invoke(cli, ["check", mid["model"], run, "--train", "--batch-size", "4", "--max-length", "128", "--nproc", "2"])
    assert result.exit_code == 0, result.stderr
    assert "training memory (predicted peak, memory in use by the process)" in result.stdout and "2 workers" in result.stdout
    doc = json.loads(runner.invoke(cli, ["check", mid["model"], run, "--train", "--json"]).stdout)
    memory = doc["train_memory"][run]
    parts = ("weights", "phi", "gradients", "optimizer", "activations", "transient")
    assert memory["peak_per_worker"] == memory["runtime"] + max(memory["load"], sum(memory[k] for k in parts))
    assert memory["phi"] == 4 * memory["trainable_params"] and memory["optimizer"] == 2 * memory["phi"]

    assert_error(runner.invoke(cli, ["check", mid["model"], run, "--batch-size", "4"]), 2, "--batch-size applies to the training-memory prediction")
    assert_error(runner.invoke(cli, ["check", mid["model"], "--train"]), 2, "--train predicts the memory of training an adapter")
    assert_error(runner.invoke(cli, ["check", mid["model"], run, "--train", "--task", "classify", "--packing"]), 2, "--packing applies to lm and sft")
    layers = _inject(mid, "cli-layers", "layers", "--layers", "3")
    assert_error(runner.invoke(cli, ["check", mid["model"], layers, "--train", "--quantize", "nf4"]), 2, "trains the base's own weights")


@pytest.mark.parametrize("arch, task", [("gpt2", "classify"), ("gpt2", "lm"), ("bert", "classify")])
def test_classifiers_and_models_with_a_pad_token_trace_too(arch, task, tiny_gpt2, tiny_bert, tmp_path):
    # GPT-2 and BERT look for a pad token in the ids when no mask is given (a value the meta
    # device does not have); a decoder classifier finds the last token by the pad id.
    base = {"gpt2": tiny_gpt2, "bert": tiny_bert}[arch]
    for method in (["lora"], ["bitfit"]):
        run = str(tmp_path / f"{method[0]}-{task}")
        assert CliRunner().invoke(cli, ["inject", *method, base, "-o", run, "--quiet"]).exit_code == 0
        m = predict(base, run, TrainMemoryOptions(batch_size=2, max_length=16, task=task))
        assert m.activations > 0 and m.details["task"] == task
