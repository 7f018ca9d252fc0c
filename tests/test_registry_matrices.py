"""Every registered method is in every test matrix its declared capabilities call for, and the
capabilities it declares are the ones its code has.

The matrices of tests/test_merge.py, test_contract.py and test_train.py derive from the registry
(tests/matrices.py); the byte goldens of test_inject_memory.py are data, so a method without a
golden yet fails here instead of going untested.
"""

from __future__ import annotations

import shlex

import pytest

from peftcli.methods import METHODS, ONE_PASS, PHASES, READ_FOLD, ROUNDS, MethodBase, foldable, foldable_hint
from peftcli.methods.base import SCHEDULES
from tests import matrices
from tests.test_contract import IDENTITY_AT_INIT, ONE_PASS as CONTRACT
from tests.test_inject_memory import EVERY_METHOD, GOLDEN
from tests.test_merge import FOLDABLE
from tests.test_train import TRAIN_CASES


def _case_method(case: str) -> str:
    """The method of a test_inject_memory case, ``"arch: METHOD --options"``."""
    return shlex.split(case.split(": ", 1)[1])[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_capabilities_are_what_the_method_has(name):
    method = METHODS[name]
    assert isinstance(method, MethodBase) and method.name == name
    assert method.schedule in SCHEDULES
    # folds <=> the class defines deltas: callers read the flag, never probe for the function.
    assert method.folds == (type(method).deltas is not MethodBase.deltas)
    assert isinstance(method.trains_in_place, bool) and isinstance(method.identity_at_init, bool)
    assert any(e.startswith(f"peftcli inject {name}") for e in method.examples), "inject --help shows no example"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_in_the_matrices_its_capabilities_call_for(name):
    method = METHODS[name]
    assert name in {_case_method(c) for c in EVERY_METHOD}, "no streamed-φ byte-identity case"
    if method.schedule != ONE_PASS:
        return  # no φ before train runs its phases or rounds: tests/test_sparse_training.py
    assert name in {_case_method(c) for c in GOLDEN}, "no byte golden for its injected φ"
    assert name in CONTRACT, "not in the method contract"
    assert name in {m for m, _ in TRAIN_CASES.values()}, "not in test_every_method_trains"
    assert (name in IDENTITY_AT_INIT) == method.identity_at_init
    assert (name in {m for m, _ in FOLDABLE}) == method.folds, "merge parity does not match folds"


def test_schedules_name_the_training_drivers():
    assert {n for n, m in METHODS.items() if m.schedule == PHASES} == {"lt-sft", "diff-pruning"}
    assert {n for n, m in METHODS.items() if m.schedule == ROUNDS} == {"lottery"}


def test_the_foldable_hint_names_exactly_the_methods_that_fold():
    hint = foldable_hint()
    assert hint.startswith("only ") and hint.endswith(" adapters fold into the weights"), hint
    listed = hint[len("only ") : -len(" adapters fold into the weights")].replace(" and ", ", ").split(", ")
    assert listed == foldable() == [n for n, m in (*METHODS.items(), *READ_FOLD.items()) if m.folds]


class _NewMethod(MethodBase):
    """A stand-in for a method someone registers tomorrow: folds, one pass."""

    name = "new-method"
    folds = True

    def deltas(self, cfg, tensors, ckpt):
        return {}


def test_a_new_registered_method_lands_in_the_derived_matrices(monkeypatch):
    monkeypatch.setitem(METHODS, "new-method", _NewMethod())
    assert "new-method" in matrices.one_pass() and "new-method" in matrices.foldable_one_pass()
    assert "new-method" in matrices.identity_at_init() and "new-method" in foldable()
    assert ("new-method", {}) in matrices.cases(matrices.foldable_one_pass(), {})
    # ...and the meta-test above refuses it until it has a golden and a byte-identity case.
    with pytest.raises(AssertionError, match="byte-identity"):
        test_every_method_is_in_the_matrices_its_capabilities_call_for("new-method")
