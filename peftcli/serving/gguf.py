"""llama.cpp's rules for a LoRA adapter, as data, and the GGUF adapter file it loads.

What llama.cpp does with a LoRA (read from ``convert_lora_to_gguf.py``, ``gguf-py`` and
``llama-adapter.cpp``; the facts each rule relies on are noted where it is declared):

- The converter keeps only ``lora_A.weight``/``lora_B.weight`` (and an embedding's
  ``lora_embedding_A/B``); any other tensor (a saved ``embed_tokens``/``lm_head``, DoRA's
  ``lora_magnitude_vector``, a ``lora_B.bias``) stops it. It stores one float
  ``adapter.lora.alpha`` (``lora_alpha``) and ignores ``use_rslora``, ``rank_pattern`` and
  ``alpha_pattern``. llama.cpp scales each module by ``alpha / rank``, the rank read from
  that module's ``lora_b`` (``ne[0]``): the export folds every other scale into ``lora_B``.
- Names are the base's GGUF names plus ``.lora_a``/``.lora_b`` (``blk.N.attn_q.weight.lora_a``);
  ``lora_a`` is A as PEFT stores it ([r, in] in numpy order, ggml ``ne = [in, r]``) and
  ``lora_b`` is B ([out, r]). For llama's ``attn_q``/``attn_k`` the base converter permutes
  the rows (``LlamaModel.permute``); on a LoRA that permutation moves B's rows only.
- ``general.type = adapter``, ``adapter.type = lora``, and ``general.architecture`` must equal
  the base model's (llama.cpp refuses a mismatch). The architecture's config comes from the
  base directory's ``config.json`` (``--base``), never downloaded.

The Llama family is mapped (``LlamaForCausalLM``/``MistralForCausalLM``, which the converter
writes as ``llama``), ``Qwen2ForCausalLM`` (``qwen2``) and ``Gemma``/``Gemma2``/``Gemma3ForCausalLM``
(``gemma``, ``gemma2``, ``gemma3``): the same projection names (gguf-py's TensorNameMap for each),
and only ``LlamaModel`` permutes q/k, so only a llama ``lora_B`` is permuted; a LoRA on a
gemma/gemma2 ``lm_head`` is refused (those have no ``output`` tensor in llama.cpp);
GQA and tied embeddings included (a LoRA on a tied ``lm_head`` is refused, as the converter
refuses it). Embedding LoRA is refused here (merge).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from peftcli.errors import BadInputError
from peftcli.serving.vllm import (
    LORA_A, LORA_B, MAGNITUDE, LORA_BIAS, UNSERVED, VOCABULARY, Finding, LoraView, convert_way, merge_way,
)

# convert_hf_to_gguf's LlamaModel (llama, q/k permuted), Qwen2Model and GemmaModel/Gemma2Model/
# Gemma3Model (not permuted: their modify_tensors only shift the norms by 1, which no LoRA touches)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
# gguf-py's gemma and gemma2 tensor lists have no `output` (the converter skips lm_head.weight:
# llama.cpp reads the tied token_embd), so a LoRA on lm_head has no name there, tied or not
NO_OUTPUT = ("gemma", "gemma2")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # convert_lora_to_gguf --outtype (its "auto" is a guess: not offered)
Q8_BLOCK = 32  # a Q8_0 row is blocks of 32: the converter falls back to F16 for a row of another length


@dataclass
class Arch:
    """The base's llama.cpp architecture and what the names and the q/k permutation need."""

    name: str  # general.architecture
    heads: int
    kv_heads: int
    layers: int
    tied: bool


