"""Options as data: every command's options are a dataclass the library builds and checks, the
CLI parses into it, and a recipe step fills from its keys (issue #16 §1).

- each options class refuses what the command line refuses, without click;
- no module outside ``peftcli/cli`` imports click or ``peftcli.cli`` (an AST scan);
- a recipe step's parameters are its subcommand's (names, flags, arity, required, paths);
- the drifts the recipe layer had: a check step's method/dtype, an inspect step's filter.
"""

from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from peftcli.preflight import CheckOptions
from peftcli.cli import cli
from peftcli.combining import CombineOptions
from peftcli.conversion import ConvertOptions
from peftcli.errors import UsageError
from peftcli.merging.options import FLOAT32_MAX, MergeOptions, merge_options
from peftcli.options import from_options
from peftcli.summary import InspectOptions

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peftcli"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- the library checks its options --------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MergeOptions(weights=[math.inf]), "`weights`: inf is not a finite number"),
        (lambda: MergeOptions(weights="1,nan"), "`weights`: nan is not a finite number"),
        (lambda: MergeOptions(weights="1,١"), "`weights`: '١' is not a valid float"),
        (lambda: MergeOptions(weights=[FLOAT32_MAX, FLOAT32_MAX]), "beyond float32's 3.4e+38"),
        (lambda: MergeOptions(method="lineer"), "unknown merge method 'lineer'"),
        (lambda: MergeOptions(dtype="F8"), "unknown `dtype` 'F8'"),
        (lambda: MergeOptions(heads="both"), "unknown heads mode 'both'"),
        (lambda: MergeOptions(seed=-1), "`seed` -1 is less than 0"),
        (lambda: MergeOptions(method="linear", params={"density": 0.5}), "linear takes no density"),
        (lambda: merge_options({"method": "slerp", "t": "0.5", "density": 0.2}), "slerp takes no density"),
        (lambda: CheckOptions(method="tie"), "unknown merge method 'tie'"),
        (lambda: CheckOptions(dtype="int8"), "unknown `dtype` 'int8'"),
        (lambda: CombineOptions(op="multiply"), "`op` must be one of add, subtract, scale"),
        (lambda: CombineOptions(), "`op` must be one of"),
        (lambda: CombineOptions(op="add", weights="1,x"), "`weights` must be comma-separated numbers"),
        (lambda: CombineOptions(op="add", values="fp16"), "`values` must be one of base, fp32"),
        (lambda: ConvertOptions(target="lora", diff={"density": 0.1}), "`density` only applies with `target` diff"),
        (lambda: ConvertOptions(target="diff"), "give exactly one of `density`, `top_k` or `dense`"),
        (lambda: ConvertOptions(target="svd"), "`target` must be diff or lora"),
        (lambda: InspectOptions(method_options={"rank": 4}), "`rank` only applies with `budget`"),
        (lambda: InspectOptions(budget="lora", method_options={"rounds": 3}), "`rounds` is not an option of lora"),
        (lambda: InspectOptions(depth=65), "`depth` 65 is more than 64"),
        (lambda: InspectOptions(name_filter="layers.(0"), "invalid `name_filter` regex"),
        (lambda: from_options(MergeOptions, {"method": "nope"}), "unknown merge method 'nope'"),
    ],
)
def test_each_command_checks_its_options_in_the_library(build, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("+", r"\+").replace(".", r"\.")) as caught:
        build()
    assert caught.value.hint  # every refusal says what to do


