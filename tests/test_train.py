"""The training loop on the tiny fixtures: learning, freezing, resume, early stopping, heads, data errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.training.config import TrainConfig
from peftcli.training.data import load_dataset
from peftcli.training.loop import train
from peftcli.training.state import step_dir
from tests import matrices
from tests.helpers import cls_rows, lm_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    cls, lm = cls_rows(96), lm_rows(64)
    sft = [{"prompt": f"w{i % 7 + 4} w{i % 5 + 20}", "completion": f"w{i % 7 + 30}"} for i in range(64)]
    return {
        "cls": _write_jsonl(d / "cls.jsonl", cls[:64]),
        "cls_dev": _write_jsonl(d / "cls_dev.jsonl", cls[64:]),
        "lm": _write_jsonl(d / "lm.jsonl", lm),
        "sft": _write_jsonl(d / "sft.jsonl", sft),
    }


def _run(base, tmp_path, name="run", **lora):
    run = str(tmp_path / name)
    inject(base, "lora", LoraConfig(**({"rank": 4} | lora)), run)
    return run


def _losses(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("task", ["lm", "sft"])
def test_causal_lm_loss_decreases_and_only_phi_changes(tiny_llama, data, tmp_path, task):
    run = _run(tiny_llama, tmp_path, rank=16, targets="all-linear")
    cfg = TrainConfig(data=data[task], steps=30, batch_size=8, lr=3e-3, log_every=5, schedule="constant")
    summary, adapted = train(run, cfg, return_model=True)
    losses, _ = _losses(run)
    assert summary["task"] == task and summary["steps"] == 30
    assert losses[-1] < 0.9 * losses[0], losses
    base = load_base_model(tiny_llama).state_dict()
    frozen = {n: p for n, p in adapted.model.named_parameters() if not p.requires_grad}
    for name, p in frozen.items():
        key = name.replace(".base_layer.", ".")
        assert torch.equal(p.detach(), base[key]), name  # base tensors byte-identical
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == summary["trainable_params"]


def test_classification_head_and_label_mapping_round_trip(tiny_bert, data, tmp_path):
    run = _run(tiny_bert, tmp_path)
    cfg = TrainConfig(data=data["cls"], eval_data=data["cls_dev"], steps=40, batch_size=16, lr=2e-2, eval_every=10)
    summary, adapted = train(run, cfg, return_model=True)
    assert summary["labels"] == ["neg", "pos"]
    assert json.load(open(os.path.join(run, "labels.json")))["labels"] == ["neg", "pos"]
    assert summary["best"]["eval_accuracy"] >= 0.9
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)

    from peftcli.training.batching import collate, encode, load_tokenizer

    dev = load_dataset(data["cls_dev"])
    batch = collate(encode(dev, load_tokenizer(tiny_bert), 128, summary["labels"]), 0)
    batch.pop("labels")
    with torch.no_grad():
        trained = adapted(**batch).logits
    reloaded = load_adapted(tiny_bert, run, "AutoModelForSequenceClassification")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, trained, atol=1e-5)

    peft = pytest.importorskip("peft")
    model = load_base_model(tiny_bert, "AutoModelForSequenceClassification", num_labels=2)
    theirs = peft.PeftModel.from_pretrained(model, run).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(**batch).logits, trained, atol=1e-5)


def test_early_stopping_keeps_the_minimum(tiny_bert, data, tmp_path):
    run = _run(tiny_bert, tmp_path)
    # A learning rate this high overshoots: validation loss goes down, then up.
    cfg = TrainConfig(data=data["cls"], eval_data=data["cls_dev"], steps=60, batch_size=16, lr=0.3, eval_every=2, patience=3, schedule="constant")
    summary = train(run, cfg)
    _, evals = _losses(run)
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["best"]["step"] == best["step"]
    if summary["stopped_early"]:
        assert evals[-1]["step"] == best["step"] + 3 * 2  # exactly `patience` evaluations after the best
    best_saved = load_file(os.path.join(run, "best", "adapter_model.safetensors"))
    final_saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    if summary["best"]["step"] != summary["steps"]:
        assert any(not torch.equal(best_saved[k], final_saved[k]) for k in best_saved)


def _train_cmd(run, data_path, steps):
    return [sys.executable, "-m", "peftcli", "train", run, "--data", data_path, "--steps", str(steps), "--batch-size", "4",
            "--lr", "1e-2", "--save-every", "2", "--keep-checkpoints", "50", "--quiet"]


RESUME_STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, data, tmp_path_factory):
    """The reference: the same run, trained in one go (in this process: it must not matter)."""
    ref = _run(tiny_llama, tmp_path_factory.mktemp("ref"), "ref")
    train(ref, TrainConfig(data=data["lm"], steps=RESUME_STEPS, batch_size=4, lr=1e-2, save_every=2, keep_checkpoints=50))
    return ref


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_a_kill_is_byte_identical(tiny_llama, data, tmp_path, sig, uninterrupted):
    steps, ref = RESUME_STEPS, uninterrupted

    run = _run(tiny_llama, tmp_path, "killed")
    proc = subprocess.Popen(_train_cmd(run, data["lm"], steps), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(run, "checkpoints", "step-0000004")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.communicate()[1]
    if sig == signal.SIGINT:
        assert proc.returncode == 3 and "checkpoint saved" in err and "--resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    done = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert done and done[-1] != f"step-{steps:07d}", "the run finished before it was interrupted"
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if "peftcli-tmp" in n and sig == signal.SIGINT]

    resumed = CliRunner().invoke(cli, ["train", run, "--resume", "--quiet"])  # in process: no second torch import
    assert resumed.exit_code == 0, resumed.stderr
    a = open(os.path.join(ref, "adapter_model.safetensors"), "rb").read()
    b = open(os.path.join(run, "adapter_model.safetensors"), "rb").read()
    assert a == b


def test_train_cli_summary_and_errors(tiny_llama, data, tmp_path):
    run = _run(tiny_llama, tmp_path)
    ok = CliRunner().invoke(cli, ["train", run, "--data", data["lm"], "--steps", "3", "--json", "--quiet"])
    assert ok.exit_code == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["steps"] == 3 and doc["task"] == "lm"
    again = CliRunner().invoke(cli, ["train", run, "--data", data["lm"], "--steps", "3"])
    assert again.exit_code == 2 and "already been trained" in again.stderr
    no_data = CliRunner().invoke(cli, ["train", _run(tiny_llama, tmp_path, "other")])
    assert no_data.exit_code == 2 and "--data is required" in no_data.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1"}\n{oops\n')
    result = CliRunner().invoke(cli, ["train", _run(tiny_llama, tmp_path, "third"), "--data", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2: not valid JSON" in result.stderr


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "no examples"),
        ("list.jsonl", "[1, 2]\n", ":1: each line must be a JSON object"),
        ("nofield.jsonl", '{"text": "a"}\n{"txt": "b"}\n', ":2: missing field 'text' or 'sentence'"),
        ("three.tsv", "a\tb\tc\n", "3 columns and no header"),
        ("ragged.csv", "text,label\nhello,1\nworld\n", ":3: 1 fields, expected 2"),
        ("unknown.jsonl", '{"foo": 1}\n', "cannot tell the task"),
        ("emptylabel.tsv", "sentence\tlabel\nhi\t\n", "empty label"),
        ("data.parquet", "x", "unknown data format"),
    ],
)
def test_malformed_data_is_a_one_line_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(Exception) as info:
        load_dataset(str(path))
    assert message in str(info.value)


def test_headerless_two_column_tsv_reads_as_text_and_label(tmp_path):
    path = tmp_path / "agnews.tsv"
    path.write_text('He said "hi"\tWorld\nstocks fell\tBusiness\n')
    ds = load_dataset(str(path))
    assert ds.task == "classify" and ds.labels == ["Business", "World"] and ds.examples[0].text == 'He said "hi"'


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not present")
def test_shared_datasets_load_as_they_are():
    sst2 = load_dataset(os.path.join(SHARED, "sst2", "dev.tsv"))
    assert sst2.task == "classify" and sst2.labels == ["0", "1"] and len(sst2.examples) == 6735
    agnews = load_dataset(os.path.join(SHARED, "agnews", "train.tsv"), limit=500)
    assert agnews.task == "classify" and set(agnews.labels) <= {"World", "Sports", "Business", "Sci/Tech"}


# Every one-pass method in the registry (phased ones: tests/test_sparse_training.py), and variants.
TRAIN_CASES = {n: (n, matrices.options(n)) for n in matrices.one_pass()} | {
    "dora": ("lora", {"dora": True}),
    "adapter-houlsby": ("adapter", {"style": "houlsby"}),
    "adapter-parallel": ("adapter", {"style": "parallel"}),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_every_method_trains(name, tiny_llama, tiny_bert, data, tmp_path):
    from peftcli.methods import METHODS

    method, options = TRAIN_CASES[name]
    base = tiny_bert if method == "bitfit" else tiny_llama  # the tiny Llama has no biases
    run = str(tmp_path / "run")
    inject(base, method, METHODS[method].config_cls(**options), run)
    summary = train(run, TrainConfig(data=data["cls"], steps=20, batch_size=16, lr=1e-2, head_lr=1e-2, warmup_steps=0, log_every=5, schedule="constant"))
    losses, _ = _losses(run)
    assert summary["steps"] == 20
    assert losses[-1] < 0.9 * losses[0], losses


def test_plot_writes_a_png_and_names_the_extra_when_missing(tiny_llama, data, tmp_path, monkeypatch):
    run = _run(tiny_llama, tmp_path)
    no_metrics = CliRunner().invoke(cli, ["plot", run])
    assert no_metrics.exit_code == 1 and "no metrics.jsonl" in no_metrics.stderr
    train(run, TrainConfig(data=data["lm"], steps=4, log_every=1))
    pytest.importorskip("matplotlib")
    for _ in range(2):  # the default output is refreshed on a second call
        result = CliRunner().invoke(cli, ["plot", run])
        assert result.exit_code == 0, result.stderr
    with open(os.path.join(run, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    missing = CliRunner().invoke(cli, ["plot", run, "-o", str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "peftcli[plot]" in missing.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_full_fine_tuning_writes_a_loadable_checkpoint_and_resumes(tiny_llama_tied, tiny_bert, data, tmp_path):
    import shutil

    from transformers import AutoModelForSequenceClassification

    run = str(tmp_path / "full")
    cfg = TrainConfig(model=tiny_bert, data=data["cls"], steps=8, batch_size=16, lr=1e-3, full=True, save_every=4, keep_checkpoints=5, log_every=2)
    summary, trained = train(run, cfg, return_model=True)
    losses, _ = _losses(run)
    assert losses[-1] < losses[0]
    base_count = sum(t.numel() for t in load_file(os.path.join(tiny_bert, "model.safetensors")).values())
    assert summary["trainable_params"] == base_count + 64 * 2 + 2  # every parameter, plus the new head
    model = AutoModelForSequenceClassification.from_pretrained(run).eval()  # plain transformers, no peftcli
    assert model.config.id2label == {0: "neg", 1: "pos"}
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, trained(**batch).logits, atol=1e-6)

    # Resuming from the step-4 checkpoint reproduces the uninterrupted run's bytes.
    again = str(tmp_path / "again")
    shutil.copytree(run, again)
    shutil.rmtree(os.path.join(again, "checkpoints", "step-0000008"))
    os.unlink(os.path.join(again, "model.safetensors"))
    train(again, resume=True)
    assert open(os.path.join(again, "model.safetensors"), "rb").read() == open(os.path.join(run, "model.safetensors"), "rb").read()

    # A tied model stays tied: the embedding is stored once, as in the base.
    tied = str(tmp_path / "tied")
    train(tied, TrainConfig(model=tiny_llama_tied, data=data["lm"], steps=2, full=True))
    saved = load_file(os.path.join(tied, "model.safetensors"))
    assert "lm_head.weight" not in saved and set(saved) == set(load_file(os.path.join(tiny_llama_tied, "model.safetensors")))


def test_full_fine_tuning_never_writes_into_the_base(tiny_llama, data, tmp_path):
    result = CliRunner().invoke(cli, ["train", tiny_llama, "--full", "--model", tiny_llama, "--data", data["lm"], "--steps", "1"])
    assert result.exit_code == 2 and "would overwrite the input" in result.stderr
    missing = CliRunner().invoke(cli, ["train", str(tmp_path / "x"), "--full", "--data", data["lm"]])
    assert missing.exit_code == 2 and "--full needs --model" in missing.stderr


@pytest.mark.parametrize("extra", [[], ["--quantize", "nf4", "--gradient-checkpointing"]], ids=["fp32", "nf4"])
def test_two_gloo_workers_equal_one_process_with_the_same_global_batch(tiny_llama, data, tmp_path, extra):
    # Llama has no dropout, so both runs see the same computation up to the gradient all-reduce
    # (with an NF4 base, each worker quantises the same weights to the same bits).
    one, two = _run(tiny_llama, tmp_path, "one"), _run(tiny_llama, tmp_path, "two")
    common = ["--data", data["cls"], "--steps", "4", "--lr", "1e-2", "--quiet", *extra]
    single = CliRunner().invoke(cli, ["train", one, *common, "--batch-size", "8"])  # one process: this one
    assert single.exit_code == 0, single.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", two, *common, "--batch-size", "4", "--nproc", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=os.environ | {"PEFTCLI_DIST_TIMEOUT": "120"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"schema"') == 1  # one report, from rank 0
    a = load_file(os.path.join(one, "adapter_model.safetensors"))
    b = load_file(os.path.join(two, "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained


def test_lm_eval_loss_is_the_mean_over_predicted_tokens_whatever_the_batch_size(tiny_llama, data):
    from peftcli.attach import load_base_model
    from peftcli.training.batching import encode, load_tokenizer
    from peftcli.training.loop import evaluate

    model = load_base_model(tiny_llama, "AutoModelForCausalLM")
    tok = load_tokenizer(tiny_llama)
    items = encode(load_dataset(data["sft"], None, 10), tok, 32, None)  # ragged, prompt tokens ignored
    total, tokens = 0.0, 0
    with torch.no_grad():  # independent reference: summed cross-entropy, one example at a time
        for it in items:
            logits = model(input_ids=torch.tensor([it["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(it["labels"][1:])
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            tokens += int(keep.sum())
    for bs in (1, 3, 10):
        got = evaluate(model, items, tok.pad_token_id, bs, torch.device("cpu"), "sft")["eval_loss"]
        assert got == pytest.approx(total / tokens, rel=1e-5), bs


def test_threads_hold_during_training_are_saved_for_resume_and_restored_after(tiny_llama, data, tmp_path):
    seen = []

    class Spy:  # the progress interface: start, update each step, finish
        def start(self, total, step):
            seen.append(("start", torch.get_num_threads()))

        def update(self, step, *rest):
            seen.append((step, torch.get_num_threads()))

        def finish(self):
            pass

    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # differs from the default, whatever the machine
    run = _run(tiny_llama, tmp_path)
    train(run, TrainConfig(data=data["lm"], steps=4, save_every=2, threads=wanted), progress=Spy())
    assert seen and all(n == wanted for _, n in seen), seen
    assert torch.get_num_threads() == before
    assert json.load(open(os.path.join(run, "train_args.json")))["threads"] == wanted
    seen.clear()
    shutil.rmtree(step_dir(run, 4))  # resume from step 2 with the saved options
    train(run, None, resume=True, progress=Spy())
    assert seen and all(n == wanted for _, n in seen), seen
    assert torch.get_num_threads() == before
    bad = CliRunner().invoke(cli, ["train", _run(tiny_llama, tmp_path, "zero"), "--data", data["lm"], "--threads", "0"])
    assert bad.exit_code == 2 and "--threads must be positive" in bad.stderr