def base_arch(run: str, config: dict, base: str | None) -> tuple[str, Arch]:
    """The base directory (``base`` or the adapter's ``base_model_name_or_path``) and its Arch."""
    named = base or config.get("base_model_name_or_path")
    base = named if isinstance(named, str) and named else ""
    path = os.path.join(base, "config.json")
    if not base or not os.path.isfile(path):
        raise BadInputError(
            f"{run}: the base model's config.json is needed and {named!r} is no local directory holding one",
            "pass `base` DIR, the base model's directory (nothing is downloaded)",
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read it as JSON ({exc})", "pass `base` DIR with an intact config.json") from None
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise BadInputError(
            f"{path}: architecture {arch!r} is not one peftcli maps to llama.cpp names ({', '.join(ARCHITECTURES)})",
            f"merge the adapter (peftcli merge {base} {run} -o DIR) and convert the merged model with llama.cpp",
        )
    heads = hf.get("num_attention_heads")
    kv = hf.get("num_key_value_heads", heads)
    layers = hf.get("num_hidden_layers")
    if not all(type(v) is int and v > 0 for v in (heads, kv, layers)):
        raise BadInputError(f"{path}: num_attention_heads/num_key_value_heads/num_hidden_layers are not positive integers",
                            "pass `base` DIR with an intact config.json")
    return base, Arch(ARCHITECTURES[arch], heads, kv, layers, bool(hf.get("tie_word_embeddings", False)))


def gguf_name(path: str, arch: Arch) -> str | None:
    """llama.cpp's name of the weight of HF module ``path`` (``model.layers.3.self_attn.q_proj``), or None."""
    from peftcli.checkpoint.gguf_format import _GLOBAL_NAMES, _LAYER_NAMES

    hf = path[len("model.") :] if path.startswith("model.model.") else path  # PeftModelForCausalLM keeps "model."
    for g, h in _GLOBAL_NAMES.items():
        if hf + ".weight" == h:
            return None if g == "output.weight" and (arch.tied or arch.name in NO_OUTPUT) else g
    parts = hf.split(".")
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) < arch.layers:
        inverse = {v: k for k, v in _LAYER_NAMES.items()}
        short = inverse.get(".".join(parts[3:]))
        if short is not None and parts[2] == str(int(parts[2])):
            return f"blk.{int(parts[2])}.{short}.weight"
    return None


def permute(w, heads: int):
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``w``: each head's rows from Hugging
    Face's rotate-half layout (2, d/2) to llama.cpp's interleaved pairs (d/2, 2). The inverse
    of ``gguf_format.unpermute``."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A llama.cpp rule: ``check`` returns the findings (each a repair or a refusal) of an adapter."""

    name: str
    states: str  # the rule in words (for the docs table)
    check: Callable[[LoraView, Arch], list[Finding]]
    repairs: str | None  # what the export does, or None: refused with the finding's way out


def _dora(view: LoraView, arch: Arch) -> list[Finding]:
    # convert_lora_to_gguf: lora_magnitude_vector is "Not a lora_A or lora_B tensor": it stops.
    if not view.config.get("use_dora") and not any(MAGNITUDE in p for p in view.modules.values()):
        return []
    return [Finding("dora", f"{view.run} is a DoRA adapter (use_dora), which llama.cpp does not load",
                    way_out=f"{merge_way(view.run)}, {convert_way(view.run)}")]


def _init(view: LoraView, arch: Arch) -> list[Finding]:
    # PEFT subtracts PiSSA's/OLoRA's initial B·A from the base on load; llama.cpp does not.
    if not view.base_init:
        return []
    return [Finding("init", f"init_lora_weights={view.config.get('init_lora_weights')!r}: PEFT changes the base "
                    f"weights when it loads a {view.base_init} adapter, llama.cpp does not", way_out=merge_way(view.run))]


def _bias(view: LoraView, arch: Arch) -> list[Finding]:
    # convert_lora_to_gguf: a lora_B.bias is not a lora_A/lora_B weight: it stops.
    if not view.lora_bias and not any(LORA_BIAS in p for p in view.modules.values()):
        return []
    return [Finding("lora-bias", f"{view.run} has lora_bias (a bias on lora_B), which llama.cpp does not load",
                    way_out=merge_way(view.run))]


def _unserved(view: LoraView, arch: Arch) -> list[Finding]:
    used = [k for k in UNSERVED if view.config.get(k)]
    if not used:
        return []
    return [Finding("peft-features", f"{used[0]} ({UNSERVED[used[0]]}) is set, which this export does not write for llama.cpp",
                    way_out=f"use {view.run} with PEFT, or retrain it without {used[0]}")]


def _vocabulary(view: LoraView, arch: Arch) -> list[Finding]:
    # convert_lora_to_gguf stops on a saved embed_tokens/lm_head ("Embeddings is present in the
    # adapter") and on any modules_to_save tensor; embedding LoRA is not written by this export.
    found = [f"{path} ({s})" for path, parts in view.modules.items() for s in VOCABULARY if s in parts]
    found += [f"{name} (modules_to_save)" for name in view.heads]
    if not found:
        return []
    return [Finding("saved-modules", f"{found[0]}: llama.cpp adapters hold LoRA pairs only, no saved modules or embedding deltas"
                    + (f" (+{len(found) - 1} more)" if len(found) > 1 else ""), way_out=merge_way(view.run))]


def _names(view: LoraView, arch: Arch) -> list[Finding]:
    # A LoRA pair whose module has no llama.cpp name (or a tied lm_head: "lm_head is present in
    # adapter, but is ignored in base model") cannot be written under the base's names.
    unknown = [p for p in view.ranks if gguf_name(p, arch) is None]
    unknown = view.stray + unknown
    if not unknown:
        return []
    tied = " (the base ties lm_head to the embedding)" if any(p.endswith("lm_head") for p in unknown) and arch.tied else ""
    return [Finding("tensor-names", f"{unknown[0]!r} has no llama.cpp {arch.name} tensor name{tied}"
                    + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""), way_out=merge_way(view.run))]


