"""The merge-method registry: every method is offered by the CLI, estimated by check, and an
unknown name is an error naming the closest one (never a fall-through to another method)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.errors import UsageError
from peftcli.merging.methods import REGISTRY, get_merge_method


def test_every_registered_method_is_a_merge_and_check_choice_with_its_flags():
    for command in ("merge", "check"):
        text = CliRunner().invoke(cli, [command, "--help"], terminal_width=400).output
        choices = text.split("--method [", 1)[1].split("]", 1)[0].split("|")
        assert choices == list(REGISTRY), command
    text = CliRunner().invoke(cli, ["merge", "--help"], terminal_width=400).output
    for m in REGISTRY.values():
        for name in m.option_names():
            assert f"--{name.replace('_', '-')}" in text, (m.name, name)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_method_has_an_estimate(name, tiny_llama, tmp_path):
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.merging.estimate import Input, estimate

    with open_checkpoint(tiny_llama) as ckpt:
        touched = {n for n, t in ckpt.tensors.items() if t.dtype in ("F32", "BF16", "F16")}
        inputs = [Input("checkpoint", touched, list(ckpt.files)) for _ in range(2)]
        ranged = estimate(ckpt, inputs, name)
        whole = estimate(ckpt, [Input("adapter", touched, list(ckpt.files)) for _ in range(2)], name)
    assert ranged.method == name and ranged.changed == len(touched) and ranged.seconds > 0
    assert whole.peak_bytes > 0 and whole.seconds > 0


def test_an_unknown_method_names_the_closest_and_never_falls_through():
    with pytest.raises(UsageError) as caught:
        get_merge_method("dare_ties")
    assert "did you mean dare-ties" in caught.value.hint and "\n" not in str(caught.value)
    from peftcli.merging.engine import merge

    with pytest.raises(UsageError, match="unknown merge method"):
        merge("unused", ["a.diff"], "out", method="tie")  # refused before anything is opened


def test_a_parameter_the_method_does_not_take_is_refused_naming_it():
    with pytest.raises(UsageError) as caught:
        get_merge_method("linear").configure({"density": 0.5})
    assert caught.value.message == "linear takes no density" and "ties" in caught.value.hint


def test_check_says_what_merge_says_of_the_number_of_inputs(tiny_llama, tmp_path):
    runner = CliRunner()
    runs = []
    for i in range(3):
        run = str(tmp_path / f"lora{i}")
        assert runner.invoke(cli, ["inject", "lora", tiny_llama, "-o", run, "--seed", str(i)]).exit_code == 0
        runs.append(run)
    checked = json.loads(runner.invoke(cli, ["check", tiny_llama, *runs, "--method", "slerp", "--json"]).stdout)
    merged = runner.invoke(cli, ["merge", tiny_llama, *runs, "--method", "slerp", "--t", "0.5", "-o", str(tmp_path / "m")])
    assert merged.exit_code == 2 and "slerp merges exactly 2 models, got 3" in merged.stderr
    assert "slerp merges exactly 2 models, got 3" in checked["merge_refusal"]
    two = json.loads(runner.invoke(cli, ["check", tiny_llama, *runs[:2], "--method", "slerp", "--json"]).stdout)
    assert two["merge_refusal"] is None and two["merge"] is not None
