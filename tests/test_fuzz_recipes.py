"""Property-based fuzzing of recipes: mutated YAML structure never crashes or hangs ``peftcli run``.

The shipped recipes are mutated two ways: in their parsed structure (values replaced by other
YAML nodes, keys renamed, deleted or duplicated, subtrees nested deeper, ``${...}``
substitutions pointed anywhere) and in their text (anchors and aliases inserted, lines
duplicated or cut, control characters and tabs spliced in). Each mutant is planned with
``peftcli run RECIPE --dry-run``, and some with ``key.sub=value`` overrides: the outcome must be
a plan or one ``error:`` line with exit 1 or 2, within a bounded time, never a traceback.

Profiles as in ``test_fuzz.py`` (``HYPOTHESIS_PROFILE=ci`` by default, ``long`` for a soak).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_fuzz import JSON_VALUES, PROFILE, edit_json, run_cli

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
RECIPES = sorted(n for n in os.listdir(RECIPES_DIR) if n.endswith(".yaml"))
CASES = {"structure": {"ci": 25, "long": 2000}, "text": {"ci": 25, "long": 2000}}

pytestmark = pytest.mark.timeout(300 if PROFILE == "ci" else 7200)


def fuzz(kind: str):
    return settings(settings.get_profile("peftcli-fuzz"), max_examples=CASES[kind][PROFILE])


# Values that mean something to a recipe: substitutions, built-ins, paths, numbers at the bounds.
RECIPE_LEAVES = st.sampled_from([
    "${model}", "${data.train}", "${vars}", "${nope}", "${model", "$${model}", "${data.train.x}",
    {"builtin": "sentiment", "examples": 10**12}, {"builtin": "topic", "seed": 10**23},
    {"builtin": "tiny", "arch": "llama"}, {"builtin": "nope"}, "../outside", "/etc", "-", "",
    "lora", "merged", 0, -1, 2**63, 1e309, float("nan"), True, None, [], {},
])
RECIPE_VALUES = st.one_of(JSON_VALUES, RECIPE_LEAVES)


def deepen(value, depth: int):
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


@st.composite
def structural_mutant(draw):
    name = draw(st.sampled_from(RECIPES))
    with open(os.path.join(RECIPES_DIR, name), encoding="utf-8") as f:
        doc = yaml.safe_load(f)

    class Data:  # edit_json draws through this
        def draw(self, strategy):
            return draw(strategy)

    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            doc = edit_json(Data(), doc)
        elif isinstance(doc, dict) and doc:
            key = draw(st.sampled_from(sorted(doc, key=str)))
            doc[key] = draw(RECIPE_VALUES) if draw(st.booleans()) else deepen(doc[key], draw(st.integers(1, 80)))
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


TEXT_EDITS = [
    "&a [*a]\n", "x: &a {y: *a}\n", "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",  # a billion-laughs shape: 9**6 leaves
    "\t", "\x1b]0;title\x07", "\x00", "\ufeff", ": :", "- - -", "{", "[", "!!python/object:os.system ls\n",
    "!!binary aGVsbG8=\n", "<<: *nope\n", "steps: !!set {a, b}\n", "vars: {a: ${a}}\n", "---\n", "...\n",
]


BOMB = ["a: &a [1,1,1,1,1,1,1,1,1]"] + [
    f"{k}: &{k} [{','.join(['*' + p] * 9)}]" for p, k in zip("abcde", "bcdef")
]


def without_block(lines: list[str], key: str) -> list[str]:
    """``lines`` without the top-level mapping entry ``key`` and its indented lines."""
    out, skipping = [], False
    for line in lines:
        if line.startswith(key):
            skipping = True
        elif skipping and not line.startswith((" ", "\t", "#")) and line.strip():
            skipping = False
        if not skipping:
            out.append(line)
    return out


@st.composite
def textual_mutant(draw):
    name = draw(st.sampled_from(RECIPES))
    with open(os.path.join(RECIPES_DIR, name), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate", "cut", "bomb"]))
        if action == "bomb":  # vars replaced: every ${train_steps} would become 9**6 leaves
            lines = without_block(lines, "vars:") + ["\nvars:\n"] + [f"  {k}\n" for k in BOMB] + ["  train_steps: *f\n"]
        elif action == "insert" or not lines:
            lines.insert(i, draw(st.sampled_from(TEXT_EDITS) | st.text(max_size=12)))
        else:
            i = min(i, len(lines) - 1)
            if action == "delete":
                del lines[i]
            elif action == "duplicate":
                lines.insert(i, lines[i])
            else:
                lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    return "".join(lines)


OVERRIDES = st.lists(
    st.sampled_from([
        "vars.train_steps=0", "vars.train_steps=1e400", "model=${model}", "steps.train.lr=nan",
        "steps.inject.rank=-3", "steps.nope.x=1", "data.train=", "=", "steps=[]", "model.builtin=tiny",
        "steps.merge.inputs=[a, b]", "vars=", "steps.train.steps=9223372036854775807",
    ]),
    max_size=2,
)


def plan_mutant(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        code = run_cli("run", path, *overrides, "--dry-run", "-o", os.path.join(tmp, "wd"))
        assert code in (0, 1, 2), code  # planning uses no resources that could run out


@fuzz("structure")
@given(structural_mutant(), OVERRIDES)
def test_structurally_mutated_recipes_plan_or_fail_in_one_line(text, overrides):
    plan_mutant(text, overrides)


@fuzz("text")
@given(textual_mutant(), OVERRIDES)
def test_textually_mutated_recipes_plan_or_fail_in_one_line(text, overrides):
    plan_mutant(text, overrides)