def _scaling(view: LoraView, arch: Arch) -> list[Finding]:
    # convert_lora_to_gguf stores lora_alpha only; llama.cpp applies alpha / (the module's rank).
    used = [k for k in ("use_rslora", "rank_pattern", "alpha_pattern") if view.config.get(k)]
    if not used:
        return []
    return [Finding("scaling", f"{', '.join(used)}: llama.cpp applies one alpha over each module's rank",
                    repair="folded into one adapter.lora.alpha and, per module, into lora_B")]


RULES: tuple[Rule, ...] = (
    Rule("dora", "no DoRA (use_dora, lora_magnitude_vector)", _dora, None),
    Rule("init", "no init that changes the base on load (PiSSA, OLoRA)", _init, None),
    Rule("peft-features", "none of alora_invocation_tokens, layer_replication, use_bdlora, use_qalora", _unserved, None),
    Rule("lora-bias", "no bias on lora_B (lora_bias)", _bias, None),
    Rule("saved-modules", "no modules_to_save, embedding LoRA, trainable tokens or saved embedding/lm_head", _vocabulary, None),
    Rule("tensor-names", "every tensor a lora_A/lora_B of a module with a llama.cpp name (not a tied lm_head)", _names, None),
    Rule("scaling", "one alpha, scale alpha/rank: no use_rslora, rank_pattern, alpha_pattern", _scaling,
         "rsLoRA and the patterns folded into adapter.lora.alpha and, per module, into lora_B: exact"),
)


def lint(view: LoraView, arch: Arch) -> list[Finding]:
    """Every rule's findings, in rule order."""
    return [f for rule in RULES for f in rule.check(view, arch)]


# -- writing -------------------------------------------------------------------------------------


def tensors(view: LoraView, arch: Arch) -> tuple[float, dict]:
    """The one alpha and the GGUF tensors (name -> fp64 numpy array, numpy order): per module
    A as it is, B times s_m·r_m/alpha (llama.cpp's scale is alpha/r_m), q/k rows of B permuted (llama only)."""
    import torch

    alpha = view.default_scale * int(view.config["r"])
    if not alpha > 0:
        raise BadInputError(f"{view.run}: lora_alpha is {view.config.get('lora_alpha')!r}: llama.cpp reads alpha 0 as no scaling",
                            "the adapter computes ΔW = 0: there is nothing to export")
    out = {}
    for path in sorted(view.ranks, key=lambda p: gguf_name(p, arch) or ""):
        name = gguf_name(path, arch)
        a, b = view.modules[path][LORA_A].double(), view.modules[path][LORA_B].double()
        b = b * (view.scales[path] * view.ranks[path] / alpha)
        kind = name.split(".")[2] if name and name.startswith("blk.") else ""
        if arch.name == "llama" and kind in ("attn_q", "attn_k"):  # LlamaModel.permute; Qwen2Model keeps HF's rows
            b = permute(b, arch.heads if kind == "attn_q" else arch.kv_heads)
        if not bool(torch.isfinite(b).all()):
            raise BadInputError(f"{view.run}: {path}: lora_B times its scale is not finite",
                                "the adapter's rank_pattern/alpha_pattern are absurd for these weights")
        out[f"{name}.lora_a"] = a.numpy()
        out[f"{name}.lora_b"] = b.contiguous().numpy()
    return (int(alpha) if float(alpha).is_integer() else alpha), out


def write(target: str, arch: Arch, alpha: float, arrays: dict, outtype: str, name: str) -> dict[str, int]:
    """Write the adapter file at ``target`` (a temporary path): llama.cpp's keys, each tensor in
    ``outtype`` (Q8_0 only for rows of whole blocks, else F16, as the converter does). Returns
    the count of tensors per GGML type written."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFType, GGUFWriter, Keys
    from gguf.constants import GGML_QUANT_VERSION
    from gguf.quants import quantize

    writer = GGUFWriter(target, arch.name)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    types: dict[str, int] = {}
    for key, value in arrays.items():
        qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
        if qtype == Q.Q8_0 and value.shape[-1] % Q8_BLOCK:
            qtype = Q.F16
        data = value.astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(key, data)
        elif qtype == Q.F16:
            writer.add_tensor(key, data.astype(np.float16))
        else:
            writer.add_tensor(key, quantize(data, qtype), raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(sorted(types.items()))
