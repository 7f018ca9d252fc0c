"""Regular-expression denial of service: patterns from users and files match in bounded time.

A catastrophically backtracking pattern (``(a|aa)+$``, ``(a+)+$``) against a module name such as
``aaaa…ab`` hangs Python's ``re`` for longer than anyone waits. Through every way in
(``target_modules`` in an adapter's config for check and merge, ``--targets`` for inject and
inspect --budget, ``--filter``, ``--feedforward``, ``--dense``) peftcli answers with one error
line naming the pattern and where it came from; and the selection of ordinary patterns is
exactly ``re.fullmatch``'s, PEFT's rule for a string ``target_modules``.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from peftcli import patterns
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError

SLOW = ["(a|aa)+$", "(a+)+$", "(a|a)+$"]  # (a+)+$ is fast in regex, and not in re
LONG = "a" * 48 + "b"  # the module name they backtrack on


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    monkeypatch.setenv(patterns.BUDGET_ENV, "0.5")  # CPU seconds; keeps each refusal short


@pytest.fixture(scope="module")
def a_model(tmp_path_factory) -> str:
    """A base whose linear modules include one named aaaa…ab."""
    out = tmp_path_factory.mktemp("aaa")
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            f"{LONG}.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.self_attn.v_proj.weight": torch.randn(8, 8, generator=g),
        },
        str(out / "model.safetensors"),
    )
    json.dump({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}, open(out / "config.json", "w"))
    return str(out)


@pytest.fixture(scope="module")
def adapters(a_model, tmp_path_factory) -> dict[str, str]:
    """A LoRA adapter on q_proj and an IA³ adapter on the aaaa…ab module and q_proj."""
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "lora": ["inject", "lora", a_model, "-o", root / "lora", "--targets", "q_proj", "--rank", "2"],
        "ia3": ["inject", "ia3", a_model, "-o", root / "ia3", "--targets", f"{LONG},q_proj", "--feedforward", ""],
    }
    for args in made.values():
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return {k: str(root / k) for k in made}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _with_config(adapter: str, out, **values) -> str:
    import shutil

    shutil.copytree(adapter, out)
    path = os.path.join(out, "adapter_config.json")
    config = json.load(open(path))
    config.update(values)
    json.dump(config, open(path, "w"))
    return str(out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pattern", SLOW)
@pytest.mark.parametrize("method, key", [("lora", "target_modules"), ("ia3", "target_modules"), ("ia3", "feedforward_modules")])
def test_adapter_config_regexes(a_model, adapters, tmp_path, pattern, method, key):
    """check reads the adapter's target_modules (feedforward_modules): the artifact fails with a
    line naming the file's field, the command with one error line; merge finishes or says one line."""
    adapter = _with_config(adapters[method], tmp_path / "evil", **{key: pattern})
    result = invoke("check", a_model, adapter)
    if pattern == "(a+)+$":  # regex knows at once that nothing matches: check's ordinary verdict
        assert result.exit_code == 0 or assert_one_line(result, 1, "does not fit")
    else:
        assert_one_line(result, 1, "does not fit")
        assert f"adapter_config.json {key} regex" in result.stdout and "did not finish matching" in result.stdout
    out = tmp_path / "merged"
    merged = invoke("merge", a_model, adapter, "-o", out)
    if merged.exit_code != 0:  # merge folds the tensors the adapter holds; it may not read the regex at all
        assert_one_line(merged, merged.exit_code, f"adapter_config.json {key}")
        assert not out.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pattern", SLOW[:1] + SLOW[2:])
@pytest.mark.parametrize("how", ["inject", "budget", "filter", "budget-filter", "feedforward", "dense"])
def test_command_line_regexes(a_model, tmp_path, pattern, how):
    out = tmp_path / "out"
    args = {
        "inject": ["inject", "lora", a_model, "-o", out, "--targets", pattern],
        "budget": ["inspect", a_model, "--budget", "lora", "--targets", pattern],
        "filter": ["inspect", a_model, "--filter", pattern],
        "budget-filter": ["inspect", a_model, "--budget", "lora", "--targets", "q_proj", "--filter", pattern],
        "feedforward": ["inject", "ia3", a_model, "-o", out, "--targets", "all-linear", "--feedforward", pattern],
        "dense": ["inject", "lt-sft", a_model, "-o", out, "--density", "0.1", "--dense", pattern],
    }[how]
    flag = next(a for a in args if str(a).startswith("--") and a not in ("--budget", "--density", "--rank"))
    if how == "budget-filter":
        flag = "--filter"
    if how == "feedforward":
        flag = "--feedforward"
    assert_one_line(invoke(*args), 2, f"{flag} regex", "did not finish matching", repr(pattern))
    assert not out.exists()


