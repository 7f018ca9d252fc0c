"""The CLI contract: help, start-up imports, streams, exit codes, --json schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import click
from click.testing import CliRunner

from peftcli.cli import cli
from tests.test_docs import command_section, read_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_help_lists_every_subcommand():
    result = run("--help")
    assert result.exit_code == 0
    for name in cli.commands:
        assert f"  {name} " in result.stdout


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_subcommand_has_help_with_an_example(name):
    result = run(name, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"peftcli {name}" in result.stdout


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys\n"
        "from peftcli.cli import cli\n"
        "try:\n    cli.main(['--help'], prog_name='peftcli')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules]\n"
        "sys.stderr.write(repr(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "[]"


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "peftcli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("peftcli, version ")


def test_inspect_json_schema(tiny_llama):
    result = run("inspect", tiny_llama, "--json", "--tensors")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON document
    for key in ("schema", "path", "format", "storage", "files", "num_tensors", "num_params", "bytes", "dtypes", "config", "modules", "tensors"):
        assert key in doc, key
    assert doc["format"] == "checkpoint"
    assert doc["storage"] == "safetensors"
    assert doc["config"]["model_type"] == "llama"
    assert doc["config"]["num_key_value_heads"] == 2
    assert doc["config"]["tie_word_embeddings"] is False
    assert len(doc["tensors"]) == doc["num_tensors"]
    assert sum(t["params"] for t in doc["tensors"]) == doc["num_params"]
    t = doc["tensors"][0]
    assert set(t) == {"name", "shape", "dtype", "params", "shard"}
    assert "tensors" not in json.loads(run("inspect", tiny_llama, "--json").stdout)


def _schema_table(readme: str, heading: str) -> dict[str, str]:
    """The rows of the documentation's field table under ``heading``: field name -> its description."""
    section = readme[readme.index(heading):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = line
        elif rows and not line.startswith("|"):
            break
    return rows


def test_every_inspect_json_field_is_in_the_readme_schema_table(tiny_llama, tmp_path):
    from peftcli.diffing import DiffOptions, diff
    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig
    from tests.helpers import noisy_copy

    table = _schema_table(read_docs(), "**`--json` schema** (`peftcli.inspect/1`")
    adapter = str(tmp_path / "lora")
    inject(tiny_llama, "lora", LoraConfig(), adapter)
    task = str(tmp_path / "task.diff")
    diff(tiny_llama, noisy_copy(tiny_llama, str(tmp_path / "ft"), 1), task, DiffOptions(density=0.1))
    cases = [
        (tiny_llama, "--tensors", "--budget", "lora", "--filter", "layers"),
        (adapter, "--tensors"),
        (task, "--tensors"),
    ]
    for path, *flags in cases:
        doc = json.loads(run("inspect", path, "--json", *flags).stdout)
        for key, value in doc.items():
            assert key in table, f"inspect --json field {key!r} is not in the schema table of docs/inspect.md"
            if isinstance(value, dict) and key in ("budget", "diff", "filter"):
                for sub in value:  # the nested fields are named in the row
                    assert sub in table[key], f"{key}.{sub} is not described in docs/inspect.md's row for {key!r}"


def test_inspect_filter_narrows_the_budget_listing_not_its_totals(tiny_llama):
    whole = json.loads(run("inspect", tiny_llama, "--json", "--budget", "lora").stdout)["budget"]
    doc = json.loads(run("inspect", tiny_llama, "--json", "--budget", "lora", "--filter", r"layers\.0\.").stdout)["budget"]
    expected = [t for t in whole["targets"] if ".layers.0." in t["module"]]
    assert doc["targets"] == expected and 0 < len(expected) < len(whole["targets"])
    assert doc["filter"] == {
        "pattern": r"layers\.0\.", "applies": True, "num_targets": len(expected), "trainable_params": sum(t["params"] for t in expected)
    }
    by_weight = json.loads(run("inspect", tiny_llama, "--json", "--budget", "lora", "--filter", r"q_proj\.weight$").stdout)["budget"]
    assert [t["module"] for t in by_weight["targets"]] == [t["module"] for t in whole["targets"] if t["module"].endswith("q_proj")]
    top_k = json.loads(run("inspect", tiny_llama, "--json", "--budget", "lt-sft", "--density", "0.01", "--filter", "top").stdout)["budget"]
    assert top_k["filter"]["applies"] is False and top_k["targets"] and top_k["filter"]["num_targets"] == len(top_k["targets"])
    assert doc["trainable_params"] == whole["trainable_params"]
    text = run("inspect", tiny_llama, "--budget", "lora", "--filter", r"layers\.0\.").stdout
    assert ".layers.1." not in text and f"matches {len(expected)} targets" in text


def test_text_output_off_a_terminal_has_no_trailing_spaces(tiny_llama):
    text = run("inspect", tiny_llama, "--budget", "lora").stdout
    assert text.count("\n") > 20 and all(line == line.rstrip() for line in text.splitlines())


def test_inspect_filter_narrows_listing(tiny_llama):
    doc = json.loads(run("inspect", tiny_llama, "--json", "--tensors", "--filter", r"layers\.0\..*proj").stdout)
    names = [t["name"] for t in doc["tensors"]]
    assert len(names) == 7 and all(".layers.0." in n and "proj" in n for n in names)
    assert doc["filter"]["num_tensors"] == 7


def test_inspect_text_output_has_no_ansi_off_a_terminal(tiny_llama):
    result = run("inspect", tiny_llama, "--tensors")
    assert result.exit_code == 0
    assert "\x1b[" not in result.stdout
    assert "layers.{0..1}" in result.stdout and "LlamaForCausalLM" in result.stdout
    assert result.stderr == ""


def test_no_color_is_honoured_even_on_a_forced_terminal(tiny_llama):
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "", "TTY_COMPATIBLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli", "inspect", tiny_llama], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert proc.returncode == 0 and "\x1b[3" not in proc.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["inspect", "/nonexistent/model"], 1, "no such file or directory"),
        (["inspect"], 2, "Missing argument 'PATH'"),
        (["inspect", "{model}", "--rank", "4"], 2, "--rank only applies with --budget"),
        (["inspect", "{model}", "--budget", "lora", "--rank", "0"], 2, "--rank must be positive"),
        (["inspect", "{model}", "--budget", "lora", "--rank", "65"], 2, "larger than min(out, in)"),
        (["inspect", "{model}", "--budget", "lora", "--targets", "nope"], 2, "matches no linear module"),
        (["inspect", "{model}", "--budget", "lora", "--alpha", "nan"], 2, "--alpha must be a positive number"),
        (["inspect", "{model}", "--budget", "lora", "--layers", "0-9999999999"], 2, "beyond any real model"),
        (["inspect", "{model}", "--filter", "a{99999999999}"], 2, "invalid --filter regex"),
        (["inject", "lora", "{model}", "-o", ""], 2, "the output path is empty"),
        (["inject", "lora", "{model}", "-o", "{model}/config.json", "--force"], 2, "would overwrite the input"),
        (["inject", "lora", "{model}", "-o", "{model}/model.safetensors", "--force"], 2, "would overwrite the input"),
        (["inspect", "{model}", "--filter", "("], 2, "invalid --filter regex"),
        (["inspect", "{model}", "--bogus"], 2, "No such option"),
        (["frobnicate"], 2, "No such command"),
        (["inject", "nosuch", "{model}", "-o", "{model}/x"], 2, "unknown method 'nosuch' (choose one of: lora, ia3,"),
        (["inject", "lorra", "{model}", "-o", "{model}/x"], 2, "unknown method 'lorra' (did you mean 'lora'?)"),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(tiny_llama, args, code, message):
    result = run(*[a.replace("{model}", tiny_llama) for a in args])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert lines[0].endswith(")"), lines[0]  # every error ends with its hint: what to do about it
    assert result.stdout == ""


