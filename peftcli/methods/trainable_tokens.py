"""Trainable tokens as a method of its own (PEFT's TRAINABLE_TOKENS, ``TrainableTokensConfig``):
only rows ``token_indices`` of an embedding are trained; every other weight stays the base's.

φ is ``base_model.model.<embedding>.trainable_tokens_delta`` [n, dim]: the NEW values of the n
rows (despite its name), initialised as copies of the base's rows (PEFT's ``init_weights``
true), so the model starts as the base. PEFT's merge writes them with ``index_copy``: the
merged rows equal them exactly (a ``Replacement``). On a base whose ``lm_head`` is tied to the
input embedding, PEFT ties a second layer on the head that shares the embedding's delta and
saves it again as ``base_model.model.lm_head.trainable_tokens_delta``: inject writes both keys,
a read requires them equal, and the fold changes the one stored tensor, so a tied base stays
tied (``tie_word_embeddings`` stays true to the tensors).

The rows and the forward are LoRA's ``trainable_token_indices`` ones
(``peftcli.methods.lora.embeddings`` / ``embedding_layers``), reused here. Refused, naming the
key: a key this module does not know (a newer PEFT's option), ``modules_to_save``, a target
that is not an embedding, token ids out of range or repeated, an empty list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import PEFT_PREFIX, Attached, BudgetRow, LazyTensor, MethodBase, TrainDefaults, mismatch_error, peft_key
from peftcli.methods.lora import embeddings as emb
from peftcli.methods.prompting import dims as pl
from peftcli.methods.vera import CORRUPT, ACCEPTED, build, is_int, read_only, refuse_unknown, target_fields
from peftcli.options import option
from peftcli.targets import names_module

if TYPE_CHECKING:
    import torch

SUFFIX = "trainable_tokens_delta"
_KEYS = ("token_indices", "init_weights")  # beyond vera.ACCEPTED: what PEFT 0.21/0.22's TrainableTokensConfig writes
_OFF = {"modules_to_save": None, "layers_to_transform": None}  # accepted keys this method implements only when off


@dataclass
class TrainableTokensConfig:
    token_indices: str | None = option(None, metavar="IDS",
                                       help="comma-separated ids of the tokens (embedding rows) to train, e.g. 5,7,9")
    targets: str | None = option(None, metavar="NAMES",
                                 help="the embedding(s) whose rows are trained: module names; default: the input embedding")
    read: bool = read_only(False)  # from an adapter: its errors are BadInputError

    def __post_init__(self) -> None:
        if self.token_indices is None:  # not a click-required flag: `inspect --budget` lists every method's options
            raise UsageError("trainable-tokens needs `token_indices`: the ids of the embedding rows to train", "give `token_indices`, e.g. 5,7,9")
        text = str(self.token_indices)
        ids = [p.strip() for p in text.split(",")]
        if not text.strip() or not all(p.isascii() and p.isdigit() for p in ids):
            raise UsageError(f"`token_indices` must be comma-separated token ids, got {self.token_indices!r}", "e.g. `token_indices` 5,7,9")
        if len(set(int(p) for p in ids)) != len(ids):
            raise UsageError(f"`token_indices` lists a token id twice: {text!r}", "list each token id once")

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(int(p) for p in str(self.token_indices).split(","))


def _tied(shapes: dict, model_config: dict | None, module: str) -> bool:
    """Whether ``module`` is the input embedding of a causal LM whose ``lm_head`` shares its
    tensor (the checkpoint stores no head; PEFT then ties a layer on the head)."""
    config = model_config or {}
    archs = config.get("architectures") or []
    if emb.HEAD + ".weight" in shapes or not config.get("tie_word_embeddings", False):
        return False
    if not any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
        return False
    try:
        return pl.input_embedding(shapes, model_config)[0] == module
    except BadInputError:
        return False


class TrainableTokens(MethodBase):
    name = "trainable-tokens"
    config_cls = TrainableTokensConfig
    summary = "Train only chosen rows of the embedding (new tokens), the rest frozen (PEFT's TRAINABLE_TOKENS)."
    peft_type = "TRAINABLE_TOKENS"
    folds = True
    train_defaults = TrainDefaults(lr=1e-3)  # not measured yet: new rows start as copies and move little per step
    examples = (
        "peftcli inject trainable-tokens --token-indices 5,7,9 model/ -o runs/tokens/",
        "peftcli inject trainable-tokens --token-indices 0,1 --targets embed_tokens model/ -o runs/tokens/",
    )

    def _error(self, cfg: TrainableTokensConfig, what: str, hint: str) -> Exception:
        return BadInputError(f"TRAINABLE_TOKENS adapter config: {what}", "was it made for another base model?") if cfg.read \
            else UsageError(what, hint)

    def _targets(self, shapes: dict, model_config: dict | None, cfg: TrainableTokensConfig) -> dict[str, tuple[int, int]]:
        """Embedding module -> [rows, dim], each checked against the token ids."""
        from peftcli.targets import linear_modules

        candidates = emb.embeddings(shapes, {m.name for m in linear_modules(shapes, model_config)})
        if cfg.targets is None:
            module, _ = pl.input_embedding(shapes, model_config)
            chosen = {module: candidates.get(module) or tuple(shapes[module + ".weight"])}
        else:
            chosen = {m: s for m, s in candidates.items() if emb.selects(cfg.targets, m)}
            if not chosen:
                raise self._error(cfg, f"`targets` {cfg.targets!r} names no embedding of this base",
                                  "name an nn.Embedding of the model (`peftcli inspect MODEL` lists them), or leave `targets` out")
        for module, (rows, _dim) in chosen.items():
            if max(cfg.indices) >= rows:
                raise self._error(cfg, f"token id {max(cfg.indices)} is not below the {rows} rows of {module}",
                                  "list token ids of this model's vocabulary (resize the embedding first for new tokens)")
        return {m: (int(r), int(d)) for m, (r, d) in chosen.items()}

    def derived_keys(self, cfg: TrainableTokensConfig) -> set[str]:
        """A tied head's copy of its embedding's rows: saved as PEFT saves it, never trained apart."""
        return {peft_key(emb.HEAD, SUFFIX)}

    def budget(self, shapes, model_config, cfg: TrainableTokensConfig) -> list[BudgetRow]:
        return [BudgetRow(m, s, len(cfg.indices) * s[1]) for m, s in self._targets(shapes, model_config, cfg).items()]

    def init(self, ckpt, cfg: TrainableTokensConfig, generator: "torch.Generator") -> dict:
        """PEFT's init: the chosen rows' current values (twice on a tied base: the head's key too)."""
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        out = {}
        for module, (_rows, dim) in self._targets(shapes, ckpt.config, cfg).items():
            index = torch.tensor(cfg.indices, dtype=torch.long)
            make = lambda m=module, i=index: ckpt.get(m + ".weight")[i].to(torch.float32)  # noqa: E731
            out[peft_key(module, SUFFIX)] = LazyTensor((len(cfg.indices), dim), torch.float32, make)
            if _tied(shapes, ckpt.config, module):
                out[peft_key(emb.HEAD, SUFFIX)] = LazyTensor((len(cfg.indices), dim), torch.float32, make)
        return out

    def adapter_config(self, ckpt, cfg: TrainableTokensConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "revision": None,
            "inference_mode": False,
            # Exact module paths: PEFT suffix-matches a list, so it selects exactly these embeddings.
            "target_modules": list(self._targets(shapes, ckpt.config, cfg)),
            "token_indices": list(cfg.indices),
            "init_weights": True,
        }

    def config_from_adapter(self, d: dict) -> TrainableTokensConfig:
        what = "TRAINABLE_TOKENS"
        refuse_unknown(d, what, _KEYS)
        for key in sorted(set(ACCEPTED) & set(_OFF)):
            if d.get(key) not in (None, [], {}):
                raise BadInputError(f"{what} adapter config has {key} {d[key]!r}, which peftcli does not implement for trainable tokens",
                                    "merge this adapter with PEFT's merge_and_unload")
        ids, init = d.get("token_indices"), d.get("init_weights", True)
        if not (isinstance(ids, list) and ids and all(is_int(i) and i >= 0 for i in ids)) or not isinstance(init, bool):
            raise BadInputError(f"{what} adapter config: 'token_indices' must be a non-empty list of token ids and 'init_weights' true or false", CORRUPT)
        targets = target_fields(d, what)["targets"] if d.get("target_modules") is not None else None
        return build(TrainableTokensConfig, {"token_indices": ",".join(str(i) for i in ids), "targets": targets, "read": True}, what)

    # -- reading an adapter's tensors ---------------------------------------------------------------
    def _matched(self, tensors: dict, shapes: dict, model_config: dict | None, cfg: TrainableTokensConfig) -> dict:
        """Embedding module -> its new rows [n, dim], after refusing every problem (a tied head's
        copy must equal its embedding's rows)."""
        import torch

        targets = self._targets(shapes, model_config, cfg)
        head = next((m for m in targets if _tied(shapes, model_config, m)), None)
        problems, out, head_rows = [], {}, None
        for key, t in tensors.items():
            path = key[len(PEFT_PREFIX): -len(SUFFIX) - 1] if key.startswith(PEFT_PREFIX) and key.endswith("." + SUFFIX) else None
            module = next((m for m in targets if path is not None and (m == path or names_module(path, m))), None)
            if path is None:
                problems.append(f"unexpected key {key}")
            elif path == emb.HEAD and head is not None:
                head_rows = t
            elif module is None:
                problems.append(f"{key}: trainable-token rows for a module the adapter config does not target")
            elif tuple(t.shape) != (len(cfg.indices), targets[module][1]):
                problems.append(f"{key}: shape {list(t.shape)}, token_indices gives {len(cfg.indices)} rows of {targets[module][1]}")
            else:
                out[module] = t
        missing = sorted(set(targets) - set(out))
        if not problems and missing:
            problems.append(f"no trainable_tokens_delta for {missing[0]}, which the adapter config targets")
        if not problems and head is not None and head_rows is not None and not (head_rows.shape == out[head].shape and torch.equal(head_rows, out[head])):
            problems.append(f"{peft_key(emb.HEAD, SUFFIX)} differs from {peft_key(head, SUFFIX)}: a tied head shares its embedding's rows")
        if problems:
            raise mismatch_error(problems)
        return out

    def deltas(self, cfg: TrainableTokensConfig, tensors: dict, ckpt) -> dict:
        """Each embedding with its rows replaced (PEFT's index_copy; a tied head is that tensor)."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        return {m + ".weight": emb.fold_tokens(indices=cfg.indices, values=t)
                for m, t in self._matched(tensors, shapes, ckpt.config, cfg).items()}

    def attach(self, model, cfg: TrainableTokensConfig, tensors: dict, model_config: dict) -> Attached:
        from torch import nn

        from peftcli import modules as mod
        from peftcli.methods.lora.embedding_layers import TrainableTokens as TokensLayer

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        tied_model = any(n.endswith(emb.HEAD + ".weight") for n in shapes) and bool(getattr(model.config, "tie_word_embeddings", False))
        stored = {n: s for n, s in shapes.items() if not (tied_model and n.endswith(emb.HEAD + ".weight"))}
        phi, head_key = {}, None
        for module, rows in self._matched(tensors, stored, model_config, cfg).items():
            real = mod.resolve(model, module)
            layer = model.get_submodule(real) if real is not None else None
            if real is None or not isinstance(layer, nn.Embedding):
                raise mismatch_error([f"{module}: trainable tokens on a {type(layer).__name__}, not an embedding layer"])
            new = TokensLayer(layer, cfg.indices)
            new.load_phi(rows)
            mod.replace(model, real, new)
            phi[peft_key(module, SUFFIX)] = new.trainable_tokens_delta
            if _tied(stored, model_config, module):
                head_key = (peft_key(emb.HEAD, SUFFIX), peft_key(module, SUFFIX))
        problem = emb.tie_tokens_head(model)
        if problem:
            raise mismatch_error([problem])
        if head_key is None:
            return Attached(phi=phi)
        key, source = head_key
        return Attached(phi=phi, derived=frozenset({key}), export=lambda: {**{k: p.detach() for k, p in phi.items()}, key: phi[source].detach().clone()})
