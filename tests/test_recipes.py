"""Recipes: every shipped recipe validates and runs end to end on a tiny model; overrides,
key suggestions, --dry-run lines that are real commands, the workdir boundary, errors."""

from __future__ import annotations

import glob
import json
import os
import shlex

import pytest
import yaml
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.recipes import apply_overrides, plan
from peftcli.recipes.steps import display

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def tiny_overrides(recipe: str, model: str) -> list[str]:
    """Point a recipe at a fixture model, 16-example data sets and 2 training steps."""
    with open(recipe, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    # A recipe for causal LMs builds its own tiny Llama (as fast as copying one); the rest
    # run on the fixture model.
    causal = isinstance(raw.get("model"), dict) and raw["model"].get("builtin") == "tiny"
    out = ([] if causal else [f"model={model}"]) + ["train_steps=2"]
    for name, spec in (raw.get("data") or {}).items():
        if isinstance(spec, dict):
            out.append(f"data.{name}.examples=16")
    return out


def parse_line(line: str) -> dict:
    """Parse a --dry-run line with the CLI's own parsers (no execution); returns the params."""
    words = shlex.split(line)
    if words[:3] == ["python", "-m", "peftcli.cli.prepare"]:
        from peftcli.cli.prepare import prepare

        ctx = prepare.make_context("prepare", words[3:])
        name, cmd, args = prepare.resolve_command(ctx, words[3:])
        return cmd.make_context(name, args, parent=ctx).params
    assert words[0] == "peftcli", line
    cmd, args = cli, words[1:]
    ctx = cli.make_context("peftcli", list(args))
    while hasattr(cmd, "commands"):  # walk down the groups (peftcli inject lora ...)
        name, cmd, args = cmd.resolve_command(ctx, args)
        ctx = cmd.make_context(name, list(args), parent=ctx)
    return ctx.params


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from peftcli.recipes.prepare import sentiment_data

    d = tmp_path_factory.mktemp("data")
    for name, n, seed in (("train", 24, 1), ("dev", 16, 2)):
        with open(d / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in sentiment_data(n, seed))
    return str(d / "train.jsonl"), str(d / "dev.jsonl")


# -- every shipped recipe -----------------------------------------------------------------------


def test_the_recipes_the_issue_asks_for_are_shipped():
    names = {os.path.basename(r)[: -len(".yaml")] for r in RECIPES}
    wanted = {"quickstart", "lora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "prefix", "prompt", "bitfit", "full",
              "task-arithmetic", "ltsft", "diff-pruning", "lottery", "chat-sft", "qlora"}
    assert wanted <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_validates_and_says_how_to_run_it(recipe, in_tmp):
    with open(recipe, encoding="utf-8") as f:
        first = f.readline().rstrip("\n")
    assert first == f"# peftcli run recipes/{os.path.basename(recipe)}"
    p = plan(recipe)
    assert p.steps and all(s.command.startswith(("peftcli ", "python -m peftcli.")) for s in p.steps)
    result = run("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.stderr
    for line in result.stdout.splitlines():
        parse_line(line)  # every printed line is a command the CLI accepts
    assert os.listdir(in_tmp) == []  # --dry-run writes nothing


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_runs_end_to_end_on_a_tiny_model(recipe, tiny_bert, tmp_path):
    wd = tmp_path / "wd"
    result = run("run", recipe, *tiny_overrides(recipe, tiny_bert), "-o", wd, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # --quiet
    doc = json.loads(result.stdout)
    assert doc["schema"] == "peftcli.run/1" and doc["dry_run"] is False
    p = plan(recipe, tiny_overrides(recipe, tiny_bert), workdir=str(wd))
    assert [s["command"] for s in doc["steps"]] == [s.command for s in p.steps]  # what ran is what --dry-run prints
    for step in doc["steps"]:
        r = step["result"]
        if step["kind"] == "train":
            assert r["steps"] == 2
            with open(os.path.join(r["run"], "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            if "rounds" in r:  # a lottery run: one line per round, each round 2 steps
                assert [row["round"] for row in rows] == list(range(r["rounds"] + 1))
                assert all(row["steps"] == 2 for row in rows)
            else:
                assert max(row["step"] for row in rows) == 2
        if step["kind"] == "evaluate":
            assert r["examples"] == 16 and r["eval_loss"] > 0
            if "compare" in r:
                assert r["compare"]["agreement"] == 1.0  # merged predicts what the adapted model predicts
            if r["task"] == "sft":  # greedy answers, each written to the predictions file
                with open(wd / "answers.jsonl") as f:
                    assert len(f.readlines()) == r["generation"]["examples"] == 16
        if step["kind"] in ("inject", "merge", "convert", "combine"):
            assert os.path.exists(r["output"]) and os.path.realpath(r["output"]).startswith(str(wd) + os.sep)


# -- the dry run equals the run -----------------------------------------------------------------


def test_dry_run_lines_executed_one_by_one_give_what_run_gives(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """The printed pipeline, run line by line as shell commands would, writes the same bytes."""
    from safetensors.torch import load_file

    recipe = os.path.join(ROOT, "recipes", "lora.yaml")
    overrides = [f"model={tiny_bert}", f"data.train={tiny_data[0]}", f"data.eval={tiny_data[1]}", "train_steps=2"]
    monkeypatch.chdir(tmp_path)
    by_run = run("run", recipe, *overrides, "-o", "a", "--json", "--quiet")
    assert by_run.exit_code == 0, by_run.stderr
    dry = run("run", recipe, *overrides, "-o", "b", "--dry-run")
    assert dry.exit_code == 0 and not os.path.exists("b")
    lines = dry.stdout.splitlines()
    assert [w.split()[:2] for w in lines] == [["peftcli", "inject"], ["peftcli", "train"], ["peftcli", "merge"], ["peftcli", "evaluate"]]
    for line in lines:
        result = CliRunner().invoke(cli, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.stderr)
    for rel in ("lora/adapter_model.safetensors", "merged/model.safetensors"):
        ours, theirs = load_file(os.path.join("a", rel)), load_file(os.path.join("b", rel))
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours)
    # The evaluate step reports the training loop's own final validation loss.
    doc = json.loads(by_run.stdout)
    train, evaluate = doc["steps"][1]["result"], doc["steps"][3]["result"]
    with open(os.path.join("a", "lora", "metrics.jsonl")) as f:
        last_eval = [json.loads(line) for line in f if "eval_loss" in line][-1]
    assert last_eval["step"] == train["steps"] == 2
    assert evaluate["eval_loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
    assert evaluate["eval_accuracy"] == last_eval["eval_accuracy"]


def test_untrained_evaluation_is_the_quickstart_baseline(tiny_bert, tiny_data):
    """A model without a head gets the head training starts from: the quick start's baseline."""
    import torch

    from peftcli.evaluation import EvalOptions, evaluate
    from examples.quickstart import _untrained_accuracy
    from peftcli.training.batching import encode, load_tokenizer
    from peftcli.training.data import load_dataset

    doc = evaluate(tiny_bert, EvalOptions(data=tiny_data[1], device="cpu"))
    data = load_dataset(tiny_data[1])
    tok = load_tokenizer(tiny_bert)
    reference = _untrained_accuracy(tiny_bert, encode(data, tok, 128, data.labels), tok.pad_token_id, data.labels)
    assert doc["head"] == "new" and doc["baseline"] is True and doc["task"] == "classify"
    assert doc["eval_accuracy"] == reference
    torch.manual_seed(123)  # the evaluation seeds the head itself, whatever the global state
    assert evaluate(tiny_bert, EvalOptions(data=tiny_data[1], device="cpu"))["eval_loss"] == doc["eval_loss"]


# -- overrides and suggestions ------------------------------------------------------------------


def test_overrides_split_on_the_first_equals_and_read_yaml_values(tiny_bert, in_tmp):
    recipe = os.path.join(ROOT, "recipes", "quickstart.yaml")
    p = plan(recipe, [
        f"model={tiny_bert}", "train.lr=1e-4", "inject.rank=16", "inspect.filter=a=b", "inject.targets=[query, key]",
        "train_steps=3", "data.train.examples=5",
    ])
    steps = {s.id: s for s in p.steps}
    assert steps["train"].params["lr"] == 1e-4 and steps["train"].params["steps"] == 3
    assert steps["inject"].params["rank"] == 16 and steps["inject"].params["targets"] == "query,key"
    assert steps["inspect"].params["name_filter"] == "a=b"
    assert steps["inject"].params["model"] == display(tiny_bert)
    assert "--examples 5" in p.lines()[0]
    raw = {"steps": {"train": {"lr": 1}}, "vars": {"n": 1}}
    assert apply_overrides(raw, ["n=[1, 2]", "train.eval="]) == {"steps": {"train": {"lr": 1, "eval": None}}, "vars": {"n": [1, 2]}}
    assert raw == {"steps": {"train": {"lr": 1}}, "vars": {"n": 1}}  # the input is left alone


@pytest.mark.parametrize(
    "override, message",
    [
        ("inject.rnak=4", "unknown key 'rnak' (did you mean 'rank'?)"),
        ("trian.lr=1", "no key, step or variable 'trian' (did you mean 'train'?)"),
        ("inject.method=lorra", "unknown method 'lorra' (did you mean 'lora'?)"),
        ("train.eval_evry=5", "unknown key 'eval_evry' (did you mean 'eval_every'?)"),
        ("train.steps=abc", "'abc' is not a valid integer"),
        ("train.dense=true", "unknown key 'dense'"),
        ("train.batch_size=0", "`batch_size` must be positive"),
        ("merge.inputs=", "missing key 'inputs'"),
        ("evaluate.compare=", "`min_agreement` needs `compare`"),
        ("lr", "is not key=value"),
    ],
)
def test_bad_overrides_are_one_line_usage_errors(override, message, in_tmp):
    result = run("run", os.path.join(ROOT, "recipes", "lora.yaml"), override, "--dry-run")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert result.stdout == "" and os.listdir(in_tmp) == []


def test_recipe_keys_are_the_cli_flags(in_tmp, tmp_path):
    """Every option of a subcommand is a recipe key under its flag's name (one source of truth)."""
    from peftcli.recipes.steps import KINDS

    for name, kind in KINDS.items():
        cmd, _ = kind.command({"method": "lora"})
        keys, aliases = kind.keys(cmd)
        for param in cmd.params:
            if param.name in ("as_json", "quiet", "nproc", "resume"):
                continue
            flags = [o for o in param.opts if o.startswith("--")]
            assert any(aliases.get(f[2:].replace("-", "_")) for f in flags) or param.name in keys, (name, param.name)
    r = write(tmp_path / "r.yaml", "modle: x\nsteps: {check: {base: x}}\n")
    with pytest.raises(UsageError, match=r"unknown top-level key 'modle' \(did you mean 'model'\?\)"):
        plan(r)
    r = write(tmp_path / "r.yaml", "steps: {trian: {run: x}}\n")
    with pytest.raises(UsageError, match=r"'trian' is not a step kind \(did you mean 'train'\?\)"):
        plan(r)
    r = write(tmp_path / "r.yaml", "steps: {t: {do: train, run: x, data: d, eval: e, eval_data: e}}\n")
    with pytest.raises(UsageError, match="both given"):
        plan(r)


def test_variables_keep_their_type_and_unknown_ones_are_named(tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", "vars: {n: 3, t: [query, value]}\nsteps:\n  inject: {method: lora, model: m, output: o, targets: '${t}', rank: '${n}'}\n  check: {base: '$${n}-${n}'}\n")
    p = plan(r)
    assert p.steps[0].params["rank"] == 3 and p.steps[0].params["targets"] == "query,value"
    assert p.steps[1].params["base"].endswith("${n}-3")
    r = write(tmp_path / "r.yaml", "vars: {steps_n: 3}\nsteps: {check: {base: '${step_n}'}}\n")
    with pytest.raises(UsageError, match=r"unknown variable \$\{step_n\} \(did you mean 'steps_n'\?\)"):
        plan(r)


# -- the workdir boundary -----------------------------------------------------------------------


@pytest.mark.parametrize("output", ["../outside", "/tmp/peftcli-outside-{pid}", "sub/../../outside", "link/inside"])
def test_no_step_writes_outside_the_workdir(output, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(tmp_path / "elsewhere", wd / "link")  # a link inside the workdir to a place outside
    output = output.format(pid=os.getpid())
    r = write(tmp_path / "r.yaml", f"steps:\n  inject: {{method: lora, model: m, output: '{output}'}}\n")
    result = run("run", r, "-o", wd)
    assert result.exit_code == 2 and "is outside the workdir" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["r.yaml", "wd"] and os.listdir(wd) == ["link"]
    assert not os.path.exists(output) and not os.path.exists(tmp_path / "elsewhere")


@pytest.mark.parametrize("workdir", ["../up", "/tmp/abs", "~/home"])
def test_a_recipe_cannot_choose_a_workdir_outside_the_current_directory(workdir, tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", f"workdir: '{workdir}'\nsteps: {{check: {{base: m}}}}\n")
    with pytest.raises(UsageError, match="outside the current directory"):
        plan(r)
    assert plan(r, workdir=str(tmp_path / "chosen")).workdir == str(tmp_path / "chosen")  # -o may


def test_builtin_data_names_cannot_escape(tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", "data:\n  '../../evil': {builtin: sentiment}\nsteps: {check: {base: m}}\n")
    with pytest.raises(UsageError, match="data name"):
        plan(r)


# -- errors, reruns, built-ins ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: [unclosed\n", "not valid YAML"),
        ("steps:\n  check: {base: a}\n  check: {base: b}\n", "duplicate key 'check'"),
        ("- a list\n", "a recipe is a YAML mapping"),
        ("\tsteps: {}\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_a_one_line_error(text, message, tmp_path, in_tmp):
    r = write(tmp_path / "bad.yaml", text)
    result = run("run", r, "--dry-run")
    assert result.exit_code == 1 and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert run("run", tmp_path / "missing.yaml").stderr.startswith("error: ")


def test_a_rerun_needs_force_and_fails_before_any_step(tiny_bert, tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", f"model: {tiny_bert}\nsteps:\n  inject: {{method: ia3, model: '${{model}}', output: ia3}}\n  check: {{base: '${{model}}', artifacts: [ia3]}}\n")
    first = run("run", r, "-o", "wd", "--json")
    assert first.exit_code == 0, first.stderr
    assert "[1/2] inject: peftcli inject ia3" in first.stderr  # progress on stderr, the document on stdout
    assert json.loads(first.stdout)["steps"][1]["result"]["ok"] is True
    mtime = os.stat("wd/ia3/adapter_model.safetensors").st_mtime_ns
    again = run("run", r, "-o", "wd")
    assert again.exit_code == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert "[1/2]" not in again.stderr and os.stat("wd/ia3/adapter_model.safetensors").st_mtime_ns == mtime
    forced = run("run", r, "-o", "wd", "--force", "--dry-run")
    assert "--force" in forced.stdout.splitlines()[0]
    assert run("run", r, "-o", "wd", "--force", "--quiet").exit_code == 0


def test_a_failing_step_names_itself_and_keeps_its_exit_code(tiny_bert, tmp_path, in_tmp):
    r = write(tmp_path / "r.yaml", f"steps:\n  merge: {{base: '{tiny_bert}', inputs: [nothing.diff], output: m}}\n")
    result = run("run", r, "-o", "wd", "--json")
    assert result.exit_code == 1 and result.stderr.splitlines()[-1].startswith("error: step merge (merge): ")
    assert result.stdout == ""


def test_builtins_reuse_the_quickstart_and_stay_in_the_workdir(tmp_path, in_tmp, monkeypatch):
    from peftcli.recipes import prepare
    from peftcli.recipes.prepare import write_data

    monkeypatch.setattr(prepare, "minilm_dir", lambda: None)  # as on a machine without the wheel
    p = plan(os.path.join(ROOT, "recipes", "quickstart.yaml"), workdir="wd")
    assert p.model == str(in_tmp / "wd" / "tiny-bert")
    assert p.lines()[0] == "python -m peftcli.cli.prepare tiny wd/tiny-bert --arch bert"
    assert p.lines()[1] == "python -m peftcli.cli.prepare sentiment wd/data/train.jsonl --examples 800 --seed 1"
    write_data("sentiment", "s.jsonl", 7, 3)
    with open("s.jsonl") as f:
        assert [json.loads(line) for line in f] == prepare.sentiment_data(7, 3)
    write_data("sentiment", "s.jsonl", 7, 3)  # the same set again: fine
    with pytest.raises(UsageError, match="already exists"):
        write_data("sentiment", "s.jsonl", 8, 3)
    with pytest.raises(UsageError, match=r"unknown built-in data 'sentimant' \(did you mean 'sentiment'\?\)"):
        plan(os.path.join(ROOT, "recipes", "lora.yaml"), ["data.train.builtin=sentimant"])
    assert not os.path.exists("wd")


def test_evaluate_refuses_what_it_cannot_evaluate(tiny_bert, tiny_data, tmp_path):
    from peftcli.evaluation import EvalOptions, evaluate

    with pytest.raises(UsageError, match="`data` is required"):
        EvalOptions()
    with pytest.raises(BadInputError, match="not a model or adapter directory"):
        evaluate(str(tmp_path / "nope"), EvalOptions(data=tiny_data[1], device="cpu"))
    with pytest.raises(BadInputError, match="trained no classification head"):
        evaluate(tiny_bert, EvalOptions(data=tiny_data[1], head=_fresh_lora(tiny_bert, tmp_path), device="cpu"))


def _fresh_lora(model: str, tmp_path) -> str:
    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig

    out = str(tmp_path / "fresh")
    inject(model, "lora", LoraConfig(), out)
    return out


def test_the_format_example_in_recipes_readme_is_a_valid_recipe(tmp_path, in_tmp):
    with open(os.path.join(ROOT, "recipes", "README.md"), encoding="utf-8") as f:
        text = f.read()
    example = text.split("## Format", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    p = plan(write(tmp_path / "lora.yaml", example))
    assert [(s.id, s.kind) for s in p.steps] == [("inject", "inject"), ("train", "train"), ("dev", "evaluate")]
    assert p.steps[1].params["run"] == display(os.path.join(p.workdir, "lora"))
