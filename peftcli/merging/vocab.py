"""Merging full checkpoints whose vocabularies differ (added tokens, resized embeddings).

Row i of an embedding is token i of that model's tokenizer: models whose tokenizers give other
ids (or other tokens) cannot be merged row by row. By default such inputs are refused in one
line naming each vocabulary size and the tensor (``check``): the embedding rows, or, with equal
shapes, the ``tokenizer.json`` vocabularies. ``tokenizer_source`` merges them by token instead,
as mergekit's ``tokenizer_source`` does (``mergekit/tokenizer/build.py`` and ``embed.py``):

- the output vocabulary is the base's (``base``), one merged model's (``MODEL``, its path as
  given), or the union (``union``: the base's tokenizer with every other model's tokens added,
  in input order, as ``add_tokens`` numbers them);
- each model's vocabulary tensors (input embedding, untied output head, a head bias: the
  tensors whose first dimension is ``vocab_size`` and whose name is an embedding's or a head's)
  are rebuilt in the output's token order: a token the model has gives its own row; a token it
  lacks gives mergekit's default row: the row of the only model (base included) that has the
  token, else the base's row if the base has it, else the fp64 mean of the rows of the models
  that have it (cast to the model's dtype), else zeros. Those filled rows then take part in
  the merge like any other (mergekit excludes none): a token only one model has keeps that
  model's row exactly, whatever the method;
- ids of the output that no token names (an embedding padded beyond its tokenizer) keep the
  tokenizer source's own rows in every model, so the merge leaves them as they are.

The output's tokenizer files are the source's (the union's written by ``transformers``), its
config.json the base's with ``vocab_size`` set to the output's rows. The rebuilt tensors are
produced whole (one vocabulary tensor per model in memory at a time); every other tensor
streams as usual. Only full checkpoints with a fast tokenizer (``tokenizer.json``) are merged
by token: diffs and adapters are made against the base's own vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from peftcli.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint
from peftcli.errors import BadInputError, PeftcliError, UsageError

SOURCES = ("base", "union")  # or a merged model's path
HINT = "pass `tokenizer_source` base|union|MODEL to merge them by token (docs/merging.md)"
# The tensors with one row per token: input embeddings and output heads (and a head's bias).
_VOCAB_NAME = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|lm_head|embed_out|output)(\.|$)")
# What of a model directory is its tokenizer (the rest of the copied files: config, generation).
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt|spiece\.model|"
    r"sentencepiece.*\.model|.*\.tiktoken|chat_template\.(jinja|json))$"
)


def _is_input_checkpoint(path: str) -> bool:
    """An input the merge reads as a full checkpoint (neither a diff nor an adapter directory)."""
    # artifacts.adapter_dir.ADAPTER_CONFIG, not imported: it imports every method, which a merge of checkpoints never needs
    return not path.endswith(".diff") and not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json")))


def vocab_tensors(ckpt: Checkpoint, rows: int) -> list[str]:
    """The names of ``ckpt``'s tensors with one row per token (``rows`` of them)."""
    return sorted(
        t.name for t in ckpt.tensors.values()
        if len(t.shape) in (1, 2) and t.shape and t.shape[0] == rows and _VOCAB_NAME.search(t.name)
    )


def _rows(ckpt: Checkpoint) -> int | None:
    """The model's number of token rows: config.json's ``vocab_size``, else its embedding's rows."""
    config = ckpt.config or {}
    size = config.get("vocab_size")
    if isinstance(size, int) and size > 0:
        return size
    embeds = [t for t in ckpt.tensors.values() if len(t.shape) == 2 and _VOCAB_NAME.search(t.name)]
    return embeds[0].shape[0] if embeds else None


