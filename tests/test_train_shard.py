"""``train --nproc N --shard``: FSDP2 over gloo workers on CPU.

The reference is one process over the same global batch (Llama has no dropout, so the two
see the same computation up to the gradient reduction): the adapters agree to 1e-5, each
worker holds half the parameters, checkpoints are whole tensors, and a sharded run resumes
sharded or replicated (DDP) to the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from peftcli.training import state as ckpt_state
from peftcli.training.memory import TrainMemoryOptions, predict
from tests.helpers import assert_error, lm_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(32)))
    return str(path)


def _inject(base, tmp_path, name, *args):
    run = str(tmp_path / name)
    result = CliRunner().invoke(cli, ["inject", *args, base, "-o", run, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return run


def _workers(run, *args, shard=True):
    """``train RUN ARGS --nproc 2 [--shard] --json`` in a subprocess; its summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", run, *args, "--nproc", "2", *(["--shard"] if shard else []), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=os.environ | {"PEFTCLI_DIST_TIMEOUT": "120"},
    )
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if "error" in l.lower())[-3000:]
    assert proc.stdout.count('"schema"') == 1  # one report, from rank 0
    return json.loads(proc.stdout)


def _same(a_run, b_run, atol=1e-5):
    a = load_file(os.path.join(a_run, "adapter_model.safetensors"))
    b = load_file(os.path.join(b_run, "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=atol), k
    return a


@pytest.mark.parametrize(
    "method, extra",
    [(["lora"], []), (["prompt", "--virtual-tokens", "4"], ["--gradient-checkpointing"])],
    ids=["lora", "prompt-checkpointing"],
)
def test_two_sharded_workers_equal_one_process_and_resume_either_way(tiny_llama, lm_data, tmp_path, method, extra):
    common = ["--data", lm_data, "--lr", "1e-2", "--quiet", "--save-every", "2", *extra]
    one = _inject(tiny_llama, tmp_path, "one", *method)
    single = CliRunner().invoke(cli, ["train", one, *common, "--steps", "4", "--batch-size", "8"])
    assert single.exit_code == 0, single.stderr

    sharded = _inject(tiny_llama, tmp_path, "sharded", *method)
    summary = _workers(sharded, *common, "--steps", "4", "--batch-size", "4")
    held, whole = summary["shard"]["held_bytes_per_worker"], summary["shard"]["model_bytes"]
    assert summary["shard"]["workers"] == 2 and abs(held - whole / 2) <= 0.02 * whole  # each worker: half
    predicted = predict(tiny_llama, sharded, TrainMemoryOptions(batch_size=4, max_length=16, nproc=2, shard=True))
    assert abs(predicted.weights + predicted.phi - held) <= 0.02 * held  # check --train's per-worker share
    replicated = predict(tiny_llama, sharded, TrainMemoryOptions(batch_size=4, max_length=16))
    stored = sum(t.numel() * t.element_size() for t in load_file(os.path.join(tiny_llama, "model.safetensors")).values())
    assert 0 <= replicated.weights - stored <= 1024  # the base and its buffers, φ counted once (as φ)
    _same(one, sharded)
    # The checkpoints hold whole tensors, as an unsharded run's do.
    middle = ckpt_state.step_dir(sharded, 2)
    saved = ckpt_state.load_state(middle)["optimizer"]["state"]
    phi = load_file(os.path.join(middle, "adapter_model.safetensors"))
    assert sorted(tuple(s["exp_avg"].shape) for s in saved.values()) == sorted(tuple(t.shape) for t in phi.values())

    # Resumed from step 2 (as if stopped there): sharded again, and replicated (DDP).
    import shutil

    shutil.rmtree(ckpt_state.step_dir(sharded, 4))
    unsharded = str(tmp_path / "unsharded")
    shutil.copytree(sharded, unsharded)
    _workers(sharded, "--resume", "--quiet")
    _workers(unsharded, "--resume", "--quiet", shard=False)
    trained = _same(one, sharded)
    _same(one, unsharded)
    assert any(float(t.abs().max()) > 0 for t in trained.values())


def test_shard_refusals_come_before_anything_is_read(tiny_llama, lm_data, tmp_path):
    run = _inject(tiny_llama, tmp_path, "run", "lora")
    runner = CliRunner()
    assert_error(runner.invoke(cli, ["train", run, "--data", lm_data, "--shard"]), 2, "needs --nproc 2 or more")
    assert_error(runner.invoke(cli, ["train", run, "--data", lm_data, "--shard", "--quantize", "nf4"]), 2, "FSDP2 does not shard")
    layers = _inject(tiny_llama, tmp_path, "layers", "layers", "--layers", "1")
    assert_error(runner.invoke(cli, ["train", layers, "--data", lm_data, "--shard"]), 2, "lives in the base's own tensors")
    assert not os.path.exists(os.path.join(run, "train_args.json"))
    assert_error(runner.invoke(cli, ["check", tiny_llama, run, "--train", "--shard"]), 2, "needs --nproc 2 or more")
