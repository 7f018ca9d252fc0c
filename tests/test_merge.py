"""peftcli merge: exact folding (merged forward == adapted forward), task arithmetic, streaming output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.methods import METHODS
from tests import matrices
from tests.helpers import batch, noisy_copy, output_tensor, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every one-pass method that folds (from the registry), and the LoRA variants that change ΔW.
FOLDABLE = matrices.cases(matrices.foldable_one_pass(), {"lora": [{"dora": True}, {"rslora": True, "targets": "all-linear"}]})


@pytest.fixture(params=["llama", "bert", "gpt2"])
def base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _trained(base, tmp_path, name, opts, seed=1):
    run = str(tmp_path / f"{name}-init")
    inject(base, name, METHODS[name].config_cls(**opts), run)
    adapted = load_adapted(base, run)
    randomize_([p for p in adapted.parameters() if p.requires_grad], seed=seed, scale=0.2)
    adapted.save(str(tmp_path / name))
    return adapted, str(tmp_path / name)


@pytest.mark.parametrize("name, opts", FOLDABLE, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)) or "default")
def test_merged_forward_equals_adapted_forward(base, name, opts, tmp_path):
    if name == "bitfit" and "llama" in base:
        pytest.skip("the tiny Llama has no biases")
    if not METHODS[name].adapts_conv1d and "gpt2" in base:
        pytest.skip(f"{name} declares adapts_conv1d False: GPT-2's Conv1D is refused (tests/test_contract.py checks it)")
    adapted, run = _trained(base, tmp_path, name, opts)
    out = str(tmp_path / "merged")
    report = merge(base, [run], out)
    assert report.changed > 0
    merged = load_base_model(out)  # plain transformers from the merged directory
    inputs = batch()
    with torch.no_grad():
        assert torch.allclose(output_tensor(merged(**inputs)), output_tensor(adapted(**inputs)), atol=1e-5)
    assert sorted(os.listdir(out)) == sorted(os.listdir(base))  # weights, config and tokenizer: standalone


def test_lora_fold_equals_peft_merge_and_unload(tiny_gpt2, tmp_path):
    peft = pytest.importorskip("peft")
    _, run = _trained(tiny_gpt2, tmp_path, "lora", {"dora": True})
    merge(tiny_gpt2, [run], str(tmp_path / "merged"))
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(load_base_model(tiny_gpt2), run).merge_and_unload().state_dict()
    for name, t in ours.items():
        assert torch.allclose(t, theirs[name], atol=1e-6), name




def test_task_arithmetic_of_diffs_and_full_checkpoints(tiny_llama, tmp_path):
    a = noisy_copy(tiny_llama, str(tmp_path / "ftA"), 1)
    b = noisy_copy(tiny_llama, str(tmp_path / "ftB"), 2)
    runner = CliRunner()
    for ft, d in ((a, "a.diff"), (b, "b.diff")):
        assert runner.invoke(cli, ["diff", tiny_llama, ft, "-o", str(tmp_path / d), "--dense", "--values", "fp32"]).exit_code == 0
    base_sd = load_file(os.path.join(tiny_llama, "model.safetensors"))
    sa, sb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    expected = {n: base_sd[n] + 1.0 * (sa[n] - base_sd[n]) + 0.5 * (sb[n] - base_sd[n]) for n in base_sd}
    for inputs, out in (([str(tmp_path / "a.diff"), str(tmp_path / "b.diff")], "m1"), ([a, b], "m2")):
        result = runner.invoke(cli, ["merge", tiny_llama, *inputs, "--weights", "1.0,0.5", "-o", str(tmp_path / out), "--json"])
        assert result.exit_code == 0, result.stderr
        got = load_file(str(tmp_path / out / "model.safetensors"))
        for n in expected:
            assert torch.allclose(got[n], expected[n], atol=1e-6), n
    assert json.loads(result.stdout)["changed_tensors"] == len(expected)


def test_stdout_streaming_equals_the_file_and_is_reproducible(tiny_llama, tmp_path):
    a = noisy_copy(tiny_llama, str(tmp_path / "ft"), 3)
    assert CliRunner().invoke(cli, ["diff", tiny_llama, a, "-o", str(tmp_path / "a.diff"), "--density", "0.1"]).exit_code == 0
    base_file = os.path.join(tiny_llama, "model.safetensors")
    args = [base_file, str(tmp_path / "a.diff")]
    assert CliRunner().invoke(cli, ["merge", *args, "-o", str(tmp_path / "m.safetensors")]).exit_code == 0
    with open(tmp_path / "piped.safetensors", "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "peftcli", "merge", *args], stdout=f, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    one = open(tmp_path / "m.safetensors", "rb").read()
    assert one == open(tmp_path / "piped.safetensors", "rb").read()
    assert CliRunner().invoke(cli, ["merge", *args, "-o", str(tmp_path / "m2.safetensors")]).exit_code == 0
    assert one == open(tmp_path / "m2.safetensors", "rb").read()  # byte-identical for identical inputs


def test_tied_weights_stay_tied_and_shards_keep_the_base_layout(tiny_llama_tied, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama_tied).save_pretrained(sharded, max_shard_size="100KB")
    adapted, run = _trained(sharded, tmp_path, "lora", {})
    out = str(tmp_path / "merged")
    merge(sharded, [run], out)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["weight_map"] == json.load(open(os.path.join(sharded, "model.safetensors.index.json")))["weight_map"]
    assert "lm_head.weight" not in index["weight_map"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.allclose(merged(**batch()).logits, adapted(**batch()).logits, atol=1e-5)


def test_ties_and_dare_run_through_the_cli(tiny_llama, tmp_path):
    a = noisy_copy(tiny_llama, str(tmp_path / "ftA"), 1)
    b = noisy_copy(tiny_llama, str(tmp_path / "ftB"), 2)
    for method, extra in (("ties", ["--density", "0.5"]), ("dare-ties", ["--density", "0.3", "--seed", "7"]), ("dare", ["--density", "0.3"])):
        out = str(tmp_path / method)
        result = CliRunner().invoke(cli, ["merge", tiny_llama, a, b, "--method", method, *extra, "-o", out])
        assert result.exit_code == 0, result.stderr
        meta = json.loads(open_checkpoint(out).metadata["peftcli.merge"])
        assert meta["method"] == method and meta["density"] == float(extra[1])


@pytest.mark.parametrize(
    "make, args, code, message",
    [
        ("prompt", [], 2, "no weight change reproduces"),
        ("lora-bert", [], 1, "does not match the base model"),
        ("lora", ["--weights", "1,2"], 2, "--weights has 2 values for 1 inputs"),
        ("lora", ["--method", "ties"], 2, "density"),
        ("lora", ["-o", "{base}"], 2, "would overwrite the input"),
    ],
)
def test_merge_errors(tiny_llama, tiny_bert, tmp_path, make, args, code, message):
    method, base_for = {"prompt": ("prompt", tiny_llama), "lora-bert": ("lora", tiny_bert), "lora": ("lora", tiny_llama)}[make]
    run = str(tmp_path / "run")
    inject(base_for, method, METHODS[method].config_cls(), run)
    out = str(tmp_path / "out")
    full = ["merge", tiny_llama, run, *[a.replace("{base}", tiny_llama) for a in args]]
    if "-o" not in args:
        full += ["-o", out]
    result = CliRunner().invoke(cli, full)
    assert result.exit_code == code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_kill_9_during_a_merge_leaves_no_output_and_a_rerun_succeeds(tiny_llama, tmp_path):
    import signal
    import textwrap

    adapted, run = _trained(tiny_llama, tmp_path, "lora", {})
    out = str(tmp_path / "merged")
    script = textwrap.dedent(
        f"""
        import os, signal
        from peftcli.merging.engine import merge
        def progress(n, total):
            if n == 5:  # mid-way through writing the tensors
                os.kill(os.getpid(), signal.SIGKILL)
        merge({tiny_llama!r}, [{run!r}], {out!r}, progress=progress)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    merge(tiny_llama, [run], out)  # the rerun cleans the dead run's temporary and succeeds
    assert [n for n in os.listdir(tmp_path) if "peftcli-tmp" in n] == []
    reference = str(tmp_path / "reference")
    merge(tiny_llama, [run], reference)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == open(os.path.join(reference, "model.safetensors"), "rb").read()


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_a_trained_classifier_merges_into_the_head_model(fixture, request, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    base = request.getfixturevalue(fixture)
    rows = [{"text": f"w{i % 7 + 4} w{i % 5 + 20}", "label": "yes" if i % 2 else "no"} for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = str(tmp_path / "run")
    inject(base, "lora", METHODS["lora"].config_cls(rank=4), run)
    _, adapted = train(run, TrainConfig(data=str(data), steps=4, batch_size=8, lr=1e-2), return_model=True)
    out = str(tmp_path / "merged")
    merge(base, [run], out)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers
    assert merged.config.id2label == {0: "no", 1: "yes"}
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-5)
    stream = CliRunner().invoke(cli, ["merge", base, run, "-o", str(tmp_path / "m.safetensors")])
    assert stream.exit_code == 2 and "a merged model with a task head is a model directory" in stream.stderr