def json_vocab(directory: str | None) -> dict[str, int] | None:
    """token → id of ``directory``'s tokenizer.json (its model's vocabulary and added tokens), or None."""
    path = os.path.join(directory, "tokenizer.json") if directory else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        model = doc["model"]
        vocab = model["vocab"]
        tokens = {p[0]: i for i, p in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)  # Unigram: a list
        for t in doc.get("added_tokens") or []:
            tokens[t["content"]] = t["id"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise BadInputError(f"{path}: not a tokenizer.json peftcli can read ({exc})", "save the tokenizer again with transformers' save_pretrained") from None
    # Type sets, not a Python loop over every token (JSON gives str keys and int, bool, float, ...
    # values: isinstance(v, int) is True for int and bool alone).
    if not (set(map(type, tokens)) <= {str} and set(map(type, tokens.values())) <= {int, bool} and (not tokens or min(tokens.values()) >= 0)):
        raise BadInputError(f"{path}: its vocabulary maps tokens to something other than ids", "save the tokenizer again with transformers' save_pretrained")
    return tokens


class VocabularyMismatchError(BadInputError):
    """Inputs whose vocabulary is not the base's (exit 1: the files disagree; the hint names
    ``tokenizer_source``, which merges them token by token)."""


def check(base: Checkpoint, inputs: list[str], allow_pickle: bool) -> None:
    """Refuse full-checkpoint inputs whose vocabulary is not the base's (rows, or tokenizer ids)."""
    mine = _rows(base)
    if mine is None:
        return
    names = vocab_tensors(base, mine)
    base_vocab = _LazyVocab(base.directory)
    _ = base_vocab.tokens  # the base's tokenizer.json is read and checked whatever the inputs: the output carries it
    for path in inputs:
        if not _is_input_checkpoint(path):
            continue
        try:
            ft = open_checkpoint(path, allow_pickle=allow_pickle)
        except PeftcliError:
            continue  # the merge opens it again and reports it
        with ft:
            for name in names:
                t = ft.tensors.get(name)
                if t is not None and len(t.shape) == len(base.tensors[name].shape) and t.shape[1:] == base.tensors[name].shape[1:] and t.shape[0] != mine:
                    raise VocabularyMismatchError(
                        f"the vocabularies differ: {path} has {t.shape[0]} tokens, the base {mine} ({name!r} is "
                        f"{list(t.shape)} there, {list(base.tensors[name].shape)} in the base)", HINT,
                    )
            theirs = None if base_vocab.same_file(ft.directory) else json_vocab(ft.directory)
            if theirs is not None and base_vocab.tokens is not None and theirs != base_vocab.tokens:
                raise VocabularyMismatchError(f"the vocabularies differ: {path}'s tokenizer.json {_first_difference(base_vocab.tokens, theirs)}", HINT)
            if base.directory and ft.directory:
                _other_files_agree(base.directory, ft.directory, path, compared=base_vocab.exists and (theirs is not None or base_vocab.same_file(ft.directory)))


class _LazyVocab:
    """The base's tokenizer.json (parsed once, and checked: the merge copies it to the output)
    and whether an input's is the same bytes, which then needs no parse of its own: the same
    bytes are the same vocabulary (json_vocab reads nothing else)."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.path = os.path.join(directory, "tokenizer.json") if directory else None
        self.exists = self.path is not None and os.path.isfile(self.path)
        self._bytes: bytes | None = None
        self._tokens: dict[str, int] | None = None

    def same_file(self, directory: str | None) -> bool:
        """Whether ``directory`` has a tokenizer.json of the base's bytes (False where either lacks one)."""
        other = os.path.join(directory, "tokenizer.json") if directory else None
        if not self.exists or other is None or not os.path.isfile(other):
            return False
        if self._bytes is None:
            with open(self.path, "rb") as f:  # type: ignore[arg-type]  # exists: path is set
                self._bytes = f.read()
        with open(other, "rb") as f:
            return f.read() == self._bytes

    @property
    def tokens(self) -> dict[str, int] | None:
        if self._tokens is None and self.exists:
            self._tokens = json_vocab(self.directory)
        return self._tokens


# The files that say which token each id is, beside tokenizer.json (sentencepiece, BPE, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json")


def _other_files_agree(base_dir: str, ft_dir: str, path: str, compared: bool) -> None:
    """Where the two tokenizer.json could not be compared (``compared`` False: one side or both
    lack it), the tokenizer files both have must be the same bytes, and an input with a
    tokenizer must share one with the base: rows of equal count may still name other tokens.
    An input saved without any tokenizer file is taken to use the base's (its rows are counted
    above)."""
    if compared:
        return
    mine = {n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(base_dir, n))}
    theirs = {n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(ft_dir, n))}
    if not theirs:
        return
    common = sorted(mine & theirs)
    for name in common:
        with open(os.path.join(base_dir, name), "rb") as a, open(os.path.join(ft_dir, name), "rb") as b:
            if a.read() != b.read():
                raise VocabularyMismatchError(f"the vocabularies may differ: {path}'s {name} is not the base's", HINT)
    if not common:
        raise VocabularyMismatchError(
            f"cannot tell whether {path}'s vocabulary is the base's: it has {', '.join(sorted(theirs))}, "
            f"the base {', '.join(sorted(mine)) or 'no tokenizer file'}",
            "give the base and the input the same tokenizer files (tokenizer.json), or pass `tokenizer_source`",
        )


