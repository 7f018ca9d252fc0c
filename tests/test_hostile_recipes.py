"""Hostile recipes: alias bombs, recursive aliases, deep nesting, FIFOs and devices as the
recipe path, absurd built-in sizes and seeds, and a workdir whose directories link out of it.
Each is one ``error:`` line, quickly, with nothing written outside the workdir."""

from __future__ import annotations

import os
import threading

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.errors import UsageError
from peftcli.recipes import plan
from peftcli.recipes.recipe import execute


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def one_error_line(result, code: int, message: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    body = "\n".join("    " + line for line in lines)
    return f"vars:\n  x: 1\nsteps:\n  check:\n    base: m\n    extra:\n{body}\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text, message",
    [
        (billion_laughs(), "values once its aliases are expanded"),  # 10⁹ strings from 1 kB
        ("steps: &s {check: {base: m, x: *s}}\n", "an alias refers to a value that contains it"),
        ("steps: {check: {base: m, x: " + "[" * 5000 + "]" * 5000 + "}}\n", "nested deeper than"),
        ("steps: {check: {base: m, x: " + "{a: " * 2000 + "1" + "}" * 2000 + "}}\n", "nested deeper than"),
    ],
    ids=["billion-laughs", "recursive-alias", "deep-list", "deep-mapping"],
)
def test_a_hostile_yaml_recipe_is_one_line_error(text, message, tmp_path, in_tmp):
    r = write(tmp_path / "bad.yaml", text)
    one_error_line(run("run", r, "--dry-run"), 1, message)


def test_an_alias_reused_a_few_times_is_fine(tmp_path, in_tmp):
    r = write(tmp_path / "ok.yaml", "vars: {t: &t [q_proj, v_proj]}\nsteps:\n  check: {base: m, artifacts: *t}\n")
    assert plan(r).steps[0].kind == "check"


@pytest.mark.timeout(30)
def test_a_fifo_recipe_without_a_writer_is_refused_without_waiting(tmp_path, in_tmp):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    done = threading.Event()
    result = {}

    def go():
        result["r"] = run("run", fifo, "--dry-run")
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(20), "reading a FIFO recipe hung"
    one_error_line(result["r"], 1, "is not a regular file")


def test_a_device_recipe_is_refused_unread(tmp_path, in_tmp):
    one_error_line(run("run", "/dev/zero", "--dry-run"), 1, "is not a regular file")  # reading would never end


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{builtin: sentiment, examples: 1000000000}", "examples must be an integer from 1 to 1000000"),
        ("{builtin: topic, seed: 100000000000000000000000}", "seed must be an integer from 0 to 4294967295"),
        ("{builtin: topic, seed: -1}", "seed must be an integer from 0 to"),
    ],
)
def test_absurd_builtin_data_sizes_and_seeds_are_refused_when_planned(spec, message, tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", f"data:\n  train: {spec}\nsteps: {{check: {{base: m}}}}\n")
    with pytest.raises(UsageError, match=message):
        plan(r)
    one_error_line(run("run", r, "--dry-run"), 2, message)


def test_absurd_tiny_model_seed_is_refused_when_planned(tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", "model: {builtin: tiny, seed: 100000000000000000000000}\nsteps: {check: {base: '${model}'}}\n")
    with pytest.raises(UsageError, match="seed must be an integer from 0 to"):
        plan(r)


def test_prepare_bounds_its_arguments(tmp_path):
    from peftcli.cli.prepare import prepare

    out = tmp_path / "d.jsonl"
    for args in (["--examples", "1000000000"], ["--seed", str(10**23)]):
        result = CliRunner().invoke(prepare, ["topic", str(out), *args])
        assert result.exit_code == 2 and result.stderr.startswith("error: --examples must be from 1 to")
    tiny = CliRunner().invoke(prepare, ["tiny", str(tmp_path / "m"), "--seed", str(10**23)])
    assert tiny.exit_code == 2 and tiny.stderr.startswith("error: --seed must be from 0 to")
    assert os.listdir(tmp_path) == []


# -- the workdir boundary at write time ---------------------------------------------------------


def test_builtin_data_is_not_written_through_a_data_link_out_of_the_workdir(tmp_path, in_tmp):
    outside = tmp_path / "outside"
    outside.mkdir()
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(outside, wd / "data")
    r = write(tmp_path / "r.yaml", "data:\n  train: {builtin: topic, examples: 4}\nsteps: {check: {base: m}}\n")
    one_error_line(run("run", r, "-o", wd), 2, "is outside the workdir")
    assert os.listdir(outside) == []


def test_a_link_made_after_planning_is_not_written_through(tmp_path, in_tmp):
    # Planned while data/ was missing; replaced by a link to elsewhere before the write.
    outside = tmp_path / "outside"
    outside.mkdir()
    r = write(tmp_path / "r.yaml", "data:\n  train: {builtin: topic, examples: 4}\nsteps: {check: {base: m}}\n")
    p = plan(r, workdir="wd")
    os.makedirs("wd")
    os.symlink(outside, "wd/data")
    with pytest.raises(UsageError, match="is outside the workdir"):
        execute(p)
    assert os.listdir(outside) == []


def test_a_step_output_linked_out_after_planning_is_not_written_through(tmp_path, in_tmp):
    outside = tmp_path / "outside"
    outside.mkdir()
    r = write(tmp_path / "r.yaml", "steps:\n  inject: {method: lora, model: m, output: runs/lora}\n")
    p = plan(r, workdir="wd")
    os.makedirs("wd")
    os.symlink(outside, "wd/runs")
    with pytest.raises(UsageError, match="step inject: .* is outside the workdir"):
        execute(p)
    assert os.listdir(outside) == []
