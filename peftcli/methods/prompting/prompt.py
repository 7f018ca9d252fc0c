"""Prompt tuning (Lester et al., 2021): n learned vectors prepended to the input embeddings.

φ is one tensor, ``prompt_embeddings`` [n, hidden] — PEFT's key and shape — so n·hidden
parameters. At attach the forward's keyword arguments are rewritten as PEFT's forward does:
the input ids become embeddings with the prompt in front, the attention mask gets n ones,
causal-LM labels get n × −100, token type ids n zeros. The base model is untouched.

Initialisation: ``text`` takes the embedding rows of the tokenised text, with whatever
special tokens the tokenizer adds, repeated or truncated to n (PEFT's TEXT); ``vocab`` the
rows of n token ids drawn uniformly from the embedding's rows (PEFT's SAMPLE_VOCAB; the paper
draws from the 5,000 most common tokens); ``random`` N(0, 1) like ``nn.Embedding`` (PEFT's
default). Ours defaults to ``text`` when a text is given and to ``vocab`` otherwise: in the
paper's ablation (§3.2, Fig. 3b) random initialisation trails sampled-vocabulary and
class-label initialisation at every model size but the largest, since those start where the
model's real token embeddings are. Both read only the rows they take from the checkpoint
(``embedding_rows``), not the whole embedding matrix (262 MB on Llama-7B for 20 rows).

There is no ``--layers``: the soft tokens enter once, at the input embeddings, and pass
through every layer. ``--layers`` is accepted only to say so (a usage error pointing to
``peftcli inject prefix --layers``, whose learned keys and values sit in the chosen layers).
Encoder-decoder models are refused (see ``dims.task_type``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, MethodBase, BudgetRow, mismatch_error, TrainDefaults
from peftcli.methods.prompting import dims as pl
from peftcli.options import option

if TYPE_CHECKING:
    import torch

KEY = "prompt_embeddings"  # PEFT's key in adapter_model.safetensors
INITS = ("random", "vocab", "text")
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
MODULE = "peftcli_prompt"  # where the prompt lives inside the model


@dataclass
class PromptTuningConfig:
    virtual_tokens: int = pl.virtual_tokens_option()
    init: str | None = option(
        None,
        metavar="random|vocab|text",
        help="start the prompt from N(0,1), from sampled vocabulary rows, or from --init-text's token rows; "
        "default text with --init-text, else vocab (PEFT defaults to random)",
    )
    init_text: str | None = option(
        None, metavar="TEXT", help="text whose token embeddings start the prompt, repeated or cut to --virtual-tokens"
    )
    layers: str | None = option(
        None,
        metavar="RANGES",
        help="not for prompt tuning, whose tokens enter at the input only (an error saying so); "
        "use inject prefix --layers for prompts in some layers",
    )

    def __post_init__(self) -> None:
        if self.layers is not None:
            raise UsageError(
                "`layers` does not apply to prompt tuning: its soft tokens enter at the input embeddings, before every layer",
                f"for learned prompts in some layers only, use prefix tuning: peftcli inject prefix `layers` {self.layers} ...",
            )
        if self.virtual_tokens <= 0:
            raise UsageError(f"`virtual_tokens` must be positive, got {self.virtual_tokens}", "e.g. `virtual_tokens` 20")
        if self.init is None:
            self.init = "text" if self.init_text is not None else "vocab"
        if self.init not in INITS:
            raise UsageError(f"`init` must be one of {', '.join(INITS)}, got {self.init!r}", "e.g. `init` vocab")
        if self.init == "text" and not self.init_text:
            raise UsageError("`init` text needs `init_text`", 'e.g. `init_text` "Classify the sentiment:"')
        if self.init != "text" and self.init_text is not None:
            raise UsageError(
                f"`init_text` only applies with `init` text, not `init` {self.init}",
                "drop `init_text`, or pass `init` text",
            )


class PromptTuning(MethodBase):
    name = "prompt"
    train_defaults = TrainDefaults(lr=3e-2, generative_lr=1e-2)  # benchmarks/README.md: "Training defaults"
    identity_at_init = False  # its virtual tokens change the outputs from the start
    config_cls = PromptTuningConfig
    summary = "Soft prompt tokens prepended to the input embeddings (prompt tuning)."
    peft_type = "PROMPT_TUNING"
    examples = (
        "peftcli inject prompt --virtual-tokens 20 model/ -o runs/prompt/",
        'peftcli inject prompt --virtual-tokens 20 --init text --init-text "Classify the sentiment:" model/ -o runs/prompt/',
    )

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: PromptTuningConfig) -> list[BudgetRow]:
        pl.task_type(model_config)  # rejects what we cannot attach to, before any work
        pl.check_virtual_tokens(cfg.virtual_tokens, model_config)
        module, (_, dim) = pl.input_embedding(shapes, model_config)
        return [BudgetRow(module, (cfg.virtual_tokens, dim), cfg.virtual_tokens * dim)]

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: PromptTuningConfig, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        self.budget(shapes, ckpt.config, cfg)
        module, (vocab, dim) = pl.input_embedding(shapes, ckpt.config)
        n = cfg.virtual_tokens
        if cfg.init == "random":
            return {KEY: torch.randn(n, dim, generator=generator)}
        if cfg.init == "vocab":
            ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        else:
            ids = text_token_ids(ckpt, cfg.init_text, n, vocab)
        return {KEY: embedding_rows(ckpt, module + ".weight", ids)}

    def adapter_config(self, ckpt, cfg: PromptTuningConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        _, (_, dim) = pl.input_embedding(shapes, ckpt.config)
        dims = pl.model_dims(ckpt.config)
        text = cfg.init == "text"
        return {
            "peft_type": self.peft_type,
            **pl.prompt_learning_fields(
                ckpt.path, pl.task_type(ckpt.config), cfg.virtual_tokens, dim, dims.heads, dims.num_layers
            ),
            "prompt_tuning_init": _PEFT_INIT[cfg.init],
            "prompt_tuning_init_text": cfg.init_text if text else None,
            # PEFT re-tokenises the text when it builds the prompt for training, so it needs the tokenizer.
            "tokenizer_name_or_path": os.path.abspath(ckpt.directory) if text else None,
            "tokenizer_kwargs": None,
        }

    def config_from_adapter(self, d: dict) -> PromptTuningConfig:
        pl.check_adapter_fields(d, "prompt tuning")
        init = {v: k for k, v in _PEFT_INIT.items()}.get(str(d.get("prompt_tuning_init") or "RANDOM"))
        if init is None:
            raise BadInputError(
                f"prompt tuning adapter config has unknown prompt_tuning_init {d['prompt_tuning_init']!r}",
                "use one of " + ", ".join(_PEFT_INIT.values()),
            )
        text = d.get("prompt_tuning_init_text")
        if init == "text" and not text:
            raise BadInputError(
                "prompt tuning adapter config has prompt_tuning_init TEXT but no prompt_tuning_init_text",
                "set prompt_tuning_init_text, or prompt_tuning_init to RANDOM",
            )
        return PromptTuningConfig(
            virtual_tokens=int(d["num_virtual_tokens"]),
            init=init,
            init_text=text if init == "text" else None,
        )

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: PromptTuningConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli.methods.prompting import virtual_tokens as pe

        problems = [f"unexpected key {k}" for k in tensors if k != KEY]
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = tensors.get(KEY)
        if embed is None:
            problems.append("the model has no input embedding to prepend the prompt to")
        if weight is None:
            problems.append(f"no {KEY} tensor")
        elif embed is not None and tuple(weight.shape) != (cfg.virtual_tokens, embed.weight.shape[1]):
            problems.append(
                f"{KEY} is {list(weight.shape)} but the config has {cfg.virtual_tokens} virtual tokens "
                f"and the model embeds into {embed.weight.shape[1]} dimensions"
            )
        if problems:
            raise mismatch_error(problems)
        prompt = pe.PromptEmbedding(weight)
        pe.register(model, MODULE, prompt)
        # Labels get −100 for the prompt when they are per-token targets: decided by the model
        # attached to (PEFT: by task_type), so the adapter also serves a classification head.
        transform = _transform(prompt, embed, cfg.virtual_tokens, pl.is_causal_lm(type(model).__name__))
        return Attached(phi={KEY: prompt.prompt_embeddings}, input_transform=transform)


def text_token_ids(ckpt, text: str, n: int, vocab: int) -> list[int]:
    """PEFT's TEXT init: the text's token ids, repeated until there are n, then cut to n."""
    ids = _tokenizer(ckpt)(text)["input_ids"]
    if not ids:
        raise UsageError(f"`init_text` {text!r} tokenizes to nothing", "give a text with at least one token")
    if max(ids) >= vocab:
        raise BadInputError(
            f"the tokenizer gives id {max(ids)}, beyond the {vocab} rows of the input embedding",
            "is the tokenizer beside config.json this model's? Otherwise use `init` vocab",
        )
    return (ids * math.ceil(n / len(ids)))[:n]


def embedding_rows(ckpt, name: str, ids: list[int]) -> "torch.Tensor":
    """Rows ``ids`` of the [vocab, dim] tensor ``name`` as fp32, reading only those rows' bytes.

    A row of a safetensors tensor is one contiguous byte range, so each run of consecutive ids
    is one ``read_range``: 20 sampled rows of a 32000 × 4096 bf16 embedding read 160 kB, not
    262 MB. Pickles (already in memory) and sub-byte dtypes take the whole tensor.
    """
    import torch

    from peftcli.checkpoint.dtypes import torch_dtype
    from peftcli.checkpoint.safetensors_format import DTYPES

    info = ckpt.tensors[name]
    dim = info.shape[1]
    bits = DTYPES.get(info.dtype, (0,))[0]
    if info.begin is None or not bits or (bits * dim) % 8:
        return ckpt.get(name)[torch.tensor(ids, dtype=torch.long)].to(torch.float32)
    try:
        dtype = torch_dtype(info.dtype)
    except BadInputError:  # get() says which tensor and dtype
        return ckpt.get(name)[torch.tensor(ids, dtype=torch.long)].to(torch.float32)
    row_bytes = bits * dim // 8
    wanted = sorted(set(ids))
    rows: dict[int, torch.Tensor] = {}
    start = 0
    while start < len(wanted):
        end = start
        while end + 1 < len(wanted) and wanted[end + 1] == wanted[end] + 1:
            end += 1
        first, count = wanted[start], end - start + 1
        block = ckpt.read_range(name, first * row_bytes, (first + count) * row_bytes).view(dtype).view(count, dim)
        rows.update((first + i, block[i]) for i in range(count))
        start = end + 1
    return torch.stack([rows[i] for i in ids]).to(torch.float32)


def _tokenizer(ckpt):
    hint = "put the tokenizer files beside config.json, or use `init` vocab"
    directory = ckpt.directory
    if directory is None or not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        raise UsageError(f"`init` text needs the model's tokenizer, and {ckpt.path} has none", hint)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise UsageError(f"cannot load the tokenizer in {directory}: {str(exc).splitlines()[0]}", hint) from None


def _transform(prompt, embed, n: int, causal_lm: bool):
    """The forward's keyword arguments with the prompt in front (PEFT's prompt-tuning forward)."""
    import torch

    from peftcli.methods.prompting import virtual_tokens as pe

    def transform(kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        batch = pe.batch_size(kwargs, "prompt tuning")
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = embed(ids)
        prompts = prompt.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        pe.extend_attention_mask(kwargs, n)
        pe.prepend_positions(kwargs, n)
        pe.prepend(kwargs, "token_type_ids", n, 0)  # the prompt is in the first segment
        if causal_lm:
            pe.prepend(kwargs, "labels", n, -100)  # no loss on the virtual tokens
        return kwargs

    return transform