def _first_difference(base: dict[str, int], other: dict[str, int]) -> str:
    for token, i in sorted(base.items(), key=lambda kv: kv[1]):
        if other.get(token) != i:
            where = f"id {other[token]}" if token in other else "absent"
            return f"has {len(other)} tokens, the base's {len(base)}: token {token!r} is id {i} in the base, {where} there"
    extra = min(((t, i) for t, i in other.items() if t not in base), key=lambda kv: kv[1])  # the base's all match: other has more
    return f"has {len(other)} tokens, the base's {len(base)}: token {extra[0]!r} (id {extra[1]}) is not in the base's"


@dataclass
class _Model:
    path: str
    ckpt: Checkpoint
    rows: int
    tokens: dict[str, int]  # token -> id, ids < rows only (a token beyond the rows has no embedding)
    added: list[dict] = field(default_factory=list)  # tokenizer.json's added_tokens entries


@dataclass
class VocabPlan:
    """The output vocabulary and, per model, where each of its rows comes from."""

    source: str
    rows: int  # the output's vocabulary size
    names: list[str]  # the vocabulary tensors (the base's names)
    models: list[_Model]  # the base first, then the inputs
    perm: dict[str, Any]  # model path -> LongTensor[rows]: its row for each output id, -1 where it has none
    files: dict[str, bytes]  # the output's tokenizer files (empty: the base's, copied)
    _cache: tuple[str, Any] | None = None

    @property
    def source_dir(self) -> str | None:
        """Where the output's model files are copied from: the base's, unless another tokenizer replaces its own."""
        return self.models[0].ckpt.directory if not self.files else None

    def extra_files(self, config_files: dict[str, bytes] | None) -> dict[str, bytes]:
        """config.json (``vocab_size`` the output's), the base's other model files and the tokenizer's."""
        from peftcli.checkpoint.writer import copy_model_files

        base = self.models[0].ckpt
        out: dict[str, bytes] = {}
        if self.files:  # the base's config and generation files without its tokenizer
            with tempfile.TemporaryDirectory() as tmp:
                for name in copy_model_files(str(base.directory), tmp):
                    if not _TOKENIZER_FILE.match(name):
                        with open(os.path.join(tmp, name), "rb") as f:
                            out[name] = f.read()
            out.update(self.files)
        config = json.loads(config_files["config.json"]) if config_files and "config.json" in config_files else dict(base.config or {})
        config["vocab_size"] = self.rows
        # The special-token ids (eos, bos, pad...) are the base's: each must name the same token
        # in the output's vocabulary (another model's tokenizer numbers it otherwise).
        out["config.json"] = (json.dumps(self._special_ids(config, "config.json"), indent=2, sort_keys=True) + "\n").encode()
        if "generation_config.json" in out:
            generation = json.loads(out["generation_config.json"])
            out["generation_config.json"] = (json.dumps(self._special_ids(generation, "generation_config.json"), indent=2, sort_keys=True) + "\n").encode()
        return out

    def _special_ids(self, doc: dict, what: str) -> dict:
        """``doc`` with every ``*_token_id`` (an id or a list of ids of the base's vocabulary)
        moved to the id its token has in the output's; refused where the output lacks it."""
        base = self.models[0]
        ids = self.perm[base.path].tolist()
        output_id = {row: i for i, row in enumerate(ids) if row >= 0}
        names = {i: t for t, i in base.tokens.items()}

        def moved(key: str, value: int) -> int:
            if value not in output_id:
                token = names.get(value, f"id {value}")
                raise BadInputError(
                    f"the base's {what} {key} names {token!r}, which the output's vocabulary lacks",
                    "merge with `tokenizer_source` base or union, or give the merged model's tokenizer that token",
                )
            return output_id[value]

        out = dict(doc)
        for key, value in doc.items():
            if not key.endswith("_token_id") or isinstance(value, bool):
                continue
            if isinstance(value, int) and value >= 0:
                out[key] = moved(key, value)
            elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                out[key] = [moved(key, v) for v in value]
        return out

    def reindexed(self, ckpt: Checkpoint) -> "Reindexed":
        return Reindexed(ckpt, self, next(m for m in self.models if m.path == ckpt.path))

    def values(self, model: _Model, name: str):
        """``model``'s tensor ``name`` in the output's token order (mergekit's rows for missing tokens)."""
        import torch

        own = model.ckpt.get(name)
        p = self.perm[model.path]
        out = torch.empty((self.rows, *own.shape[1:]), dtype=own.dtype)
        have = p >= 0
        out[have] = own[p[have]]
        missing = (~have).nonzero().reshape(-1)
        if len(missing):
            ids, rows = self._defaults(name)
            pos = torch.searchsorted(ids, missing)
            out[missing] = rows[pos].to(own.dtype)
        return out

    def _defaults(self, name: str):
        """mergekit's default rows of ``name`` for every output id some model lacks (ids, fp64 rows)."""
        import torch

        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        perms = torch.stack([self.perm[m.path] for m in self.models])  # [models, rows]
        ids = (perms < 0).any(dim=0).nonzero().reshape(-1)
        tensors = [m.ckpt.get(name) for m in self.models]
        rows = torch.zeros((len(ids), *tensors[0].shape[1:]), dtype=torch.float64)
        for k, i in enumerate(ids.tolist()):
            holders = [j for j in range(len(self.models)) if perms[j, i] >= 0]
            if len(holders) == 1 or (holders and holders[0] == 0):  # the only holder, else the base
                rows[k] = tensors[holders[0]][perms[holders[0], i]].double()
            elif holders:
                rows[k] = torch.stack([tensors[j][perms[j, i]].double() for j in holders]).mean(dim=0)
        self._cache = (name, (ids, rows))
        return ids, rows

    def close(self) -> None:
        for m in self.models[1:]:
            m.ckpt.close()