def test_debug_shows_the_traceback():
    result = run("--debug", "inspect", "/nonexistent/model")
    assert result.exit_code == 1
    *trace, last = result.stderr.strip().splitlines()
    assert "Traceback (most recent call last):" in trace
    assert last.startswith("error: /nonexistent/model: no such file or directory")


def test_pickle_requires_the_flag_on_the_cli(tmp_path):
    import torch

    path = str(tmp_path / "model.bin")
    torch.save({"w": torch.ones(3)}, path)
    refused = run("inspect", path)
    assert refused.exit_code == 1 and "--allow-pickle" in refused.stderr
    allowed = run("inspect", path, "--allow-pickle", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["num_params"] == 3


def test_broken_pipe_exits_quietly(tiny_llama):
    proc = subprocess.run(
        f"{sys.executable} -m peftcli inspect {tiny_llama} --tensors | head -1",
        shell=True, capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "error" not in proc.stderr


def test_names_are_data_not_markup_and_control_characters_are_escaped(tmp_path):
    import torch

    from peftcli.checkpoint.writer import save_state_dict

    d = tmp_path / "x[bold]y"
    d.mkdir()
    names = {"w[red]q.weight": torch.zeros(2), "v[/]x.weight": torch.zeros(2), "bad\x1b[31mname": torch.zeros(1)}
    save_state_dict(names, str(d / "m.safetensors"))
    result = run("inspect", str(d / "m.safetensors"), "--tensors")
    assert result.exit_code == 0, result.stderr
    assert "w[red]q.weight" in result.stdout and "v[/]x.weight" in result.stdout and "x[bold]y" in result.stdout
    assert "\x1b" not in result.stdout and "bad\\x1b[31mname" in result.stdout


def test_no_arguments_prints_the_help(tiny_llama):
    result = run()
    assert result.exit_code == 2 and "Commands:" in result.stderr and "inspect" in result.stderr


def test_budget_on_an_adapter_is_refused(tiny_llama, tmp_path):
    out = str(tmp_path / "a")
    assert run("inject", "lora", tiny_llama, "-o", out).exit_code == 0
    result = run("inspect", out, "--budget", "lora")
    assert result.exit_code == 2 and "needs a base checkpoint" in result.stderr


def test_a_weights_file_inside_a_model_directory_uses_its_config(tiny_gpt2):
    import os

    doc = json.loads(run("inspect", os.path.join(tiny_gpt2, "model.safetensors"), "--json", "--budget", "lora", "--rank", "2").stdout)
    assert doc["config"]["model_type"] == "gpt2" and doc["config"]["intermediate_size"] == 256
    assert doc["budget"]["targets"][0]["shape"] == [192, 64]  # Conv1D [in, out] read as [out, in]


def _leaves(group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _leaves(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


LEAVES = list(_leaves(cli))


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_command_takes_json_and_quiet(path):
    result = run(*path, "--help")
    assert result.exit_code == 0
    assert "--json" in result.stdout and "--quiet" in result.stdout, path


def test_every_subcommand_is_documented():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for name in cli.commands:
        command_section(name)  # its one reference section in docs/
        assert f"`peftcli {name}`" in readme, f"the README's tour does not name peftcli {name}"
    assert "`--quiet`" in readme


def test_quiet_leaves_stderr_empty_but_for_the_error(tiny_llama, tmp_path):
    ok = run("inject", "lora", tiny_llama, "-o", str(tmp_path / "run"), "--quiet")
    assert ok.exit_code == 0 and ok.stderr == "" and os.path.isdir(tmp_path / "run")
    noisy = run("merge", tiny_llama, str(tmp_path / "run"), "-o", str(tmp_path / "merged"))
    assert noisy.exit_code == 0
    quiet = run("merge", tiny_llama, str(tmp_path / "run"), "-o", str(tmp_path / "merged2"), "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    bad = run("inspect", str(tmp_path / "missing.safetensors"), "--quiet")
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1 and "missing.safetensors" in bad.stderr
    assert run("completion", "bash", "--json").exit_code == 0
    assert json.loads(run("completion", "bash", "--json").stdout)["shell"] == "bash"


def _named_in_backticks(section: str) -> set[str]:
    """Every identifier inside a `code span` of ``section`` (`{schema, output, k}` names three; `--top-k` names `top-k`, not `k`)."""
    import re

    prose = re.sub(r"^```.*?^```", "", section, flags=re.M | re.S)  # the examples' code blocks name no field
    return {word for span in re.findall(r"`([^`]+)`", prose) for word in re.findall(r"[A-Za-z_][\w-]*", span)}


@pytest.fixture(scope="module")
def json_artifacts(tiny_bert, tmp_path_factory):
    """A trained LoRA run on tiny BERT, two sparse diffs of it and labelled data, made through the CLI."""
    from tests.helpers import noisy_copy

    d = tmp_path_factory.mktemp("json")
    data = d / "cls.jsonl"
    rows = [{"text": f"{'w1' if i % 2 else 'w2'} w{i % 30 + 5} w7", "label": "pos" if i % 2 else "neg"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arts = {"base": tiny_bert, "data": str(data), "lora": str(d / "lora"), "a": str(d / "a.diff"), "b": str(d / "b.diff")}
    for args in (
        ["inject", "lora", "--rank", "2", tiny_bert, "-o", arts["lora"]],
        ["train", arts["lora"], "--data", arts["data"], "--steps", "2", "--quiet"],
        ["diff", tiny_bert, noisy_copy(tiny_bert, str(d / "ftA"), 1), "-o", arts["a"], "--density", "0.1"],
        ["diff", tiny_bert, noisy_copy(tiny_bert, str(d / "ftB"), 2), "-o", arts["b"], "--density", "0.1"],
    ):
        result = run(*args)
        assert result.exit_code == 0, (args, result.stderr)
    return arts


def _json_cases(name: str, a: dict, tmp) -> list[tuple[list[str], str]]:
    """Command lines of ``peftcli NAME`` that together print every field its --json document can have,
    each with the schema it prints; a setup line has schema None (its document is not checked)."""
    base, out = a["base"], str(tmp)
    cases = {
        "inspect": [
            ([base, "--tensors", "--budget", "lora", "--filter", "layer"], None),
            ([a["lora"], "--tensors"], None),
            ([a["a"], "--tensors"], None),
        ],
        "inject": [(["lora", base, "-o", f"{out}/lora"], None), (["lottery", base, "-o", f"{out}/lth"], None)],
        "train": [
            (["inject", "lora", base, "-o", f"{out}/l"], "setup"),
            ([f"{out}/l", "--data", a["data"], "--steps", "2"], None),
            (["inject", "lt-sft", "--density", "0.05", base, "-o", f"{out}/lt"], "setup"),
            ([f"{out}/lt", "--data", a["data"], "--steps", "2", "--phase1-steps", "2"], None),
            (["inject", "lottery", "--rounds", "2", base, "-o", f"{out}/lth"], "setup"),
            ([f"{out}/lth", "--data", a["data"], "--steps", "2"], None),
        ],
        "diff": [
            ([base, base, "-o", f"{out}/dense.diff", "--dense"], None),
            ([base, base, "-o", f"{out}/top.diff", "--top-k", "10", "--per-tensor"], None),
        ],
        "merge": [([base, a["a"], a["b"], "-o", f"{out}/m"], None), ([base, a["lora"], "-o", f"{out}/m2"], None)],
        "convert": [
            ([a["a"], "--to", "lora", "--rank", "2", "-o", f"{out}/conv"], None),
            ([a["lora"], "--to", "diff", "--dense", "-o", f"{out}/conv.diff"], "peftcli.diff/1"),
        ],
        "combine": [([a["a"], a["b"], "--op", "add", "-o", f"{out}/ab.diff"], None)],
        "check": [([base, a["lora"], a["a"]], None)],
        "export": [([a["lora"], "--to", "vllm", "-o", f"{out}/served"], None), ([f"{out}/served", "--to", "vllm", "--check"], None)],
        "plot": [([a["lora"], "-o", f"{out}/curves.png"], None)],
        "run": [
            ([_recipe(tmp, base), "-o", "wd", "--quiet"], None),
            ([_recipe(tmp, base), "-o", "wd2", "--dry-run"], None),
        ],
        "evaluate": [
            ([a["lora"], "--data", a["data"], "--compare", a["lora"]], None),
            ([base, "--data", a["data"]], None),
        ],
        "completion": [([shell], None) for shell in ("bash", "zsh", "fish")],
    }
    if name not in cases:
        pytest.fail(f"peftcli {name} has no --json case in tests/test_cli.py::_json_cases: add one")
    return [(args if schema == "setup" else [name, *args], schema or f"peftcli.{name}/1") for args, schema in cases[name]]


def _recipe(tmp, base: str) -> str:
    path = tmp / "r.yaml"
    path.write_text(f"model: {base}\nsteps:\n  inject: {{method: ia3, model: '${{model}}', output: ia3}}\n  check: {{base: '${{model}}', artifacts: [ia3]}}\n")
    return str(path)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_json_field_of_every_command_is_named_in_its_reference_section(name, json_artifacts, tmp_path, monkeypatch):
    if name == "plot":
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # `peftcli run -o wd` writes below the current directory
    page, section = command_section(name)
    named = _named_in_backticks(section)
    seen = set()
    for args, schema in _json_cases(name, json_artifacts, tmp_path):
        result = run(*args, "--json")
        assert result.exit_code == 0, (args, result.stderr)
        if schema == "setup":
            continue
        doc = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
        assert isinstance(doc, dict) and doc.get("schema") == schema, (args, doc.get("schema"))
        assert schema in section, f"the peftcli {name} section of {page} does not name its schema {schema!r}"
        seen |= set(doc)
        missing = sorted(set(doc) - named)
        assert not missing, (
            f"`peftcli {' '.join(args[:2])} ... --json` prints the fields {missing}, which the "
            f"'`peftcli {name} ...`' section of {page} does not name in backticks: document them there"
        )
    assert "schema" in seen


def test_every_flag_of_every_command_is_named_in_the_documentation():
    """A new option reaches the documentation (README.md + docs/) with the code: each --flag appears in it."""
    readme = read_docs()
    missing = []

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
            return
        missing.extend(f"{' '.join(path)} {o}" for p in command.params for o in p.opts if o.startswith("--") and o not in readme)

    walk(cli, ["peftcli"])
    assert not missing, f"flags README.md and docs/*.md do not name: {missing}"
