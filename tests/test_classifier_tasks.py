"""The multi-task workflow on classifiers: fine-tuned heads models → .diff → merge → a model per task.

A classifier fine-tuned from a pretrained base is the head model (``bert.*`` + ``classifier.*``)
while the base has bare names (``embeddings.*``): diff, check and merge compare the body name
by name and carry the head whole. References are independent: the fine-tuned checkpoints
themselves (transformers), an fp64 sum of base + φ's, and the head models' own class on the
meta device for the tensor names a checkpoint must hold.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.artifacts.sparse_diff import read_diff
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.cli import cli
from peftcli.diffing import DiffOptions, diff
from peftcli.merging.engine import merge

INPUTS = {"input_ids": torch.tensor([[2, 5, 6, 7, 9], [2, 11, 12, 13, 0]]), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 1, 0]])}
LABELS = {2: ["neg", "pos"], 4: ["World", "Sports", "Business", "Sci/Tech"]}


def _classifier(base: str, out: str, num_labels: int, seed: int, labels=None) -> str:
    """A fine-tuned classifier of ``base``: the body moved deterministically, a new head, saved by transformers."""
    from transformers import AutoModelForSequenceClassification

    labels = labels or LABELS[num_labels]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=num_labels, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bert.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tasks(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    a = _classifier(tiny_bert, str(root / "clsA"), 2, seed=1)
    b = _classifier(tiny_bert, str(root / "clsB"), 4, seed=2)
    return {"A": a, "B": b, "root": root}


def _logits(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**INPUTS).logits.double()


def _reference(base: str, finetunes: list[str], head_of: str) -> torch.Tensor:
    """fp64 logits of base + Σ(θ_ft − θ₀) on the body and ``head_of``'s own head."""
    from transformers import AutoModelForSequenceClassification

    theta0 = load_file(os.path.join(base, "model.safetensors"))
    body = {n: t.double() for n, t in theta0.items()}
    for ft in finetunes:
        sd = load_file(os.path.join(ft, "model.safetensors"))
        for n in body:
            body[n] += sd[f"bert.{n}"].double() - theta0[n].double()
    model = AutoModelForSequenceClassification.from_pretrained(head_of).double().eval()
    state = {f"bert.{n}": t for n, t in body.items()}
    state.update({n: t.double() for n, t in load_file(os.path.join(head_of, "model.safetensors")).items() if n.startswith("classifier.")})
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(**INPUTS).logits


def _tensor_names(model_dir: str) -> set[str]:
    with open_checkpoint(model_dir) as ckpt:
        return set(ckpt.tensors)


