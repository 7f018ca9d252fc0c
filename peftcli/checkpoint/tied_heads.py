"""The tied-heads rule every model directory ``CheckpointWriter`` writes keeps.

transformers ties ``lm_head.weight`` to the input embedding on load when config.json says
``tie_word_embeddings: true``, and silently discards a stored head that differs. So a written
directory whose config ties the heads and that stores both tensors must store them equal, or it
loads as a model other than the one written. ``TiedHeads`` watches the two tensors' bytes as they
are written (a digest each, never a second read) and ``check`` refuses, before the output is
renamed into place, when they differ. Every merge writer (engine, the torch-free linear path,
passthrough) writes through ``CheckpointWriter``, so the rule holds for all of them, whatever
the method and whatever the inputs' own configs say. Only an explicit ``true`` counts: a config
without the key is left to the model class's default, which this module does not guess.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterable

from peftcli.errors import BadInputError

HEAD = "lm_head.weight"
# As preflight.input_embedding (not imported: it pulls in the merge planner): the word embedding.
_EMBEDDING = re.compile(r"(embed|^wte$|^emb)", re.IGNORECASE)
_NOT_WORDS = re.compile(r"(pos|type|^wpe$)", re.IGNORECASE)
_WORDS = re.compile(r"(word|tok|^wte$)", re.IGNORECASE)


def input_embedding(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The word embedding's tensor name ([vocab, hidden]) among ``shapes``, as preflight finds it."""
    found = []
    for name in sorted(shapes):
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        last = module.rsplit(".", 1)[-1] if module else ""
        if module and len(shapes[name]) == 2 and _EMBEDDING.search(last) and not _NOT_WORDS.search(last):
            found.append((not _WORDS.search(last), name))
    return min(found)[1] if found else None


def output_config(source_dir: str | None, extra_files: dict[str, bytes]) -> Any:
    """The config.json a directory output gets: ``extra_files``' one, else the source directory's."""
    try:
        if "config.json" in extra_files:
            return json.loads(extra_files["config.json"])
        if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
            with open(os.path.join(source_dir, "config.json"), "rb") as f:
                return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None  # copy_model_files or the config's own readers say what is wrong with it
    return None


class TiedHeads:
    """Digests of the head and embedding as written, where the output's config ties them."""

    def __init__(self, embedding: str):
        self.names = (embedding, HEAD)
        self._sha = {n: hashlib.sha256() for n in self.names}

    @classmethod
    def watch(cls, config: Any, specs: Iterable[Any]) -> "TiedHeads | None":
        """A watcher when ``config`` ties the heads and ``specs`` hold both tensors; else None."""
        if not isinstance(config, dict) or config.get("tie_word_embeddings") is not True:
            return None
        shapes = {s.name: tuple(s.shape) for s in specs}
        embedding = input_embedding(shapes) if HEAD in shapes else None
        return cls(embedding) if embedding is not None and embedding != HEAD else None

    def update(self, name: str, data: memoryview) -> None:
        sha = self._sha.get(name)
        if sha is not None:
            sha.update(data)

    def check(self) -> None:
        embedding, head = self.names
        if self._sha[embedding].digest() != self._sha[head].digest():
            raise BadInputError(
                f"the merged config.json ties {head} to {embedding} (tie_word_embeddings true) but the merged "
                f"{head} and {embedding} differ: transformers would load {embedding} as both and drop the merged {head}",
                f"set tie_word_embeddings false in the base's config.json, or drop {head} from the base (and the inputs), then merge again",
            )