@pytest.mark.timeout(60)
def test_the_budget_is_per_command_not_per_name(monkeypatch):
    """Thousands of names × a slow pattern stay bounded: once spent, the budget refuses at once."""
    with patterns.command_budget(0.2):
        slow = patterns.Pattern("(a|aa)+$", "--targets")
        with pytest.raises(UsageError, match="did not finish matching"):
            for _ in range(1000):
                slow.fullmatch(LONG)
        with pytest.raises(UsageError, match="did not finish matching"):  # another pattern, same command
            patterns.Pattern("x", "--filter").search("x")
    assert patterns.Pattern("x", "--filter").search("x")  # a new command has a new budget


def test_a_pattern_from_a_file_is_bad_input_naming_the_file():
    hostile = patterns.from_file("(", "adapter_config.json target_modules")
    with pytest.raises(BadInputError, match=r"invalid adapter_config.json target_modules regex '\(': missing \)"):
        patterns.Pattern(hostile, "--targets")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pattern", ["(?:a{1000}){1000}", "(?:(?:x{100}){100}){100}", r"\w{5000}", "a" * 100_001])
def test_patterns_that_unroll_beyond_memory_are_refused(pattern):
    """regex unrolls counted repeats when compiling: (?:a{1000}){1000} alone takes 300 MB."""
    with pytest.raises(UsageError, match="invalid --targets regex"):
        patterns.Pattern(pattern, "--targets")


ORDINARY = [
    r".*\.(q_proj|v_proj)",
    r"model\.layers\.[01]\.mlp\..*",
    r".*_proj",
    r"(?i).*Q_PROJ",
    r".*\b(up|down)_proj",
    r"model\.layers\.\d+\.self_attn\.(?!o_)\w+",
    r"(?P<l>model)\.layers\.(?:0|1)\..*(?<=proj)",
    r".*layers\.1\..*|lm_head",
]


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_select_what_re_fullmatch_selects(tiny_llama, pattern):
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.targets import linear_modules, resolve_targets

    with open_checkpoint(tiny_llama) as ckpt:
        shapes = {n: tuple(t.shape) for n, t in ckpt.tensors.items()}
        config = ckpt.config
    modules = linear_modules(shapes, config)
    expected = [m.name for m in modules if re.fullmatch(pattern, m.name)]
    assert expected and [m.name for m in resolve_targets(shapes, config, pattern, None)] == expected


@pytest.mark.parametrize("pattern", ORDINARY + [r"\B", r"(?a)\w+", r"[^\W\d]+", r"x{e<=1}", r"[[:alpha:]]", r"(a)?(?(1)b|c)"])
@pytest.mark.parametrize("text", ["", "x{e<=1}", "model.layers.1.mlp.up_proj", "ab", "c", "é١_", "MODEL.Q_PROJ", ":]"])
def test_search_and_fullmatch_agree_with_re(pattern, text):
    """Including where regex's own syntax differs from re's (fuzzy {e<=1}, POSIX [[:alpha:]])."""
    compiled = patterns.Pattern(pattern, "--filter")
    assert compiled.fullmatch(text) == (re.fullmatch(pattern, text) is not None)
    assert compiled.search(text) == (re.search(pattern, text) is not None)


def test_outside_a_command_each_match_has_a_budget_of_its_own(monkeypatch):
    """Library use: a long-lived (cached) pattern is not failed one day by a budget that only shrank."""
    monkeypatch.setenv(patterns.BUDGET_ENV, "0.2")
    slow = patterns.compile_pattern("(a|aa)+$", "--targets")
    with pytest.raises(UsageError, match="did not finish matching in 0.2 s"):
        slow.fullmatch("a" * 40 + "b")
    assert slow.fullmatch("aa") and not slow.fullmatch("b")  # quick answers: the spent budget was that call's
