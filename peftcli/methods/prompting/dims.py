"""What prompt and prefix tuning share at tensor level: the model's dimensions, task type and
input embedding, read from ``config.json`` and tensor shapes alone (no torch, no model).

PEFT calls both methods "prompt learning" and describes them with the same fields
(``num_virtual_tokens``, ``token_dim``, ``num_attention_heads``, ``num_layers``,
``num_transformer_submodules``); ``model_dims`` resolves them as PEFT's
``_prepare_prompt_learning_config`` does, so the adapter configs we write are the ones PEFT
would write for the same base.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from peftcli.errors import BadInputError, UsageError
from peftcli.options import option

CAUSAL_LM = "CAUSAL_LM"
FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
# The PEFT task types whose forward we reproduce: a causal LM (labels get −100 for the virtual
# tokens), the generic one (everything passed through), which suits any encoder, and sequence
# classification (per-sequence labels, untouched), which training with a head writes.
TASK_TYPES = (CAUSAL_LM, FEATURE_EXTRACTION, "SEQ_CLS")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_EMBEDDING_NAME = re.compile(r"(embed|wte|word|shared)", re.IGNORECASE)
_OUTPUT_HEADS = {"lm_head", "score", "classifier", "decoder", "output"}


@dataclass(frozen=True)
class Dims:
    num_layers: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (GQA); == heads without GQA
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values): PEFT's ``token_dim`` for prefix tuning."""
        return self.kv_heads * self.head_dim


def _first(config: dict, keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise UsageError(f"config.json gives no {what} (looked for {', '.join(keys)})", "is this a transformer checkpoint?")


def model_dims(config: dict | None) -> Dims:
    """Layers, widths and heads, looked up under the same keys and in the same order as PEFT."""
    config = dict(config or {})
    if isinstance(config.get("text_config"), dict):  # a VLM: the language model's part, as PEFT
        config = config["text_config"]
    if config.get("global_head_dim") is not None or config.get("per_layer_config") is not None:
        raise UsageError("layers of this model have different key/value shapes", "prompt learning here needs uniform attention")
    num_layers = _first(config, ("num_hidden_layers", "num_layers", "n_layer"), "number of layers")
    hidden = _first(config, ("hidden_size", "n_embd", "d_model"), "hidden size")
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "number of attention heads")
    kv_heads = int(config["num_key_value_heads"]) if config.get("num_key_value_heads") is not None else heads
    head_dim = int(config["head_dim"]) if config.get("head_dim") is not None else hidden // heads
    return Dims(num_layers, heads, kv_heads, head_dim)


def is_causal_lm(class_name: str) -> bool:
    """Whether the labels of this transformers class are per-token next-token targets."""
    return class_name.endswith(_CAUSAL_SUFFIXES)


def task_type(config: dict | None) -> str:
    """PEFT's task type for this base: CAUSAL_LM for causal LMs, FEATURE_EXTRACTION otherwise.

    Encoder-decoder models (``is_encoder_decoder``: T5, BART, ...) are refused here, for prompt
    and prefix tuning alike, before any work: PEFT gives them virtual tokens on both sides
    (``num_transformer_submodules`` = 2), which peftcli's forwards do not reproduce.
    """
    config = config or {}
    if config.get("is_encoder_decoder"):
        raise UsageError(
            "prompt learning on encoder-decoder models is not supported yet (it needs virtual tokens for both the encoder and the decoder)",
            "use lora, ia3 or adapter on this model",
        )
    return CAUSAL_LM if is_causal_lm(next(iter(config.get("architectures") or []), "")) else FEATURE_EXTRACTION


def virtual_tokens_option() -> int:
    """The ``--virtual-tokens`` field of both methods' configs: one flag, one default, one help."""
    return option(
        20,
        metavar="N",
        help="virtual tokens: soft-prompt vectors (prompt) or key/value positions per layer (prefix); default 20",
    )


def check_virtual_tokens(n: int, config: dict | None) -> None:
    """The virtual tokens take positions: they must leave room for the input."""
    config = config or {}
    limit = config.get("n_positions") or config.get("max_position_embeddings")
    if limit is not None and n >= int(limit):
        raise UsageError(
            f"`virtual_tokens` {n} leaves no position for the input: the model has {limit} positions",
            "use fewer virtual tokens",
        )


def input_embedding(shapes: dict[str, tuple[int, ...]], config: dict | None) -> tuple[str, tuple[int, int]]:
    """The input embedding's module path and its [vocab, dim] shape, from tensor names and shapes."""
    vocab = (config or {}).get("vocab_size")
    candidates = []
    for name, shape in shapes.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or len(shape) != 2 or module.rsplit(".", 1)[-1] in _OUTPUT_HEADS:
            continue
        if (vocab is None or shape[0] == vocab) and _EMBEDDING_NAME.search(module.rsplit(".", 1)[-1]):
            candidates.append((module, (int(shape[0]), int(shape[1]))))
    if not candidates:
        raise BadInputError(
            "cannot find the input embedding (a [vocab, hidden] embedding weight) in this checkpoint",
            "`peftcli inspect MODEL --tensors` lists its tensors; is vocab_size in config.json right?",
        )
    # Position embeddings (wpe, position_embeddings) have as many rows as positions, not words.
    words = [c for c in candidates if "pos" not in c[0].rsplit(".", 1)[-1]]
    return (words or candidates)[0]


def prompt_learning_fields(ckpt_path: str, task: str, n: int, token_dim: int, heads: int, num_layers: int) -> dict:
    """The fields every PEFT prompt-learning config has, as PEFT writes them."""
    return {
        "task_type": task,
        "base_model_name_or_path": os.path.abspath(ckpt_path),
        "revision": None,
        "auto_mapping": None,
        "inference_mode": False,
        "num_virtual_tokens": n,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": num_layers,
        "modules_to_save": None,
    }


def check_adapter_fields(d: dict, method: str) -> None:
    """Reject what an adapter config may say that we cannot reproduce."""
    if d.get("num_virtual_tokens") is None:
        raise BadInputError(f"{method} adapter config has no num_virtual_tokens", "PEFT writes it: set it to the prompt's length")
    if d.get("num_transformer_submodules") not in (None, 1):
        raise BadInputError(
            f"{method} adapter config has num_transformer_submodules={d['num_transformer_submodules']}",
            "encoder-decoder prompt learning is not supported yet",
        )
    if d.get("task_type") not in TASK_TYPES:
        raise BadInputError(
            f"{method} adapter config has task_type={d.get('task_type')!r}, which peftcli does not reproduce",
            "supported: " + ", ".join(TASK_TYPES),
        )