class Reindexed:
    """A checkpoint whose vocabulary tensors are rebuilt in the output's token order (produced whole)."""

    def __init__(self, inner: Checkpoint, plan: VocabPlan, model: _Model):
        self._inner, self._plan, self._model = inner, plan, model
        self.tensors = dict(inner.tensors)
        for name in plan.names:
            t = inner.tensors[name]
            self.tensors[name] = TensorInfo(name, t.dtype, (plan.rows, *t.shape[1:]), t.file)  # no byte range: whole

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    @property
    def config(self) -> dict | None:
        config = self._inner.config
        return None if config is None else {**config, "vocab_size": self._plan.rows}

    def get(self, name: str):
        if name in self._plan.names:
            return self._plan.values(self._model, name)
        return self._inner.get(name)

    def __enter__(self) -> "Reindexed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan(base: Checkpoint, inputs: list[str], source: str | None, allow_pickle: bool) -> VocabPlan | None:
    """The token-by-token plan for ``source`` (None: refuse differing vocabularies, no plan)."""
    if source is None:
        check(base, inputs, allow_pickle)
        return None
    chosen = _chosen(source, base.path, inputs)
    if source in SOURCES:
        try:
            check(base, inputs, allow_pickle)
            return None  # one vocabulary: the base's, merged row by row as without the option
        except VocabularyMismatchError:
            pass
    models = [_model(base.path, base)]
    try:
        for path in inputs:
            if not _is_input_checkpoint(path):
                raise UsageError(f"`tokenizer_source` merges full checkpoints by token; {path} is a diff or an adapter", "merge full checkpoints, or drop `tokenizer_source`")
            models.append(_model(path, open_checkpoint(path, allow_pickle=allow_pickle)))
        names = vocab_tensors(base, models[0].rows)
        if not names:
            raise BadInputError(f"{base.path}: no embedding or head with config.json's vocab_size of {models[0].rows} rows", "merge models with a token embedding")
        _check_unknown(base, models[0].rows, names)
        for m in models[1:]:
            _check_tensors(m, models[0], names)
        out_tokens, rows, files = _output(source, chosen, models)
    except BaseException:
        for m in models[1:]:
            m.ckpt.close()
        raise
    perm = {m.path: _permutation(m, out_tokens, rows, i == chosen) for i, m in enumerate(models)}
    return VocabPlan(source, rows, names, models, perm, files)


def _chosen(source: str, base: str, inputs: list[str]) -> int:
    """The model whose tokenizer the output takes (0: the base; ``union``: the base's, extended)."""
    if source in SOURCES:
        return 0
    for i, path in enumerate([base, *inputs]):
        if os.path.realpath(path) == os.path.realpath(source):
            return i
    raise UsageError(f"`tokenizer_source` {source!r} is none of the merged models", "give base, union, or the path of the base or an input as given")


