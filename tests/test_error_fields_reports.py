"""Library text that a command prints as report lines, not as its error, names fields too:
``peftcli check``'s problem lines and ``peftcli export --check``'s findings render them as the
command's flags, as the one-line error does; from Python they read as the fields."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from peftcli.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_check_problem_line_names_the_flag(tmp_path):
    base, pickled = tmp_path / "base", tmp_path / "pickled"
    base.mkdir()
    pickled.mkdir()
    save_file({"w": torch.ones(2, 3)}, str(base / "model.safetensors"))
    torch.save({"w": torch.ones(2, 3)}, str(pickled / "pytorch_model.bin"))
    result = run("check", base, pickled)
    assert result.exit_code == 1
    [line] = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert "pass --allow-pickle to load it" in line and "`" not in line, line


def test_an_export_finding_names_the_flag_and_the_library_the_field(tiny_llama, tmp_path):
    from peftcli.serving import ExportOptions, export

    adapter = tmp_path / "r12"
    assert run("inject", "lora", tiny_llama, "-o", adapter, "--rank", "12").exit_code == 0
    result = run("export", adapter, "--to", "vllm", "--check", "--max-lora-rank", "8")
    assert result.exit_code == 1
    [line] = [line for line in result.stdout.splitlines() if line.startswith("FAIL rank")]
    assert "rank 12 is above --max-lora-rank 8" in line and "a larger --max-lora-rank" in line and "`max_lora_rank`" not in line, line
    [finding] = [f for f in export(str(adapter), ExportOptions(check=True, max_lora_rank=8)).findings if f.rule == "rank"]
    assert "above `max_lora_rank` 8" in finding.message and "a larger `max_lora_rank`" in finding.way_out
