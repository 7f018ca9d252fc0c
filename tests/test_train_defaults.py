"""Training defaults: declared by each method, used for what the command line leaves out, shown
by `train --help` and `inspect --budget`, and good enough that a run with no flags learns."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.errors import UsageError
from peftcli.methods import METHODS
from peftcli.methods.base import TrainDefaults
from peftcli.methods.lora import LoraConfig
from peftcli.training.config import TrainConfig
from peftcli.training.defaults import FULL_FINE_TUNING, warmup_steps, with_defaults
from peftcli.training.loop import train
from tests.helpers import cls_rows


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("defaults-data") / "cls.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in cls_rows(96)))
    return str(path)


def _accuracy(run: str, data: str, base: str) -> float:
    result = CliRunner().invoke(cli, ["evaluate", run, "--data", data, "--base", base, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["eval_accuracy"]


def test_a_classification_run_with_no_flags_learns(tiny_bert, cls_data, tmp_path):
    # The first word is the label: separable, but a frozen random encoder's features must be
    # read by a fresh head within 36 steps. (The case the defaults were made for, MiniLM on
    # SST-2, is benchmarks/defaults.py: at the former single rate of 2e-4 it stayed at chance.)
    run = str(tmp_path / "run")
    inject(tiny_bert, "lora", LoraConfig(rank=4), run)
    train(run, TrainConfig(data=cls_data, epochs=6, batch_size=16))
    saved = json.load(open(os.path.join(run, "train_args.json")))
    d = METHODS["lora"].train_defaults
    assert (saved["lr"], saved["head_lr"], saved["warmup_ratio"], saved["schedule"]) == (d.lr, d.head_lr, d.warmup_ratio, d.schedule)
    assert _accuracy(run, cls_data, tiny_bert) >= 0.85


def test_head_lr_is_the_heads_own_rate(tiny_bert, cls_data, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_bert, "lora", LoraConfig(rank=4), run)
    before = load_file(os.path.join(run, "adapter_model.safetensors"))
    # A head rate of ~0 freezes the fresh head's weights at their seeded init while φ trains;
    # with head_lr == lr (PEFT's way) the head moves.
    train(run, TrainConfig(data=cls_data, steps=5, batch_size=16, lr=1e-2, head_lr=1e-30, train_seed=3))
    frozen = load_file(os.path.join(run, "adapter_model.safetensors"))
    run2 = str(tmp_path / "run2")
    inject(tiny_bert, "lora", LoraConfig(rank=4), run2)
    train(run2, TrainConfig(data=cls_data, steps=5, batch_size=16, lr=1e-2, head_lr=1e-2, train_seed=3))
    moving = load_file(os.path.join(run2, "adapter_model.safetensors"))
    heads = [k for k in frozen if "classifier" in k]
    assert heads and all(k not in before for k in heads)
    lora = [k for k in frozen if "lora_B" in k]
    assert lora and all(frozen[k].abs().max() > 0 for k in lora)  # B starts at 0: φ trained
    for k in heads:
        assert not torch.equal(frozen[k], moving[k])
    # The frozen head equals the seeded initial head: train a run for 0 effective head steps again.
    run3 = str(tmp_path / "run3")
    inject(tiny_bert, "lora", LoraConfig(rank=4), run3)
    train(run3, TrainConfig(data=cls_data, steps=1, batch_size=16, lr=1e-2, head_lr=1e-30, train_seed=3))
    again = load_file(os.path.join(run3, "adapter_model.safetensors"))
    for k in heads:
        torch.testing.assert_close(frozen[k], again[k], rtol=0, atol=1e-20)


def test_every_method_declares_defaults_that_train_and_inspect_show(tiny_bert):
    help_text = CliRunner().invoke(cli, ["train", "--help"]).stdout
    for name, method in METHODS.items():
        d = method.train_defaults
        assert isinstance(d, TrainDefaults) and d.lr > 0 and d.lr_for("lm") > 0, name
        assert 0 <= d.warmup_ratio < 1 and d.schedule in ("linear", "cosine", "constant"), name
        assert any(line.split()[:2] == [name, f"{d.lr:g}"] for line in help_text.splitlines()), name
    assert any(line.split()[:2] == ["--full", f"{FULL_FINE_TUNING.lr:g}"] for line in help_text.splitlines())
    for name in ("lora", "prompt"):
        out = CliRunner().invoke(cli, ["inspect", tiny_bert, "--budget", name, "--json"])
        assert out.exit_code == 0, out.stderr
        assert TrainDefaults(**json.loads(out.stdout)["budget"]["train_defaults"]) == METHODS[name].train_defaults
        text = CliRunner().invoke(cli, ["inspect", tiny_bert, "--budget", name]).stdout
        assert f"train defaults: lr {METHODS[name].train_defaults.lr:g}" in text


def test_given_flags_win_and_the_rest_come_from_the_method():
    d = TrainDefaults(lr=1e-3, generative_lr=2e-4, head_lr=2e-3, warmup_ratio=0.1, schedule="cosine")
    cfg = with_defaults(TrainConfig(data="x", lr=5e-4), d, "classify")
    assert (cfg.lr, cfg.head_lr, cfg.warmup_ratio, cfg.schedule) == (5e-4, 2e-3, 0.1, "cosine")
    assert with_defaults(TrainConfig(data="x"), d, "sft").lr == 2e-4
    assert with_defaults(TrainConfig(data="x"), d, "classify").lr == 1e-3
    given = with_defaults(TrainConfig(data="x", warmup_steps=3, schedule="constant"), d, "lm")
    assert (given.warmup_ratio, warmup_steps(given, 100), given.schedule) == (None, 3, "constant")
    assert warmup_steps(with_defaults(TrainConfig(data="x"), d, "lm"), 62) == 6


@pytest.mark.parametrize("options, message", [
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "give `warmup_steps` or `warmup_ratio`, not both"),
    ({"warmup_ratio": 1.0}, "`warmup_ratio` must be in [0, 1)"),
    ({"head_lr": 0.0}, "`head_lr` must be positive"),
    ({"full": True, "model": "m", "lr": 1e-4, "head_lr": 1e-3}, "`head_lr` applies to adapter runs"),
])
def test_bad_defaults_options_are_refused_naming_the_field(options, message):
    with pytest.raises(UsageError) as err:
        TrainConfig(data="x", **options)
    assert str(err.value).startswith(message)


def test_the_cli_names_the_flags(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--data", "x.jsonl", "--warmup-steps", "2", "--warmup-ratio", "0.1"])
    assert result.exit_code == 2
    assert "give --warmup-steps or --warmup-ratio, not both" in result.stderr


def test_the_readme_method_table_gives_each_methods_defaults():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    header = "| method | φ | inject, train | PEFT read | PEFT write | folds | default lr: classify / lm, sft / new head |"
    lines = readme.split(header)[1].split("\n\n")[0].splitlines()[2:]
    cells = [line.strip("|").split("|") for line in lines]
    rows = {c[0].strip("` "): c[-1].strip() for c in cells if c[2].strip() == "✔"}  # the methods peftcli trains

    def cell(d: TrainDefaults) -> str:
        return f"{d.lr:g} / {d.lr_for('lm'):g} / " + (f"{d.head_lr:g}" if d.head_lr is not None else "as lr")

    assert rows == {**{name: cell(m.train_defaults) for name, m in METHODS.items()}, "train --full": cell(FULL_FINE_TUNING)}
