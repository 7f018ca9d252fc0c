"""Option values that cannot work are refused up front: exit 2 and one line.

Floats must be finite (nan and inf pass every `x <= 0` check), numbers are written in ASCII
digits (Python's int() and float() read '١٢'), counts have bounds (a thread or process per
"100000" stops the machine; 2**63 steps never finish), and merge weights must stay finite in
the float32 the merge computes in.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.options import MAX_STEPS, from_options
from peftcli.training.config import TrainConfig


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_usage_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(")"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "100000"], "--threads 100000"),
        (["--steps", "9223372036854775807"], "--steps 9,223,372,036,854,775,807 is more than 1,000,000,000"),
        (["--epochs", "nan"], "--epochs nan is not a finite number"),
        (["--epochs", "inf"], "--epochs inf is not a finite number"),
        (["--lr", "nan"], "--lr nan is not a finite number"),
        (["--lr", "inf"], "--lr inf is not a finite number"),
        (["--max-grad-norm", "nan"], "--max-grad-norm nan is not a finite number"),
        (["--weight-decay", "nan"], "--weight-decay nan is not a finite number"),
        (["--phase1-lr", "nan"], "--phase1-lr nan is not a finite number"),
        (["--warmup-steps", str(10**12)], "--warmup-steps 1,000,000,000,000 is more than"),
        (["--steps", "١٢"], "'١٢' is not a valid integer"),
        (["--lr", "١e-3"], "'١e-3' is not a valid float"),
        (["--batch-size", "1_000"], "'1_000' is not a valid integer"),
        (["--nproc", "100000"], "--nproc 100000 is more than this machine's"),
    ],
)
def test_train_options(tmp_path, args, message):
    assert_usage_error(invoke("train", tmp_path / "run", "--data", "x.jsonl", *args), message)


def test_threads_read_back_from_a_run_are_bounded_too(tiny_llama, tmp_path):
    run = tmp_path / "run"
    assert invoke("inject", "lora", tiny_llama, "-o", run).exit_code == 0
    (run / "train_args.json").write_text(json.dumps({"threads": 100000, "data": "x.jsonl", "steps": 3}))
    assert_usage_error(invoke("train", run, "--resume"), "--threads 100000")


def test_the_bounds_leave_real_values_alone():
    cores = os.cpu_count() or 1
    cfg = from_options(TrainConfig, {"steps": MAX_STEPS, "threads": cores, "lr": 1e-3, "max_grad_norm": 0.0})
    assert (cfg.steps, cfg.threads) == (MAX_STEPS, cores)
    assert from_options(TrainConfig, {"epochs": 0.5}).epochs == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["inject", "lora", "{model}", "-o", "{tmp}/o", "--layers", "١-٣"], "invalid --layers '١-٣'"),
        (["inject", "lora", "{model}", "-o", "{tmp}/o", "--layers", "٠"], "invalid --layers '٠'"),
        (["inspect", "{model}", "--budget", "lora", "--layers", "¹"], "invalid --layers '¹'"),
        (["inject", "lora", "{model}", "-o", "{tmp}/o", "--rank", "٨"], "'٨' is not a valid integer"),
        (["inject", "lora", "{model}", "-o", "{tmp}/o", "--dropout", "nan"], "--dropout"),
        (["inject", "lora", "{model}", "-o", "{tmp}/o", "--seed", "٣"], "'٣' is not a valid integer"),
        (["inspect", "{model}", "--depth", "٣"], "'٣' is not a valid integer"),
        (["merge", "{model}", "{model}", "{model}", "--weights", "1e308,1e308", "-o", "{tmp}/o"], "--weights"),
        (["merge", "{model}", "{model}", "{model}", "--weights", "3e38,3e38", "-o", "{tmp}/o"], "beyond float32"),
        (["merge", "{model}", "{model}", "--weights", "nan", "-o", "{tmp}/o"], "not a finite number"),
        (["merge", "{model}", "{model}", "--weights", "١", "-o", "{tmp}/o"], "'١' is not a valid float"),
        (["merge", "{model}", "{model}", "--method", "ties", "--density", "nan", "-o", "{tmp}/o"], "not a finite number"),
    ],
)
def test_other_commands(tiny_llama, tmp_path, args, message):
    result = invoke(*[a.replace("{model}", tiny_llama).replace("{tmp}", str(tmp_path)) for a in args])
    assert_usage_error(result, message)
    assert not (tmp_path / "o").exists()


def test_epochs_that_make_too_many_steps_are_refused():
    from peftcli.errors import UsageError
    from peftcli.training.config import check_total_steps

    assert check_total_steps(MAX_STEPS) == MAX_STEPS
    with pytest.raises(UsageError, match="more than the 1,000,000,000 a run may have"):
        check_total_steps(MAX_STEPS + 1)


def test_shard_sizes_are_written_in_ascii_digits():
    from peftcli.checkpoint.writer import parse_size
    from peftcli.errors import UsageError

    assert parse_size("12GB") == 12 * 10**9
    with pytest.raises(UsageError, match="invalid size"):
        parse_size("١٢GB")  # Arabic-Indic digits: \d matches them unless ASCII
