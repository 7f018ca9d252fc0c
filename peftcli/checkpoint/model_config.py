"""The fields of a model's ``config.json`` peftcli reads, checked for the JSON types transformers writes.

Only what peftcli reads is checked (sizes, head counts, layer counts, the model type and
architectures, a few flags and token ids); everything else in the file is transformers'
business. Every field may be absent or null: each reader has its own fallback then. A field
of the wrong type (a list for ``model_type``, a string for ``num_attention_heads``, a zero
head count that would be divided by) is one error naming the file and the field, instead of a
crash in whichever method reads it first.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, TypeGuard

from peftcli.errors import BadInputError

MAX_SIZE = 2**31 - 1  # widths, counts and vocabularies: anything larger cannot be allocated
MAX_POSITIONS = 2**63 - 1  # some configs use "unbounded" context lengths


def _int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _between(low: int, high: int) -> Callable[[object], bool]:
    return lambda v: _int(v) and low <= v <= high


def _token_ids(v: object) -> bool:
    return _int(v) or (isinstance(v, list) and all(_int(x) for x in v))


_POSITIVE = (_between(1, MAX_SIZE), f"a positive integer up to {MAX_SIZE}")
_COUNT = (_between(0, MAX_SIZE), f"an integer from 0 to {MAX_SIZE}")
_POSITIONS = (_between(0, MAX_POSITIONS), "a non-negative integer")
_STRING = (lambda v: isinstance(v, str), "a string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_TOKENS = (_token_ids, "a token id or a list of token ids")

FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "model_type": _STRING,
    "architectures": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of class names"),
    "dtype": _STRING,
    "torch_dtype": _STRING,
    "tie_word_embeddings": _BOOL,
    "is_encoder_decoder": _BOOL,
    "eos_token_id": _TOKENS,
    "bos_token_id": _TOKENS,
    "pad_token_id": _TOKENS,
    # Divided by or used as a tensor dimension: must be at least 1.
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim"), _POSITIVE),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), _POSITIVE),
    **dict.fromkeys(("num_key_value_heads", "n_head_kv", "num_kv_heads", "head_dim"), _POSITIVE),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers"), _COUNT),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "d_ff", "vocab_size"), _COUNT),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), _POSITIONS),
}

CORRUPT = "config.json is corrupt or was edited by hand"


def is_json_number(v: object) -> bool:
    """A finite JSON number that fits a float (a 400-digit integer does not; JSON's true is no number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_prequantized(config: dict[str, Any], where: str) -> None:
    """A ``quantization_config`` means the stored weights are not what their names say: packed
    4-bit bytes (bitsandbytes, GPTQ, AWQ), int8 with separate scales, fp8 with block scales.
    Read as plain tensors they would be folded, diffed and counted as if they were the weights,
    silently wrong; peftcli reads full-precision checkpoints and quantises them itself."""
    quantized = config.get("quantization_config")
    if quantized is None:
        return
    method = quantized.get("quant_method") if isinstance(quantized, dict) else None
    if method == "gguf":  # transformers dequantises a GGUF on load: what it saves is plain tensors
        return
    what = f"quant_method {method!r}" if isinstance(method, str) else "a quantization_config"
    nf4 = "; `peftcli merge NF4_DIR RUN -o OUT_DIR` merges into a bitsandbytes NF4 model" if method == "bitsandbytes" else ""
    raise BadInputError(
        f"{where}: a pre-quantized checkpoint ({what}): its stored weights are quantized codes, not weights peftcli can read",
        f"use the full-precision model it was quantized from; `peftcli train --quantize nf4|int8` quantizes a base itself{nf4}",
    )


def check_model_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``config`` unchanged, once every field peftcli reads has a type transformers could have written
    and it describes full-precision weights (no ``quantization_config``)."""
    _refuse_prequantized(config, where)
    for scope, fields in (("", config), ("text_config.", config.get("text_config"))):
        if scope and fields is None:
            continue
        if not isinstance(fields, dict):
            raise BadInputError(f"{where}: 'text_config' must be a JSON object or null, not {_shown(fields)}", CORRUPT)
        for key, (ok, expected) in FIELDS.items():
            value = fields.get(key)
            if value is not None and not ok(value):
                raise BadInputError(f"{where}: '{scope}{key}' must be {expected}, not {_shown(value)}", CORRUPT)
    return config