def _model(path: str, ckpt: Checkpoint) -> _Model:
    rows = _rows(ckpt)
    tokens = json_vocab(ckpt.directory)
    if tokens is None or rows is None:
        raise BadInputError(
            f"{path}: no tokenizer.json{'' if rows else ' or vocab_size'} beside the weights: `tokenizer_source` merges by token",
            "save the model's (fast) tokenizer beside it with save_pretrained",
        )
    with open(os.path.join(str(ckpt.directory), "tokenizer.json"), encoding="utf-8") as f:
        added = json.load(f).get("added_tokens") or []
    return _Model(path, ckpt, rows, {t: i for t, i in tokens.items() if i < rows}, added)


def _check_unknown(base: Checkpoint, rows: int, names: list[str]) -> None:
    """Refuse a tensor with one entry per token that is not named as an embedding or a head:
    left in the inputs' own token order, it would be merged row by row across other tokens."""
    other = next((t for t in sorted(base.tensors.values()) if t.shape and t.shape[0] == rows and t.name not in names), None)
    if other is not None:
        raise BadInputError(
            f"{base.path}: {other.name!r} has {rows} rows, one per token, but is not an embedding or a head peftcli reindexes",
            "merge models whose vocabularies are the base's, or whose only per-token tensors are the embedding and head",
        )


def _check_tensors(m: _Model, base: _Model, names: list[str]) -> None:
    """Each vocabulary tensor of the base is in ``m`` with one row per token of ``m`` and the base's other dimensions."""
    for name in names:
        mine, theirs = base.ckpt.tensors[name], m.ckpt.tensors.get(name)
        if theirs is None or tuple(theirs.shape) != (m.rows, *mine.shape[1:]):
            got = "absent" if theirs is None else list(theirs.shape)
            raise BadInputError(
                f"{m.path}: {name!r} is {got}, not one row per token of its vocab_size {m.rows} by {list(mine.shape[1:])}",
                "merge models of the base's architecture",
            )


def _output(source: str, chosen: int, models: list[_Model]) -> tuple[dict[str, int], int, dict[str, bytes]]:
    """The output's token → id, its number of rows, and its tokenizer files (empty: the base's as they are)."""
    if source == "union":
        files = _union_files(models)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "tokenizer.json"), "wb") as f:
                f.write(files["tokenizer.json"])
            tokens = json_vocab(tmp) or {}
        return tokens, max(models[0].rows, max(tokens.values()) + 1), files
    m = models[chosen]
    files = {}
    if chosen != 0:
        from peftcli.checkpoint.writer import copy_model_files

        with tempfile.TemporaryDirectory() as tmp:
            for name in copy_model_files(str(m.ckpt.directory), tmp):
                if _TOKENIZER_FILE.match(name):
                    with open(os.path.join(tmp, name), "rb") as f:
                        files[name] = f.read()
    return m.tokens, m.rows, files


def _union_files(models: list[_Model]) -> dict[str, bytes]:
    """The base's tokenizer with every other model's tokens added (plain ones, then added tokens), as mergekit's union."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    base = models[0]
    tok = AutoTokenizer.from_pretrained(base.ckpt.directory, use_fast=True, trust_remote_code=False)
    if not tok.is_fast:
        raise BadInputError(f"{base.path}: no fast tokenizer to extend", "save the base's tokenizer with tokenizer.json")
    plain: dict[str, None] = {}  # an ordered set: 32k-token vocabularies would make a list's lookups quadratic
    added: dict[str, dict] = {}
    for m in models:
        marked = {a.get("content") for a in m.added}
        plain.update((t, None) for t, _ in sorted(m.tokens.items(), key=lambda kv: kv[1]) if t not in marked and t not in base.tokens and t not in plain)
        added.update({a["content"]: a for a in m.added if a.get("content") in m.tokens and a["content"] not in added})
    tok.add_tokens([t for t in plain if t not in added])
    tok.add_tokens([
        AddedToken(a["content"], single_word=a.get("single_word", False), lstrip=a.get("lstrip", False),
                   rstrip=a.get("rstrip", False), normalized=a.get("normalized", True), special=a.get("special", False))
        for c, a in added.items() if c not in base.tokens
    ])
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
    return out


def _permutation(m: _Model, out_tokens: dict[str, int], rows: int, source: bool):
    """``m``'s row for each output id (-1: it lacks the token); ids no token names are the
    tokenizer source's own rows (padding), which every other model lacks."""
    import torch

    p = torch.full((rows,), -1, dtype=torch.long)
    if source:
        p[: min(rows, m.rows)] = torch.arange(min(rows, m.rows))
        for i in out_tokens.values():
            p[i] = -1
    for token, i in out_tokens.items():
        if token in m.tokens:
            p[i] = m.tokens[token]
    return p
