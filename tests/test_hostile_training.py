"""Training that diverges, and a prefix too large to allocate: one-line errors, nothing wrong written.

A LoRA run on the tiny BERT classifier with ``--lr 1e10`` reaches a NaN loss within a few
steps (on CPU, deterministically): training must stop there with exit 1 naming the step,
write no adapter, keep the last good checkpoint byte for byte, and, without one, leave the
run reading as not trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "cls.jsonl"
    with open(path, "w") as f:
        for i in range(32):
            words = " ".join(f"w{rng.randint(5, 60)}" for _ in range(5))
            f.write(json.dumps({"text": f"{'w1' if i % 2 else 'w2'} {words}", "label": "pos" if i % 2 else "neg"}) + "\n")
    return str(path)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _train(run, data, *extra):
    return CliRunner().invoke(
        cli, ["train", run, "--data", data, "--steps", "12", "--batch-size", "4", "--lr", "1e10", "--quiet", *extra]
    )


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_divergence_stops_at_the_first_nonfinite_loss_and_keeps_the_last_good_checkpoint(tiny_bert, cls_data, tmp_path, clip):
    run = str(tmp_path / "run")
    inject(tiny_bert, "lora", LoraConfig(rank=2), run)
    before = _sha(os.path.join(run, "adapter_model.safetensors"))
    result = _train(run, cls_data, "--save-every", "1", "--keep-checkpoints", "2", "--max-grad-norm", clip)
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "training diverged at step" in line and "--lr 1e+10" in line and "no adapter was written" in line
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert 1 < step < 12
    # The adapter in RUN is the one it started from; the newest checkpoint is the step before, finite.
    assert _sha(os.path.join(run, "adapter_model.safetensors")) == before
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert ckpts[-1] == f"step-{step - 1:07d}" and f"checkpoints/{ckpts[-1]}" in line
    for t in load_file(os.path.join(run, "checkpoints", ckpts[-1], "adapter_model.safetensors")).values():
        assert bool(torch.isfinite(t).all())


def test_a_diverged_run_without_a_checkpoint_does_not_read_as_trained(tiny_bert, cls_data, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_bert, "lora", LoraConfig(rank=2), run)
    before = _sha(os.path.join(run, "adapter_model.safetensors"))
    result = _train(run, cls_data)
    assert result.exit_code == 1 and "no checkpoint was written" in _one_error_line(result)
    assert _sha(os.path.join(run, "adapter_model.safetensors")) == before
    assert not os.path.exists(os.path.join(run, "train_args.json"))
    again = CliRunner().invoke(cli, ["train", run, "--data", cls_data, "--steps", "2", "--batch-size", "4", "--quiet"])
    assert again.exit_code == 0, again.output  # a lower --lr trains it, no --force needed


def test_a_prefix_projection_too_large_to_allocate_is_a_resource_error(tiny_llama, tmp_path):
    out = tmp_path / "prefix"
    result = CliRunner().invoke(cli, ["inject", "prefix", "--projection", "2000000000", tiny_llama, "-o", str(out)])
    assert result.exit_code == 3, result.output
    line = _one_error_line(result)
    # Embedding [20, 32] → Linear(32, 2e9) → Linear(2e9, 2·2·32) in fp32, plus activations and the prefix.
    hidden, n, kv, width = 2_000_000_000, 20, 32, 2 * 2 * 32
    needed = 4 * (n * kv + hidden * kv + hidden + width * hidden + width + n * width + n * hidden)
    assert f"({needed:,} bytes)" in line and "GiB of memory needed" in line
    assert not out.exists()


def test_a_failed_allocation_is_the_same_resource_error(monkeypatch):
    from peftcli.errors import ResourceError
    from peftcli.methods.prompting import prefix

    monkeypatch.setattr(prefix, "available_memory", lambda: None)  # nothing to refuse up front
    with pytest.raises(ResourceError, match=r"1.0 GiB of memory needed \(1,073,741,824 bytes\)"):
        with prefix.allocation(2**30, "the prefix"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(ValueError):  # anything else is not turned into a resource error
        with prefix.allocation(1, "the prefix"):
            raise ValueError("a bug")


def test_a_diverging_phase_of_a_multi_pass_run_stops_it_naming_its_option(tiny_bert, cls_data, tmp_path):
    from peftcli.methods.sparse.fine_tuning import LtSftConfig

    run = str(tmp_path / "ltsft")
    inject(tiny_bert, "lt-sft", LtSftConfig(density=0.01), run)
    before = _sha(os.path.join(run, "adapter_model.safetensors"))
    result = CliRunner().invoke(
        cli, ["train", run, "--data", cls_data, "--steps", "4", "--phase1-steps", "6", "--phase1-lr", "1e10", "--batch-size", "4", "--quiet"]
    )
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "training diverged at step" in line and "(--phase1-lr 1e+10)" in line and "no model was written" in line
    assert _sha(os.path.join(run, "adapter_model.safetensors")) == before  # no selection was made from NaN
    assert not os.path.exists(os.path.join(run, "phi.diff"))
