"""What a newcomer meets when training: one loss everywhere, --columns, misnamed TSV files,
multi-pass wall times, continuing a finished run, and --threads through peftcli.threads.

References are independent of the code under test: the window mean is recomputed here from a
run logging every step; a continued run is compared with an uninterrupted one trained in one go.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods import METHODS
from peftcli.methods.lora import LoraConfig
from peftcli.training import state as ckpt_state
from peftcli.training.config import TrainConfig
from peftcli.training.data import load_dataset
from peftcli.training.loop import train
from tests.helpers import cls_rows, lm_rows


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ux-data")
    lm, cls = lm_rows(64), cls_rows(32)
    return {"lm": _write_jsonl(d / "lm.jsonl", lm), "cls": _write_jsonl(d / "cls.jsonl", cls), "cls_rows": cls}


def _run(base, tmp_path, name="run"):
    run = str(tmp_path / name)
    inject(base, "lora", LoraConfig(rank=4), run)
    return run


def _metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]


def _bytes(run):
    return open(os.path.join(run, "adapter_model.safetensors"), "rb").read()


class Spy:
    """The progress interface, recording what each step shows."""

    def __init__(self, stop_at=None):
        self.shown, self.stop_at = {}, stop_at

    def start(self, total, step):
        pass

    def update(self, step, loss, *rest):
        if step == self.stop_at:
            raise KeyboardInterrupt  # a kill after step stop_at - 1's checkpoint
        self.shown[step] = loss

    def finish(self):
        pass


# --- one loss -------------------------------------------------------------------------------


def test_progress_metrics_and_summary_show_the_same_window_mean(tiny_llama, data, tmp_path):
    opts = dict(data=data["lm"], steps=5, batch_size=4, lr=1e-2)
    ref = _run(tiny_llama, tmp_path, "ref")
    train(ref, TrainConfig(**opts, log_every=1))  # the reference: every step's own loss
    per_step = [r["loss"] for r in _metrics(ref) if "loss" in r]
    assert len(per_step) == 5

    def mean(steps):  # steps are 1-based, inclusive
        window = per_step[steps[0] - 1 : steps[1]]
        return sum(window) / len(window)

    spy = Spy()
    run = _run(tiny_llama, tmp_path)
    summary = train(run, TrainConfig(**opts, log_every=2), progress=spy)
    rows = {r["step"]: r for r in _metrics(run)}
    assert sorted(rows) == [2, 4, 5]
    for step, window in ((2, (1, 2)), (4, (3, 4)), (5, (4, 5))):
        assert rows[step]["loss"] == pytest.approx(mean(window), rel=1e-6, abs=0)
        assert rows[step]["loss_steps"] == 2
        assert spy.shown[step] == rows[step]["loss"]  # the progress line shows the metrics line's number
    assert spy.shown[1] == pytest.approx(per_step[0], rel=1e-6)
    assert summary["final_loss"] == rows[5]["loss"] and summary["final_loss_steps"] == 2

    # The CLI says which quantity it shows, in the progress lines and the summary.
    cli_run = _run(tiny_llama, tmp_path, "cli")
    result = CliRunner().invoke(cli, ["train", cli_run, "--data", data["lm"], "--steps", "5", "--batch-size", "4", "--lr", "1e-2", "--log-every", "2"])
    assert result.exit_code == 0, result.stderr
    assert f"step 4/5 loss {rows[4]['loss']:.4f} (mean of steps 3-4)" in result.stderr
    assert f"{rows[5]['loss']:.4f} (mean of steps 4-5)" in result.stdout


# --- --columns and misnamed files -----------------------------------------------------------


def test_columns_maps_other_names_before_the_task_is_detected(data, tmp_path):
    rows = data["cls_rows"]
    plain = load_dataset(data["cls"])
    theirs = _write_jsonl(tmp_path / "theirs.jsonl", [{"review": r["text"], "sentiment": r["label"], "text": "not this"} for r in rows])
    mapped = load_dataset(theirs, columns="text=review,label=sentiment")
    assert mapped.task == "classify" == plain.task and mapped.labels == plain.labels
    assert [(e.text, e.label) for e in mapped.examples] == [(e.text, e.label) for e in plain.examples]
    csv_path = tmp_path / "theirs.csv"
    csv_path.write_text("ID,Review,Sentiment\n" + "".join(f'{i},"{r["text"]}",{r["label"]}\n' for i, r in enumerate(rows)))
    from_csv = load_dataset(str(csv_path), columns="text=review,label=sentiment")
    assert [(e.text, e.label) for e in from_csv.examples] == [(e.text, e.label) for e in plain.examples]
    sft = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "w1 w2", "a": "w3"}])
    ex = load_dataset(sft, columns="prompt=q,completion=a")
    assert ex.task == "sft" and (ex.examples[0].text, ex.examples[0].completion) == ("w1 w2", "w3")

    # Without --columns, the unknown header's error points at --columns.
    with pytest.raises(BadInputError) as err:
        load_dataset(str(csv_path))
    assert "`columns`" in err.value.hint


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("txt=review", UsageError, ["unknown role 'txt'", "review", "text, label, prompt, completion"]),
        ("text=review,label=review", UsageError, ["column 'review' two roles", "text and label"]),
        ("text=body,label=sentiment", BadInputError, ["no column 'body'", "the file's columns: review, sentiment"]),
        ("text review", UsageError, ["not ROLE=COLUMN"]),
    ],
)
def test_columns_errors_name_the_column(tmp_path, spec, error, words):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"review": "w1 w2", "sentiment": "pos"}, {"review": "w3", "sentiment": "neg"}])
    with pytest.raises(error) as err:
        load_dataset(path, columns=spec)
    for w in words:
        assert w in str(err.value), str(err.value)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("review,sentiment\nw1 w2,pos\nw3,neg\n")
    with pytest.raises(error) as err:
        load_dataset(str(csv_path), columns=spec)
    assert words[0] in str(err.value)


def test_columns_in_train_evaluate_and_their_options(tiny_bert, data, tmp_path):
    theirs = _write_jsonl(tmp_path / "theirs.jsonl", [{"review": r["text"], "sentiment": r["label"]} for r in data["cls_rows"]])
    bad = CliRunner().invoke(cli, ["train", _run(tiny_bert, tmp_path, "bad"), "--data", theirs, "--columns", "text=review,labl=sentiment"])
    assert bad.exit_code == 2 and "unknown role 'labl'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    run = _run(tiny_bert, tmp_path)
    ok = CliRunner().invoke(cli, ["train", run, "--data", theirs, "--columns", "text=review,label=sentiment", "--eval", theirs, "--steps", "2", "--json", "--quiet"])
    assert ok.exit_code == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["task"] == "classify" and doc["labels"] == ["neg", "pos"]
    assert json.load(open(os.path.join(run, "train_args.json")))["columns"] == "text=review,label=sentiment"
    mapped = CliRunner().invoke(cli, ["evaluate", run, "--data", theirs, "--columns", "text=review,label=sentiment", "--json", "--quiet"])
    plain = CliRunner().invoke(cli, ["evaluate", run, "--data", data["cls"], "--json", "--quiet"])
    assert mapped.exit_code == 0 and plain.exit_code == 0, mapped.stderr + plain.stderr
    a, b = json.loads(mapped.stdout), json.loads(plain.stdout)
    assert (a["eval_loss"], a["eval_accuracy"]) == (b["eval_loss"], b["eval_accuracy"])
    assert doc["best"]["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
    missing = CliRunner().invoke(cli, ["evaluate", run, "--data", theirs])
    assert missing.exit_code == 1 and "--columns" in missing.stderr


@pytest.mark.parametrize(
    "content",
    ["text\tlabel\nw1 w2\tpos\nw3\tneg\n", "w1 w2\tpos\nw3\tneg\nw4\tpos\n"],
    ids=["header", "headerless"],
)
def test_a_tab_separated_file_named_csv_is_refused_with_a_rename_hint(tmp_path, content):
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(BadInputError) as err:
        load_dataset(str(path))
    assert "tabs" in str(err.value) and ".tsv" in err.value.hint
    (tmp_path / "data.tsv").write_text(content)
    assert load_dataset(str(tmp_path / "data.tsv")).task == "classify"


def test_a_csv_row_with_tabs_among_comma_rows_hints_at_tsv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nw1 w2,pos\nw3\tneg\n")
    with pytest.raises(BadInputError) as err:
        load_dataset(str(path))
    assert "data.csv:3: 1 fields" in str(err.value) and ".tsv" in err.value.hint


# --- wall time of multi-pass runs -----------------------------------------------------------


def test_lt_sft_and_lottery_wall_time_covers_every_phase(tiny_llama, data, tmp_path):
    cfg = TrainConfig(data=data["lm"], steps=2, phase1_steps=2, batch_size=4, lr=1e-2, phase1_lr=1e-3)
    lt = str(tmp_path / "lt")
    inject(tiny_llama, "lt-sft", METHODS["lt-sft"].config_cls(top_k=200), lt)
    s = train(lt, cfg)
    split = s["wall_seconds_by_phase"]
    assert list(split) == ["phase 1", "selection", "phase 2"]
    assert split["phase 1"] == s["phase1"]["wall_seconds"] > 0 and split["phase 2"] > 0
    assert s["wall_seconds"] == pytest.approx(sum(split.values())) and s["wall_seconds"] > split["phase 2"]
    with pytest.raises(UsageError, match="trains in phases or rounds"):
        train(lt, None, resume=True, steps=10)

    lot = str(tmp_path / "lottery")
    inject(tiny_llama, "lottery", METHODS["lottery"].config_cls(rounds=1, prune_rate=0.5), lot)
    s = train(lot, cfg)
    rounds = [r for r in _metrics(lot) if "round" in r]
    assert list(s["wall_seconds_by_phase"]) == ["round 0", "round 1"]
    assert s["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in rounds)) and s["wall_seconds"] > rounds[-1]["wall_seconds"]


# --- continuing a finished run --------------------------------------------------------------


def test_a_finished_run_continues_to_more_steps(tiny_llama, data, tmp_path):
    opts = dict(data=data["lm"], batch_size=4, lr=1e-2, schedule="constant", log_every=1)
    # The reference: 8 steps in one go. With a constant lr the schedule does not depend on the
    # total, so 4 steps continued to 8 must give the same bytes (data order, optimizer, RNG go on).
    ref = _run(tiny_llama, tmp_path, "ref")
    train(ref, TrainConfig(**opts, steps=8))

    run = _run(tiny_llama, tmp_path)
    train(run, TrainConfig(**opts, steps=4))  # no --save-every: the final state is kept anyway
    four, first = _bytes(run), _metrics(run)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    again = CliRunner().invoke(cli, ["train", run, "--resume"])
    assert again.exit_code == 2 and "already finished at step 4" in again.stderr and "--steps" in again.stderr
    ok = CliRunner().invoke(cli, ["train", run, "--resume", "--steps", "8", "--json", "--quiet"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"] == 8
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[:4] == first
    assert _bytes(run) != four and _bytes(run) == _bytes(ref)
    assert rows == _metrics(ref)
    assert json.load(open(os.path.join(run, "train_args.json")))["steps"] == 8

    short = CliRunner().invoke(cli, ["train", run, "--resume", "--steps", "8"])
    assert short.exit_code == 2 and "already has 8 steps" in short.stderr and len(short.stderr.strip().splitlines()) == 1
    other = CliRunner().invoke(cli, ["train", run, "--resume", "--steps", "9", "--lr", "1"])
    assert other.exit_code == 2 and "drop --lr" in other.stderr


def test_a_continued_run_killed_midway_resumes_to_the_same_bytes(tiny_llama, data, tmp_path):
    opts = dict(data=data["lm"], batch_size=4, lr=1e-2, save_every=2, log_every=1)
    ref = _run(tiny_llama, tmp_path, "ref")
    train(ref, TrainConfig(**opts, steps=4))
    train(ref, None, resume=True, steps=8)  # continued in one go

    run = _run(tiny_llama, tmp_path)
    train(run, TrainConfig(**opts, steps=4))
    with pytest.raises(KeyboardInterrupt):
        train(run, None, resume=True, steps=8, progress=Spy(stop_at=7))  # killed after step 6's checkpoint
    assert os.path.basename(ckpt_state.latest_checkpoint(run)) == "step-0000006"
    train(run, None, resume=True)  # the run now goes to 8
    assert _bytes(run) == _bytes(ref) and _metrics(run) == _metrics(ref)

    # The linear schedule is that of an 8-step run from step 4 on: the lr after each step s is
    # 1e-2 × (1 − s/8), where the 4-step run had decayed to 0.
    lrs = {r["step"]: r["lr"] for r in _metrics(run)}
    assert lrs[4] == 0.0
    for s in range(5, 9):
        assert lrs[s] == pytest.approx(1e-2 * (1 - s / 8), abs=1e-12)


def test_train_threads_go_through_the_shared_validator():
    from peftcli import threads
    from peftcli.training import loop

    assert loop.torch_threads is threads.torch_threads
