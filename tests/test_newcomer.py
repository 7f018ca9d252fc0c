"""What a newcomer meets first: defaults, error lines and outputs that say what they are.

inject without -o, --debug anywhere, thread exhaustion as a resource error, a text file given
as a checkpoint, a .diff's entries (not values plus indices), combine's expression, and .diff
files that are the same bytes wherever they are made.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from peftcli.artifacts.sparse_diff import read_diff
from peftcli.cli import cli
from peftcli.cli.combine_cmd import expression


def run(*args, cwd=None):
    if cwd is None:
        return CliRunner().invoke(cli, [str(a) for a in args])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_inject_without_output_writes_a_named_run_directory(tiny_llama, tmp_path):
    result = run("inject", "lora", tiny_llama, "--rank", "2", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    want = os.path.join("runs", f"{os.path.basename(tiny_llama)}-lora")
    assert f"wrote {want}" in result.stdout
    assert os.path.isfile(tmp_path / want / "adapter_config.json")
    again = run("inject", "lora", tiny_llama, "--rank", "2", cwd=tmp_path)  # never replaced silently
    assert again.exit_code == 2 and "already exists" in one_error_line(again)


def test_inject_default_output_of_a_model_file_is_named_after_its_directory(tiny_llama, tmp_path):
    from peftcli.cli.inject_cmd import default_output

    assert default_output(os.path.join(tiny_llama, "model.safetensors"), "ia3") == os.path.join(
        "runs", f"{os.path.basename(tiny_llama)}-ia3"
    )
    weights = tmp_path / "smol.safetensors"
    weights.write_bytes(b"")
    assert default_output(str(weights), "lora") == os.path.join("runs", "smol-lora")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_anywhere_before_double_dash(tmp_path, where):
    missing = tmp_path / "nope"
    args = ["--debug", "inspect", missing] if where == "before" else ["inspect", missing, "--debug"]
    result = run(*args)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "error:" in result.stderr  # the traceback, then the line
    plain = run("inspect", missing)
    assert "Traceback" not in plain.stderr and "no such option" not in plain.stderr


def test_thread_exhaustion_is_a_resource_error(monkeypatch, tmp_path):
    import peftcli.summary

    def refuse(*a, **k):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(peftcli.summary, "summarize", refuse)
    monkeypatch.setattr("peftcli.cli.inspect_cmd.summarize", refuse, raising=False)
    (tmp_path / "m.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = run("inspect", tmp_path / "m.safetensors")
    line = one_error_line(result)
    assert result.exit_code == 3 and "refused to start a thread" in line and "internal error" not in line


@pytest.mark.parametrize(
    "content, kind",
    [(b"hello world, this is a README\n", "a text file"), (b"GGUF\x03\x00\x00\x00" + bytes(64), "a GGUF file"),
     (b"PK\x03\x04" + bytes(64), "a PyTorch pickle")],
)
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_a_file_of_another_format_says_what_it_is(tiny_llama, tmp_path, content, kind, command):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    args = ["inspect", path] if command == "inspect" else ["merge", tiny_llama, path, "-o", tmp_path / "out"]
    line = one_error_line(run(*args))
    assert kind.removeprefix("a ") in line and "header length" not in line
    assert "adapter directory" in line or "--allow-pickle" in line


@pytest.fixture(scope="module")
def a_diff(tiny_llama, tmp_path_factory):
    """A LoRA run with a non-zero B, converted to a 10% diff (sparse tensors: idx + val)."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("newcomer")
    assert run("inject", "lora", tiny_llama, "-o", root / "lora", "--rank", "2").exit_code == 0
    weights = str(root / "lora" / "adapter_model.safetensors")
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=g) if "lora_B" in k else v) for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    assert run("convert", root / "lora", "--to", "diff", "--density", "0.1", "-o", root / "task.diff").exit_code == 0
    return root


def test_inspect_of_a_diff_counts_entries_not_indices(a_diff):
    path = a_diff / "task.diff"
    doc = json.loads(run("inspect", path, "--json").stdout)
    with read_diff(str(path)) as d:
        entries = sum(t.numel for n, t in d.ckpt.tensors.items() if not n.endswith(".idx"))
        indices = sum(t.numel for n, t in d.ckpt.tensors.items() if n.endswith(".idx"))
    assert indices > 0 and doc["diff"]["entries"] == entries == doc["num_params"] - indices
    text = run("inspect", path).stdout
    assert f"entries    {entries:,}" in text and "parameters" not in text.split("modules")[0]


def test_combine_prints_the_expression_as_written(a_diff, tmp_path):
    assert expression([1.0, -1.0], ["a", "b"]) == "a − b"
    assert expression([0.5, 2.0], ["a", "b"]) == "0.5·a + 2·b"
    assert expression([-1.0], ["a"]) == "−a"
    diff = a_diff / "task.diff"
    result = run("combine", diff, diff, "--op", "subtract", "-o", tmp_path / "zero.diff")
    assert result.exit_code == 0, result.output
    assert f"subtract: {diff} − {diff}" in result.stdout and "+ -" not in result.stdout


def test_a_diff_is_the_same_bytes_wherever_it_is_made_and_finds_its_base(tiny_llama, a_diff, tmp_path):
    for place in ("one", "two/deeper"):
        work = tmp_path / place
        shutil.copytree(tiny_llama, work / "base")
        shutil.copytree(a_diff / "lora", work / "lora")
        config = json.loads((work / "lora" / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "base"  # relative, as a user's copy would say
        (work / "lora" / "adapter_config.json").write_text(json.dumps(config))
        result = run("convert", "lora", "--to", "diff", "--density", "0.1", "--base", "base", "-o", "task.diff", cwd=work)
        assert result.exit_code == 0, result.output
    one, two = (tmp_path / "one" / "task.diff").read_bytes(), (tmp_path / "two" / "deeper" / "task.diff").read_bytes()
    assert one == two
    with read_diff(str(tmp_path / "one" / "task.diff")) as d:
        assert d.provenance["inputs"] == {"base": "base", "adapter": "lora"}
    # the recorded base is found relative to the diff, from any working directory
    result = run("convert", tmp_path / "one" / "task.diff", "--to", "lora", "--rank", "2", "-o", tmp_path / "back")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["edited.diff", "edited.safetensors"])
def test_a_diff_whose_format_says_otherwise_is_not_described_as_a_checkpoint(a_diff, tmp_path, name):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(a_diff / "task.diff"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["format"] = "pt"  # what a checkpoint says
    save_file(tensors, str(tmp_path / name), metadata=meta)
    result = run("inspect", tmp_path / name)
    assert result.exit_code == 1 and "looks like a sparse diff" in one_error_line(result)
    assert "checkpoint" not in result.stdout