def _assert_architecture_matches(model_dir: str) -> None:
    """config.json's architectures[0], built on the meta device, has exactly the tensors written."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = cls(config)
    assert set(model.state_dict()) == _tensor_names(model_dir), model_dir


def _eval_data(path, labels: list[str]) -> str:
    rows = [f"w{i % 7 + 4} w{i % 5 + 20} w{i % 3 + 30}\t{labels[i % len(labels)]}" for i in range(12)]
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return str(path)


# -- diff -------------------------------------------------------------------------------------------


def test_a_classifiers_diff_has_the_bodys_phi_under_the_base_names_and_its_head_whole(tiny_bert, tasks, tmp_path):
    out = str(tmp_path / "A.diff")
    report = diff(tiny_bert, tasks["A"], out, DiffOptions(dense=True))
    base, ft = load_file(os.path.join(tiny_bert, "model.safetensors")), load_file(os.path.join(tasks["A"], "model.safetensors"))
    with read_diff(out) as d:
        assert sorted(d.names) == sorted(base)  # the base's names, every body tensor
        for name in d.names:  # θ₀ + φ gives the fine-tune's body back bit for bit
            assert torch.equal(d.apply_to(name, base[name]), ft[f"bert.{name}"])
        head = d.task_head
        assert head.architecture == "BertForSequenceClassification" and head.labels == ["neg", "pos"]
        assert sorted(head.tensors) == ["classifier.bias", "classifier.weight"]
        for name in head.tensors:
            assert torch.equal(d.get_head(name), ft[name])
    assert report.to_json()["task_head"]["labels"] == ["neg", "pos"]
    # The density is over the body only: K of the body's selectable entries.
    sparse = diff(tiny_bert, tasks["A"], str(tmp_path / "A10.diff"), DiffOptions(density=0.1))
    n = sum(t.numel() for t in base.values() if t.dim() >= 2)
    assert sparse.n == n and sparse.k == round(0.1 * n)
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "A10.diff")])
    assert shown.exit_code == 0 and "BertForSequenceClassification, 2 labels (neg, pos)" in shown.output


def test_a_classifier_whose_config_says_BertModel_is_diffed_too(tiny_bert, tasks, tmp_path):
    # peftcli train --full used to write architectures ["BertModel"] for a classifier: those
    # checkpoints were refused with "41 differences ... another base model?"; they are its head model.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tasks["A"], old)
    config = json.loads((old / "config.json").read_text())
    config["architectures"] = ["BertModel"]
    (old / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["diff", tiny_bert, str(old), "-o", str(tmp_path / "old.diff"), "--density", "0.5"])
    assert result.exit_code == 0, result.output + result.stderr
    assert read_diff(str(tmp_path / "old.diff")).task_head.architecture == "BertForSequenceClassification"
    check = CliRunner().invoke(cli, ["check", tiny_bert, str(old)])
    assert check.exit_code == 0 and "differences" not in check.output


def test_a_diff_head_is_validated_on_read(tiny_bert, tasks, tmp_path):
    out = str(tmp_path / "A.diff")
    diff(tiny_bert, tasks["A"], out, DiffOptions(density=0.5))
    tensors = load_file(out)
    with open_checkpoint(out) as ckpt:
        meta = dict(ckpt.metadata)
    without = dict(meta)
    del without["task_head"]  # head tensors the metadata does not account for
    save_file(tensors, str(tmp_path / "nohead.diff"), without)
    with pytest.raises(Exception, match="'classifier.bias' is not accounted for"):
        read_diff(str(tmp_path / "nohead.diff"))
    head = json.loads(meta["task_head"])
    head["tensors"]["classifier.weight"][1] = [3, 64]
    save_file(tensors, str(tmp_path / "shape.diff"), {**meta, "task_head": json.dumps(head)})
    with pytest.raises(Exception, match=r"task_head lists F32\[3, 64\]"):
        read_diff(str(tmp_path / "shape.diff"))
    head = json.loads(meta["task_head"])
    head["tensors"]["embeddings.LayerNorm.bias"] = ["F32", [64]]  # a base tensor's name
    save_file({**tensors, "embeddings.LayerNorm.bias.x": torch.zeros(1)}, str(tmp_path / "clash.diff"), {**meta, "task_head": json.dumps(head)})
    with pytest.raises(Exception, match="has the name of a base tensor"):
        read_diff(str(tmp_path / "clash.diff"))


# -- merge ------------------------------------------------------------------------------------------


def test_two_classifiers_merge_into_a_model_per_task(tiny_bert, tasks, tmp_path):
    a, b = str(tmp_path / "A.diff"), str(tmp_path / "B.diff")
    diff(tiny_bert, tasks["A"], a, DiffOptions(dense=True))
    diff(tiny_bert, tasks["B"], b, DiffOptions(dense=True))
    out = str(tmp_path / "multi")
    result = CliRunner().invoke(cli, ["merge", tiny_bert, a, b, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.output)
    assert [(t["name"], t["path"], len(t["labels"])) for t in doc["tasks"]] == [("A", f"{out}/A", 2), ("B", f"{out}/B", 4)]
    assert sorted(os.listdir(out)) == ["A", "B"]
    for task, src in (("A", tasks["A"]), ("B", tasks["B"])):
        got = _logits(os.path.join(out, task))  # plain transformers
        want = _reference(tiny_bert, [tasks["A"], tasks["B"]], head_of=src)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)
        _assert_architecture_matches(os.path.join(out, task))
        config = json.loads(open(os.path.join(out, task, "config.json")).read())
        assert list(config["id2label"].values()) == LABELS[2 if task == "A" else 4]
    index = json.load(open(os.path.join(out, "A", "model.safetensors.index.json")))
    heads = {n for n in index["weight_map"] if n.startswith("classifier.")}
    head_file = {index["weight_map"][n] for n in heads}
    assert len(head_file) == 1 and head_file.isdisjoint(index["weight_map"][n] for n in index["weight_map"] if n not in heads)
    for shard in set(index["weight_map"].values()) - head_file:  # one body, cloned or copied into each task
        assert open(os.path.join(out, "A", shard), "rb").read() == open(os.path.join(out, "B", shard), "rb").read()
        # never a hard link: rewriting one task's shard in place must leave the other's alone
        assert os.stat(os.path.join(out, "A", shard)).st_ino != os.stat(os.path.join(out, "B", shard)).st_ino
    human = CliRunner().invoke(cli, ["merge", tiny_bert, a, b, "-o", str(tmp_path / "human")])
    assert "task A: BertForSequenceClassification, 2 labels" in human.output and "task B" in human.output


def test_each_merged_task_evaluates_with_its_own_labels(tiny_bert, tasks, tmp_path):
    from peftcli.evaluation import EvalOptions, evaluate

    out = str(tmp_path / "multi")
    merge(tiny_bert, [tasks["A"], tasks["B"]], out)  # full checkpoints as task vectors
    for task, n in (("clsA", 2), ("clsB", 4)):
        data = _eval_data(tmp_path / f"{task}.tsv", LABELS[n])
        doc = evaluate(os.path.join(out, task), EvalOptions(data=data))
        assert doc["head"] == "checkpoint" and doc["labels"] == LABELS[n] and 0.0 <= doc["eval_accuracy"] <= 1.0
        want = _reference(tiny_bert, [tasks["A"], tasks["B"]], head_of=tasks[task[-1]])
        assert torch.allclose(_logits(os.path.join(out, task)), want, atol=1e-5, rtol=0)


def test_one_classifier_merges_into_its_head_model(tiny_bert, tasks, tmp_path):
    a = str(tmp_path / "A.diff")
    diff(tiny_bert, tasks["A"], a, DiffOptions(dense=True))
    for name, inputs in (("from-diff", [a]), ("from-checkpoint", [tasks["A"]])):
        out = str(tmp_path / name)
        report = merge(tiny_bert, inputs, out)
        assert [t["path"] for t in report.tasks] == [out] and os.path.isfile(os.path.join(out, "config.json"))
        assert torch.allclose(_logits(out), _logits(tasks["A"]), atol=1e-5, rtol=0)  # base + φ = the fine-tune
        _assert_architecture_matches(out)


def test_same_labels_are_not_the_same_task_unless_the_user_says_so(tiny_bert, tasks, tmp_path):
    """Two binary tasks (SST-2, RTE) both have labels 0/1: by default each keeps its own head."""
    a2 = _classifier(tiny_bert, str(tmp_path / "clsA2"), 2, seed=5)
    out = str(tmp_path / "each")
    report = merge(tiny_bert, [tasks["A"], a2], out)
    assert sorted(t["name"] for t in report.tasks) == ["clsA", "clsA2"] and sorted(os.listdir(out)) == ["clsA", "clsA2"]
    for task, source in (("clsA", tasks["A"]), ("clsA2", a2)):
        merged = load_file(os.path.join(out, task, "model-00002-of-00002.safetensors"))
        own = load_file(os.path.join(source, "model.safetensors"))
        assert all(torch.equal(merged[n], own[n]) for n in ("classifier.weight", "classifier.bias"))
    b_average = CliRunner().invoke(cli, ["merge", tiny_bert, tasks["A"], tasks["B"], "--heads", "average", "-o", str(tmp_path / "x")])
    assert b_average.exit_code == 1 and "cannot average them" in b_average.stderr and not (tmp_path / "x").exists()


def test_heads_of_one_task_are_averaged_with_the_weights(tiny_bert, tasks, tmp_path):
    a2 = _classifier(tiny_bert, str(tmp_path / "clsA2"), 2, seed=5)
    out = str(tmp_path / "same")
    merge(tiny_bert, [tasks["A"], a2], out, weights=[1.0, 3.0], heads="average")
    assert os.path.isfile(os.path.join(out, "model.safetensors"))  # one task: one head model
    merged = load_file(os.path.join(out, "model.safetensors"))
    h1, h2 = load_file(os.path.join(tasks["A"], "model.safetensors")), load_file(os.path.join(a2, "model.safetensors"))
    for n in ("classifier.weight", "classifier.bias"):
        want = (h1[n].double() + 3 * h2[n].double()) / 4
        assert torch.allclose(merged[n].double(), want, atol=1e-6, rtol=0)


def test_task_directories_are_named_after_the_inputs_and_made_unique(tiny_bert, tasks, tmp_path):
    for d in ("x", "y"):
        os.mkdir(tmp_path / d)
    diff(tiny_bert, tasks["A"], str(tmp_path / "x" / "task.diff"), DiffOptions(density=0.5))
    diff(tiny_bert, tasks["B"], str(tmp_path / "y" / "task.diff"), DiffOptions(density=0.5))
    out = str(tmp_path / "out")
    report = merge(tiny_bert, [str(tmp_path / "x" / "task.diff"), str(tmp_path / "y" / "task.diff")], out)
    assert [t["name"] for t in report.tasks] == ["task", "task-2"] and sorted(os.listdir(out)) == ["task", "task-2"]


# -- check ------------------------------------------------------------------------------------------


def test_check_agrees_with_merge_and_says_what_differs(tiny_bert, tasks, tmp_path):
    a, b = str(tmp_path / "A.diff"), str(tmp_path / "B.diff")
    diff(tiny_bert, tasks["A"], a, DiffOptions(density=0.5))
    diff(tiny_bert, tasks["B"], b, DiffOptions(density=0.5))
    ok = CliRunner().invoke(cli, ["check", tiny_bert, a, b, tasks["A"]])
    assert ok.exit_code == 0, ok.output
    # A head that does not fit the head model: named as the head, not as "another base model".
    tensors = load_file(os.path.join(tasks["A"], "model.safetensors"))
    bad_head = tmp_path / "badhead"
    bad_head.mkdir()
    (bad_head / "config.json").write_text(open(os.path.join(tasks["A"], "config.json")).read())
    save_file({**tensors, "classifier.extra": torch.zeros(2)}, str(bad_head / "model.safetensors"), {"format": "pt"})
    result = CliRunner().invoke(cli, ["check", tiny_bert, str(bad_head), "--json"])
    problems = [p["message"] for p in json.loads(result.stdout)["artifacts"][0]["problems"]]
    assert result.exit_code == 1 and problems == ["its body is the base's, but its head is not a BertForSequenceClassification's: 'classifier.extra' unexpected"]
    merged = CliRunner().invoke(cli, ["merge", tiny_bert, str(bad_head), "-o", str(tmp_path / "m")])
    assert merged.exit_code == 1 and "its head is not a BertForSequenceClassification's" in merged.stderr
    # A body that differs: named as the body.
    bad_body = tmp_path / "badbody"
    bad_body.mkdir()
    (bad_body / "config.json").write_text(open(os.path.join(tasks["A"], "config.json")).read())
    wrong = dict(tensors)
    wrong["bert.pooler.dense.weight"] = torch.zeros(64, 32)
    save_file(wrong, str(bad_body / "model.safetensors"), {"format": "pt"})
    result = CliRunner().invoke(cli, ["check", tiny_bert, str(bad_body), "--json"])
    problems = [p["message"] for p in json.loads(result.stdout)["artifacts"][0]["problems"]]
    assert result.exit_code == 1 and len(problems) == 1 and problems[0].startswith("a BertForSequenceClassification whose body differs from the base: 1 difference")
    refused = CliRunner().invoke(cli, ["diff", tiny_bert, str(bad_body), "-o", str(tmp_path / "x.diff"), "--dense"])
    assert refused.exit_code == 1 and "body differs" in refused.stderr and "209" not in refused.stderr


# -- training runs ------------------------------------------------------------------------------------


def test_train_full_writes_its_head_models_class_and_diffs_against_the_base(tiny_bert, tmp_path):
    from peftcli.evaluation import EvalOptions, evaluate

    data = _eval_data(tmp_path / "train.tsv", ["neg", "pos"])
    run = str(tmp_path / "full")
    result = CliRunner().invoke(cli, ["train", run, "--full", "--model", tiny_bert, "--data", data, "--steps", "2", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.load(open(os.path.join(run, "config.json")))["architectures"] == ["BertForSequenceClassification"]
    _assert_architecture_matches(run)
    d = str(tmp_path / "full.diff")
    assert CliRunner().invoke(cli, ["diff", tiny_bert, run, "-o", d, "--dense"]).exit_code == 0
    assert read_diff(d).task_head.labels == ["neg", "pos"]
    merged = str(tmp_path / "merged")
    merge(tiny_bert, [d], merged)
    assert torch.allclose(_logits(merged), _logits(run), atol=1e-5, rtol=0)
    assert evaluate(merged, EvalOptions(data=data))["eval_accuracy"] == evaluate(run, EvalOptions(data=data))["eval_accuracy"]


def test_a_lora_classification_run_converts_to_a_diff_with_its_head(tiny_bert, tasks, tmp_path):
    from peftcli.injection import inject
    from peftcli.methods import METHODS
    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    data = _eval_data(tmp_path / "train.tsv", LABELS[4])
    run = str(tmp_path / "lora")
    inject(tiny_bert, "lora", METHODS["lora"].config_cls(rank=4), run)
    train(run, TrainConfig(data=data, steps=3, batch_size=4, lr=1e-2))
    folded = str(tmp_path / "folded")
    merge(tiny_bert, [run], folded)  # the existing path: the run's head model
    _assert_architecture_matches(folded)
    d = str(tmp_path / "lora.diff")
    result = CliRunner().invoke(cli, ["convert", run, "--to", "diff", "-o", d, "--dense"])
    assert result.exit_code == 0, result.output + result.stderr
    head = read_diff(d).task_head
    assert head.architecture == "BertForSequenceClassification" and head.labels == sorted(LABELS[4])
    via_diff = str(tmp_path / "via-diff")
    merge(tiny_bert, [d], via_diff)
    assert torch.allclose(_logits(via_diff), _logits(folded), atol=1e-5, rtol=0)
    refused = CliRunner().invoke(cli, ["convert", d, "--to", "lora", "-o", str(tmp_path / "back"), "--rank", "2"])
    assert refused.exit_code == 2 and "carries a task head" in refused.stderr
    # With another task: a model per task, each evaluating with its own head.
    out = str(tmp_path / "multi")
    report = merge(tiny_bert, [d, tasks["A"]], out)
    assert [t["name"] for t in report.tasks] == ["lora", "clsA"]
    for t in report.tasks:
        _assert_architecture_matches(t["path"])


def test_a_decoder_classifier_drops_the_lm_head_and_keeps_its_body_names(tiny_llama, tmp_path):
    # LlamaForSequenceClassification keeps the base's names (model.*) and has no lm_head: φ covers
    # the body, the head is score.weight, and lm_head is left out of the diff and of the output.
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3)
    model.config.pad_token_id = 0
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    ft = str(tmp_path / "cls")
    model.save_pretrained(ft)
    d = str(tmp_path / "cls.diff")
    report = diff(tiny_llama, ft, d, DiffOptions(density=0.5))
    assert report.dropped == ["lm_head.weight"] and "lm_head.weight" not in read_diff(d).names
    assert sorted(report.task_head["tensors"]) == ["score.weight"] and report.task_head["pad_token_id"] == 0
    out = str(tmp_path / "merged")
    merge(tiny_llama, [ft], out)
    _assert_architecture_matches(out)
    assert "lm_head.weight" not in _tensor_names(out)
    assert torch.allclose(_logits(out), _logits(ft), atol=1e-5, rtol=0)
