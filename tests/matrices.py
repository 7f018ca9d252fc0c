"""Test matrices derived from the method registry, so that a newly registered method lands in
every matrix its declared capabilities call for (tests/test_registry_matrices.py checks it).

A matrix is its methods' default cases plus hand-picked variants (an option that changes the
math, such as DoRA); the methods come from ``METHODS``, never from a hand-written list.
"""

from __future__ import annotations

from peftcli.methods import METHODS, ONE_PASS, READ_FOLD

# Options a method cannot inject without on the tiny fixtures.
REQUIRED_OPTIONS = {"layers": {"layers": "1"}, "trainable-tokens": {"token_indices": "1,47,120"}}


def options(name: str, **extra) -> dict:
    """``name``'s options for a test case: what it requires, then ``extra``."""
    return {**REQUIRED_OPTIONS.get(name, {}), **extra}


def one_pass() -> list[str]:
    """Methods trained in one pass from the φ inject wrote: the contract, training and golden matrices."""
    return [n for n, m in METHODS.items() if m.schedule == ONE_PASS]


def foldable_one_pass() -> list[str]:
    """One-pass methods whose φ folds: merge parity (the phased ones fold only after training:
    tests/test_sparse_training.py)."""
    return [n for n in one_pass() if METHODS[n].folds]


def linear_only() -> set[str]:
    """Methods declaring that they do not adapt GPT-2's Conv1D (inject refuses it, naming Conv1D)."""
    return {n for n, m in METHODS.items() if not m.adapts_conv1d}


def identity_at_init() -> set[str]:
    """One-pass methods whose injected φ reproduces the base's outputs."""
    return {n for n in one_pass() if METHODS[n].identity_at_init}


def cases(names: list[str], variants: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """``(method, options)``: each method with its default options, then its variants."""
    return [(n, options(n, **v)) for n in names for v in [{}, *variants.get(n, [])]]


def read_fold_only() -> list[str]:
    """PEFT types peftcli reads and folds but never injects (``READ_FOLD``, ``read_only``): in none
    of the matrices above, which derive from ``METHODS`` (no inject, no training, no golden);
    tests/test_read_fold_types.py folds each against PEFT and fails on one it does not cover."""
    return list(READ_FOLD)
