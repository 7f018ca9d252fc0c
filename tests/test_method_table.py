"""The README's method table against the registries, and each ✔ in its PEFT columns against
a parity test: a test file that builds the PEFT type's config and compares with PEFT.

"PEFT read" needs a test in which PEFT makes the adapter (``get_peft_model``) and peftcli's
result is held to PEFT's (``merge_and_unload`` or PEFT's own forward); "PEFT write" one in
which PEFT loads what peftcli wrote (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import pathlib

import pytest

from peftcli.methods import METHODS, READ_FOLD

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = "| method | φ | inject, train | PEFT read | PEFT write | folds | default lr: classify / lm, sft / new head |"


def _table() -> dict[str, list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.split(HEADER)[1].split("\n\n")[0].splitlines()[2:]
    return {c[0].strip("` "): [x.strip() for x in c] for c in (line.strip().strip("|").split("|") for line in lines)}


def _mark(flag) -> str:
    return "✔" if flag else "—"


def test_the_table_lists_every_method_and_type_with_its_capabilities():
    table = _table()
    expected = {}
    for name, m in METHODS.items():
        expected[name] = ["✔", _mark(m.peft_type), _mark(m.peft_type), _mark(m.folds)]
    for name, m in READ_FOLD.items():
        expected[name] = ["—", _mark(m.peft_type), "—", _mark(m.folds)]
    expected["train --full"] = ["✔", "—", "—", "✔"]
    assert {k: v[2:6] for k, v in table.items()} == expected


def _tests_text() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")}


@pytest.mark.parametrize("name", [*METHODS, *READ_FOLD])
def test_each_peft_mark_has_a_parity_test(name):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    m = {**METHODS, **READ_FOLD}[name]
    if m.peft_type is None:
        pytest.skip(f"{name}: no PEFT type")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[m.peft_type].__name__
    texts = [t for t in _tests_text().values() if config_class in t]
    assert any("get_peft_model" in t and ("merge_and_unload" in t or "PeftModel" in t) for t in texts), (
        f"no test builds a PEFT {config_class} adapter and holds peftcli to PEFT on it"
    )
    if name in METHODS:
        assert any("PeftModel.from_pretrained" in t for t in texts), f"no test loads peftcli's {name} adapter in PEFT"
