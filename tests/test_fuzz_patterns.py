"""Property-based fuzzing of regexes from files and users (``peftcli.patterns``).

Generated patterns, catastrophic-backtracking shapes among them (``(a|aa)+$``, ``((a*)*)*b``,
counted repeats that unroll), mutated by inserted, deleted and replaced characters, become an
adapter's ``target_modules`` (and ``--targets``/``--filter``) against a base with a module named
``aaaa…ab``. Every outcome must be success or one ``error:`` line: never a hang (the pattern
budget is 0.3 CPU seconds here, and pytest-timeout bounds each test), never a traceback. On
short texts, where Python's ``re`` itself is quick, matching agrees with ``re`` exactly.

Profiles (``HYPOTHESIS_PROFILE``) as in tests/test_fuzz.py: ``ci`` (the default, few cases, the
same on every run) and ``long`` (many new cases each run, for a soak).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from peftcli import patterns
from peftcli.cli import cli
from peftcli.errors import UsageError

CASES = {"config": {"ci": 25, "long": 2000}, "options": {"ci": 25, "long": 2000}, "agree": {"ci": 150, "long": 20000}}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    PROFILE = "ci"
pytestmark = pytest.mark.timeout(300 if PROFILE == "ci" else 7200)
LONG = "a" * 40 + "b"


def fuzz(kind: str):
    return settings(
        max_examples=CASES[kind][PROFILE],
        deadline=None,
        derandomize=PROFILE == "ci",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    monkeypatch.setenv(patterns.BUDGET_ENV, "0.3")


# -- patterns ------------------------------------------------------------------------------------

CATASTROPHIC = [
    "(a|aa)+$", "(a+)+$", "(a|a)+$", "((a*)*)*b", "(.*a){12}", r"(\w+\w?)*c", "(a?){30}a{30}", "(?:a+)+(?:b|c)$",
    r"(.|\n)*?c", "(a{1,40}){1,40}$", "(?:(?:a{100}){100}){10}", r"(\b\w+\b\.?)+c", "(a|b|ab)*c",
]
ORDINARY = [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\..*", "q_proj", ".*", r"(?i).*Q_PROJ", "a+b", r"\w+"]
FRAGMENTS = st.sampled_from(list("ab.*+?()[]{}|^$\\,-0123456789_wdsbBAZ:<>=!PgiI ") + ["(?:", "(?P<n>", "(?P=n)", "{2,}", "\\1"])


@st.composite
def mutated(draw, seeds):
    """A seed pattern with a few characters inserted, deleted or replaced."""
    text = list(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        if edit == "insert" or not text:
            text.insert(where, draw(FRAGMENTS))
        elif edit == "delete":
            del text[min(where, len(text) - 1)]
        else:
            text[min(where, len(text) - 1)] = draw(FRAGMENTS)
    return "".join(text)


PATTERNS = st.one_of(mutated(CATASTROPHIC), mutated(ORDINARY), st.lists(FRAGMENTS, max_size=12).map("".join))


# -- the base and adapters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir():
    root = tempfile.mkdtemp(prefix="fuzz-patterns-")
    base = os.path.join(root, "base")
    os.mkdir(base)
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            f"{LONG}.weight": torch.randn(4, 4, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
            "model.layers.0.self_attn.v_proj.weight": torch.randn(4, 4, generator=g),
        },
        os.path.join(base, "model.safetensors"),
    )
    json.dump({"model_type": "llama"}, open(os.path.join(base, "config.json"), "w"))
    adapters = {}
    for method, extra in (("lora", ["--rank", "2"]), ("ia3", ["--feedforward", ""])):
        out = os.path.join(root, method)
        result = CliRunner().invoke(cli, ["inject", method, base, "-o", out, "--targets", f"{LONG},q_proj", *extra])
        assert result.exit_code == 0, result.output
        adapters[method] = out
    yield root, base, adapters
    shutil.rmtree(root, ignore_errors=True)


def run_cli(*args) -> int:
    """Success, or exit 1/2/3 with exactly one ``error:`` line and no traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if isinstance(result.exception, Exception) and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args[0]}: escaped {type(result.exception).__name__}: {result.exception}")
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, (args, result.stderr[-2000:])
    assert result.exit_code in (0, 1, 2, 3), (args, result.exit_code, result.stderr[-2000:])
    if result.exit_code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr[-2000:])
    return result.exit_code


@fuzz("config")
@given(pattern=PATTERNS, method=st.sampled_from(["lora", "ia3"]), key=st.sampled_from(["target_modules", "feedforward_modules"]), as_list=st.booleans())
def test_adapter_config_regexes_never_hang_or_crash(workdir, pattern, method, key, as_list):
    root, base, adapters = workdir
    if method == "lora" and key == "feedforward_modules":
        key = "target_modules"
    adapter = tempfile.mkdtemp(dir=root)
    shutil.copytree(adapters[method], adapter, dirs_exist_ok=True)
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    config[key] = [pattern, "q_proj"] if as_list else pattern
    json.dump(config, open(path, "w"))
    run_cli("check", base, adapter)
    out = os.path.join(adapter, "merged")
    if run_cli("merge", base, adapter, "-o", out):
        assert not os.path.lexists(out)
    shutil.rmtree(adapter)


@fuzz("options")
@given(pattern=PATTERNS, how=st.sampled_from(["targets", "filter", "budget-filter"]))
def test_command_line_regexes_never_hang_or_crash(workdir, pattern, how):
    root, base, _ = workdir
    args = {
        "targets": ["inspect", base, "--budget", "lora", "--targets", pattern],
        "filter": ["inspect", base, "--tensors", "--filter", pattern],
        "budget-filter": ["inspect", base, "--budget", "ia3", "--targets", "all-linear", "--feedforward", pattern],
    }[how]
    run_cli(*args)


TEXTS = st.text(st.sampled_from(list("ab_.1 \nQ") + ["é", "١", "²", "\u0301"]), max_size=10)


@fuzz("agree")
@given(pattern=PATTERNS, texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_matching_agrees_with_re(pattern, texts):
    """Where re answers quickly (short texts), peftcli's matching is re's, or both refuse the pattern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = re.compile(pattern)
        except (re.error, OverflowError, RecursionError):
            expected = None
    try:
        mine = patterns.Pattern(pattern, "--filter")
    except UsageError as exc:
        lines = exc.one_line().splitlines()
        assert len(lines) == 1
        # refused: either re refuses it too, or it unrolls beyond what may be compiled
        assert expected is None or "unroll" in lines[0] or "characters" in lines[0], lines[0]
        return
    assert expected is not None, f"accepted {pattern!r}, which re refuses"
    with patterns.command_budget(5.0):  # never reached on texts this short; re would hang first
        for text in texts:
            assert mine.fullmatch(text) == (expected.fullmatch(text) is not None), (pattern, text)
            assert mine.search(text) == (expected.search(text) is not None), (pattern, text)