def test_the_options_build_and_refuse_without_click():
    """The library's options modules import no click, and refuse as above with none loaded."""
    code = (
        "import sys\n"
        "from peftcli.errors import UsageError\n"
        "from peftcli.merging.options import MergeOptions\n"
        "from peftcli.preflight import CheckOptions\n"
        "from peftcli.combining import CombineOptions\n"
        "from peftcli.conversion import ConvertOptions\n"
        "from peftcli.summary import InspectOptions\n"
        "import peftcli.recipes.steps\n"
        "assert MergeOptions(weights='1,0.5', method='ties', params={'density': 0.5}).weights == [1.0, 0.5]\n"
        "assert InspectOptions(budget='lora', method_options={'rank': 4}).config.rank == 4\n"
        "try:\n    MergeOptions(weights=[float('inf')])\nexcept UsageError:\n    pass\nelse:\n    raise SystemExit('accepted')\n"
        "sys.stdout.write(repr([m for m in ('click', 'peftcli.cli') if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]"


def _imports(tree: ast.AST):
    """(module imported, the function it is imported in or None) for every import in ``tree``."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((a.name, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.append((child.module, function))
                found.extend((f"{child.module}.{a.name}", function) for a in child.names)
            visit(child, inner)

    visit(tree, None)
    return found


def test_no_library_module_imports_click_or_the_cli():
    """Only ``peftcli/cli`` knows about click; entry points (``__main__``, a module's ``main``)
    may start the CLI. quickstart.py is on its way out of the package (issue #16)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("peftcli/cli/") or rel in ("peftcli/__main__.py", "peftcli/quickstart.py"):
            continue
        for module, function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if (module == "click" or module.startswith(("click.", "peftcli.cli"))) and function != "main":
                offenders.append(f"{rel}: {module}" + (f" in {function}()" if function else ""))
    assert offenders == []


# -- a recipe step is its subcommand ------------------------------------------------------------


def _click_params(cmd: click.Command, kind: str) -> dict:
    from peftcli.recipes.steps import RUNNER_FLAGS, RUNNER_FLAGS_OF

    runner = RUNNER_FLAGS | RUNNER_FLAGS_OF.get(kind, set())
    return {
        p.name: (sorted(p.opts) if isinstance(p, click.Option) else [], p.nargs, bool(p.required), isinstance(p, click.Option) and p.is_flag,
                 isinstance(p.type, click.Path))
        for p in cmd.params if p.name not in runner
    }


def _step_params(kind, body) -> dict:
    cmd, words = kind.command(body)
    return {
        p.name: (sorted(p.opts), p.nargs, p.required, p.is_flag, p.field is None or bool(p.field.metadata.get("path")))
        for p in cmd.params
    }, words


def test_every_step_kind_takes_exactly_its_subcommands_parameters():
    """The recipe's table and the click commands come from the same declarations, but the few
    flags beside a command's options class are declared in both: they must agree."""
    from peftcli.methods import METHODS
    from peftcli.recipes.steps import KINDS

    for name, kind in KINDS.items():
        for method in sorted(METHODS) if kind.selector else [None]:
            params, words = _step_params(kind, {"method": method})
            cmd = cli.commands[name]
            if method is not None:
                cmd = cmd.commands[method]
            assert words == ["peftcli", name] + ([method] if method else [])
            assert params == _click_params(cmd, name), (name, method)


def test_a_recipe_step_reads_values_as_the_command_line_does(tmp_path, monkeypatch):
    from peftcli.recipes import plan

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  merge: {base: b, inputs: [x, y], output: m, weights: [1, 0.5], method: ties, density: 0.2, seed: '7'}\n")
    step = plan(str(recipe), workdir=str(tmp_path)).steps[0]
    assert step.argv == ["b", "x", "y", "--output", "m", "--weights", "1,0.5", "--method", "ties", "--density", "0.2", "--seed", "7"]
    assert step.params["seed"] == 7 and step.params["density"] == 0.2 and step.params["inputs"] == ("x", "y")
    ctx = cli.commands["merge"].make_context("merge", list(step.argv))
    assert step.params == {k: v for k, v in ctx.params.items() if k not in ("as_json", "quiet")}  # what click reads
    for bad, message in (("seed: x", "'x' is not a valid integer"), ("method: tie", "'tie' is not one of"), ("density: ١", "'١' is not a valid float")):
        recipe.write_text(f"steps:\n  merge: {{base: b, inputs: [x], output: m, {bad}}}\n")
        with pytest.raises(UsageError, match=message):
            plan(str(recipe))


# -- the drifts: a recipe step does what its command does -----------------------------------------


def _execute(tmp_path, steps: str) -> dict:
    from peftcli.recipes import execute, plan

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n{steps}")
    return execute(plan(str(recipe), workdir=str(tmp_path / "wd")))


def test_a_recipe_check_step_estimates_the_merge_its_method_and_dtype_say(tiny_llama, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tiny_llama, ft)  # a fine-tuned checkpoint of the base (equal to it)
    doc = _execute(tmp_path, f"  check: {{base: {tiny_llama}, artifacts: [{ft}], method: ties, dtype: F16}}\n")
    result = doc["steps"][0]["result"]
    cli_doc = json.loads(run("check", tiny_llama, ft, "--method", "ties", "--dtype", "F16", "--json").stdout)
    assert result["merge"]["method"] == "ties" and result["merge"] == cli_doc["merge"]
    default = json.loads(run("check", tiny_llama, ft, "--json").stdout)
    assert result["merge"]["write_bytes"] != default["merge"]["write_bytes"]  # F16 output: the dtype counted
    (tmp_path / "slerp").mkdir()
    refused = _execute(tmp_path / "slerp", f"  check: {{base: {tiny_llama}, artifacts: [{ft}], method: slerp}}\n")
    assert refused["steps"][0]["result"]["merge_refusal"].startswith("slerp merges exactly 2 models, got 1")


def test_a_recipe_inspect_step_narrows_the_budget_listing_by_its_filter(tiny_llama, tmp_path):
    pattern = r"layers\.0\."
    doc = _execute(tmp_path, f"  inspect: {{path: {tiny_llama}, budget: lora, filter: '{pattern}', rank: 4}}\n")
    budget = doc["steps"][0]["result"]["budget"]
    cli_budget = json.loads(run("inspect", tiny_llama, "--json", "--budget", "lora", "--rank", "4", "--filter", pattern).stdout)["budget"]
    assert budget == cli_budget
    assert budget["filter"]["num_targets"] == len(budget["targets"]) > 0
    assert all(t["module"].split(".")[2] == "0" for t in budget["targets"] if t["module"].startswith("model.layers"))


# -- inspect --budget: a method's options, per method ------------------------------------------


def test_inspect_help_lists_its_own_options_and_each_budget_method_its_own():
    from peftcli.methods import METHODS
    from peftcli.options import flag_name, option_fields

    plain = run("inspect", "--help")
    assert plain.exit_code == 0
    listed = plain.stdout.split("Options:")[1]
    assert "--budget METHOD" in listed and "--rank" not in listed and "--init " not in listed
    assert listed.count("\n  -") <= 10  # inspect's own options, not every method's (36 before)
    for name, method in METHODS.items():
        text = run("inspect", "--budget", name, "--help").stdout
        section = text.split(f"Options of --budget {name}:")[1]
        mine = {flag_name(f) for f in option_fields(method.config_cls)}
        others = {flag_name(f) for m in METHODS.values() for f in option_fields(m.config_cls)} - mine
        assert all(flag in section for flag in mine), name
        assert not any(f"  {flag} " in section or f", {flag} " in section for flag in others), name
    prompt = run("inspect", "--budget", "prompt", "--help").stdout
    assert "--init random|vocab|text" in prompt and "kaiming" not in prompt  # its own --init, not LoRA's


def test_inspect_budget_invocations_are_unchanged(tiny_llama):
    doc = json.loads(run("inspect", tiny_llama, "--json", "--budget", "lora", "--rank", "4", "--targets", "q_proj").stdout)
    assert doc["budget"]["method"] == "lora" and all(t["module"].endswith("q_proj") for t in doc["budget"]["targets"])
    env = {**os.environ, "_PEFTCLI_COMPLETE": "bash_complete", "COMP_WORDS": "peftcli inspect model --budget lora --ra", "COMP_CWORD": "5"}
    proc = subprocess.run([sys.executable, "-m", "peftcli"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "plain,--rank" in proc.stdout  # the hidden method flags still complete, once the method is named
