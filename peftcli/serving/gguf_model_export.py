"""A whole Hugging Face Llama or Qwen2 checkpoint directory written as one llama.cpp model GGUF file.

What llama.cpp's ``convert_hf_to_gguf.py`` writes for a ``LlamaForCausalLM`` (read from its
``LlamaModel``/``TextModel`` classes and ``gguf-py``; the facts each step relies on are
noted where it is made), reproduced here with the ``gguf`` package's ``GGUFWriter``:

- ``general.architecture = llama``, ``general.type = model``, the ``llama.*`` hyperparameters
  from the config as transformers reads it (``AutoConfig``, so defaults such as ``head_dim``
  are written as the converter writes them), ``general.file_type`` for the outtype.
- Tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...); the rows of
  ``attn_q``/``attn_k`` (weights and biases) permuted from Hugging Face's rotate-half layout
  to llama.cpp's interleaved pairs (``LlamaModel.permute``: the inverse of what
  ``gguf_format.unpermute`` undoes on reading); ``output.weight`` left out when the
  embeddings are tied. 1-D tensors and norms stay F32; with ``q8_0`` a row that is not whole
  32-value blocks is written F16 (the converter's fallback).
- The tokenizer from the directory's ``tokenizer.json``, by the converter's own order: a
  byte-fallback BPE (Llama 2 style) as ``tokenizer.ggml.model = llama`` through gguf's
  ``LlamaHfVocab``; otherwise a byte-level BPE as ``gpt2`` with its tokens and types as the
  converter's ``get_vocab_base`` builds them and ``tokenizer.ggml.pre`` from the converter's
  check hash (only the hashes listed in ``PRE_TOKENIZERS``); merges, special token ids,
  ``add_*_token`` and the chat template through gguf's ``SpecialVocab``.

``MistralForCausalLM`` is written the same way (the converter registers it on ``LlamaModel``)
when it has no sliding window shorter than its context: llama.cpp's llama has none.

``Qwen2ForCausalLM`` is written as llama.cpp's ``qwen2`` (the converter's ``Qwen2Model``, a
plain ``TextModel``): ``qwen2.*`` keys (TextModel.set_gguf_parameters only: no ``vocab_size``,
``rope.dimension_count`` or RoPE scaling keys), the same tensor names plus the q/k/v biases
``blk.N.attn_{q,k,v}.bias``, no q/k permutation (that is ``LlamaModel``'s), and the tokenizer
by ``Qwen2Model.set_vocab``: a sentencepiece model (refused) or the byte-level BPE path, never
``LlamaHfVocab``, and without LlamaModel's ``add_space_prefix``/SmolLM extras. Its sliding
window (``use_sliding_window``) is refused: llama.cpp's qwen2 attends to the whole context.

Refused, naming the thing: another architecture, a Mistral or Qwen2 sliding window, an
activation other than SiLU, RoPE scaling other than none or (llama only) ``linear``, a sentencepiece ``tokenizer.model`` (the converter reads it with
sentencepiece), a tokenizer that is not BPE, a pre-tokenizer hash not in the table, tensors
that are missing, extra, of the wrong shape or not floating point.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from peftcli.errors import BadInputError

# convert_hf_to_gguf registers MistralForCausalLM on its LlamaModel: the same file, general.architecture llama
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
CONVERTER = "convert it with llama.cpp's convert_hf_to_gguf.py"
# general.file_type of each outtype (gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_BF16, MOSTLY_Q8_0,
# MOSTLY_Q5_1, MOSTLY_Q5_0, MOSTLY_Q4_1, MOSTLY_Q4_0). The 4- and 5-bit types are what gguf-py's numpy
# quantisers write, every matrix at that type (llama-quantize's mixtures, which keep some tensors
# at a higher precision, are llama.cpp's own and not reproduced).
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}
OUTTYPES = tuple(FILE_TYPES)
Q8_BLOCK = 32

# convert_hf_to_gguf's get_vocab_base_pre: sha256 of str(tokenizer.encode(CHECK_TEXT)) names the
# byte-level BPE pre-tokenizer llama.cpp must use. Only these entries of its table are taken;
# the converter itself refuses a hash it does not know, and so does this export.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/SmolLM2 (verified here)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    # Qwen1.5/Qwen2/Qwen2.5 (the converter's "ref: Qwen/Qwen1.5-7B"). Read from its table, not
    # recomputed here (no Qwen tokenizer on this machine): a tokenizer that encodes the check text
    # differently has another hash and is refused, so the entry can only name what it names there.
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
SKIPPED = (".rotary_emb.inv_freq",)  # buffers older checkpoints saved: the converter skips them too


@dataclass
class ModelPlan:
    """What will be written: the hyperparameters, the tensors (HF name -> GGUF name) and the vocabulary."""

    source: str
    arch: str  # general.architecture: llama or qwen2
    hparams: dict[str, Any]
    heads: int
    kv_heads: int
    tied: bool
    names: dict[str, str]  # HF tensor name -> GGUF name, in writing order
    rope: tuple[str, float] | None  # (scaling type, factor), or None
    vocab: dict[str, Any] = field(default_factory=dict)


def is_model_dir(path: str) -> bool:
    """``path`` is a model checkpoint directory (a config.json and no adapter_config.json)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.isfile(os.path.join(path, "adapter_config.json")))


def plan(source: str) -> ModelPlan:
    """Check ``source`` against everything the export maps and return what it will write; reads
    the config, the tokenizer and the checkpoint's header, no tensor values."""
    try:
        import gguf  # noqa: F401  (the writer, its vocabulary readers and quantisers)
    except ImportError:
        from peftcli.checkpoint.gguf_format import NEEDS_GGUF

        raise BadInputError(f"{source}: writing a llama.cpp model file needs the gguf package", NEEDS_GGUF) from None
    arch, hparams = _hparams(source)
    heads, kv_heads = hparams["num_attention_heads"], hparams.get("num_key_value_heads") or hparams["num_attention_heads"]
    tied = bool(hparams.get("tie_word_embeddings", False))
    p = ModelPlan(source, arch, hparams, heads, kv_heads, tied, _names(source, hparams, tied, arch), _rope(source, hparams, arch))
    p.vocab = _vocab(source, hparams["vocab_size"], arch)
    return p


def _hparams(source: str) -> tuple[str, dict[str, Any]]:
    from peftcli.checkpoint.reader import load_json

    raw = load_json(os.path.join(source, "config.json"), "config")
    archs = raw.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else archs
    if arch not in ARCHITECTURES:
        raise BadInputError(f"{source}: architecture {arch!r} is not one peftcli writes as a llama.cpp model; "
                            f"it writes {', '.join(ARCHITECTURES)}", CONVERTER)
    from transformers import AutoConfig

    try:  # the converter reads the config through transformers, defaults included
        hparams = AutoConfig.from_pretrained(source, trust_remote_code=False).to_dict()
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(f"{source}/config.json: transformers cannot read it ({exc})", "pass a directory with an intact config.json") from None
    window = hparams.get("sliding_window")
    if arch == "MistralForCausalLM" and window is not None and window < hparams.get("max_position_embeddings", 0):
        raise BadInputError(f"{source}: sliding_window {window} (below max_position_embeddings): llama.cpp's llama attends to "
                            "the whole context, so its outputs would differ past that many tokens", CONVERTER + " (it ignores sliding_window)")
    layer_types = hparams.get("layer_types") or []
    if arch == "Qwen2ForCausalLM" and (hparams.get("use_sliding_window") or any(t != "full_attention" for t in layer_types)):
        raise BadInputError(f"{source}: use_sliding_window (sliding_window {window}, layer_types {sorted(set(layer_types))}): llama.cpp's "
                            "qwen2 attends to the whole context, so its outputs would differ", CONVERTER)
    act = hparams.get("hidden_act", "silu")
    if act != "silu":
        raise BadInputError(f"{source}: hidden_act {act!r}: llama.cpp's {ARCHITECTURES[arch]} computes SiLU", CONVERTER)
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings"):
        if type(hparams.get(key)) is not int or hparams[key] <= 0:
            raise BadInputError(f"{source}/config.json: {key} is {hparams.get(key)!r}, not a positive integer", "pass an intact config.json")
    return ARCHITECTURES[arch], hparams


def _rope(source: str, hparams: dict[str, Any], arch: str) -> tuple[str, float] | None:
    """The RoPE scaling the converter writes (LlamaModel.set_gguf_parameters): none, or for llama
    linear with its factor; for qwen2 none only."""
    params = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    params = params.get("full_attention", params) if isinstance(params, dict) else {}
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    factor = params.get("factor")
    if arch == "llama" and kind == "linear" and isinstance(factor, (int, float)) and factor > 0:
        return ("linear", float(factor))
    written = "none or linear" if arch == "llama" else "none"
    raise BadInputError(f"{source}: RoPE scaling {kind!r} ({params}), which peftcli does not write for llama.cpp's {arch} (it writes {written})",
                        CONVERTER)


def _names(source: str, hparams: dict[str, Any], tied: bool, arch: str) -> dict[str, str]:
    """Every checkpoint tensor's GGUF name, checked against the model the config describes."""
    from peftcli.checkpoint.gguf_format import _GLOBAL_NAMES, llama_shapes
    from peftcli.checkpoint.reader import open_checkpoint

    heads = hparams["num_attention_heads"]
    config = {
        **{k: hparams[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_hidden_layers")},
        "num_key_value_heads": hparams.get("num_key_value_heads") or heads,
        "head_dim": hparams.get("head_dim") or hparams["hidden_size"] // heads,
        "tie_word_embeddings": tied, "attention_bias": bool(hparams.get("attention_bias")), "mlp_bias": bool(hparams.get("mlp_bias")),
    }
    expected = llama_shapes(config, arch)  # GGUF name -> shape
    with open_checkpoint(source) as ckpt:
        found = {n: t for n, t in ckpt.tensors.items() if not n.endswith(SKIPPED) and not (tied and n == "lm_head.weight")}
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    names = {}
    for hf, info in found.items():
        name = inverse.get(hf) or _layer_name(hf)
        if name not in expected:
            raise BadInputError(f"{source}: tensor {hf!r} has no place in the llama.cpp {arch} model its config describes", CONVERTER)
        if tuple(info.shape) != tuple(expected[name]) or info.dtype not in ("F32", "F16", "BF16"):
            raise BadInputError(f"{source}: tensor {hf!r} is {info.dtype} {list(info.shape)}, the config's {arch} model needs a float "
                                f"{list(expected[name])}", "pass a plain (unquantised) checkpoint that matches its config.json")
        names[hf] = name
    missing = [n for n in expected if n not in names.values()]
    if missing:
        raise BadInputError(f"{source}: the checkpoint has no tensor for llama.cpp's {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""),
                            "pass a complete model directory (the output of peftcli merge, or save_pretrained)")
    order = {n: i for i, n in enumerate(expected)}
    return dict(sorted(names.items(), key=lambda kv: order[kv[1]]))


def _layer_name(hf: str) -> str | None:
    from peftcli.checkpoint.gguf_format import _LAYER_NAMES

    parts = hf.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or parts[2] != str(int(parts[2])):
        return None
    short = {v: k for k, v in _LAYER_NAMES.items()}.get(".".join(parts[3:-1]))
    return f"blk.{parts[2]}.{short}.{parts[-1]}" if short else None


# -- the tokenizer -------------------------------------------------------------------------------


def _vocab(source: str, vocab_size: int, arch: str) -> dict[str, Any]:
    """The tokenizer.ggml.* values, by convert_hf_to_gguf's LlamaModel.set_vocab order: a
    sentencepiece tokenizer.model first (refused here), then gguf's LlamaHfVocab (a byte-fallback
    BPE), then the byte-level BPE path (_set_vocab_gpt2). Qwen2Model.set_vocab has no
    LlamaHfVocab step: sentencepiece, then _set_vocab_gpt2."""
    from pathlib import Path

    path = os.path.join(source, "tokenizer.json")
    if os.path.isfile(os.path.join(source, "tokenizer.model")):
        raise BadInputError(f"{source}: a sentencepiece tokenizer.model, which llama.cpp's converter reads with sentencepiece and "
                            "peftcli does not", CONVERTER)
    if not os.path.isfile(path):
        raise BadInputError(f"{source}: no tokenizer.json, and a llama.cpp model file holds its tokenizer",
                            "save the tokenizer into the directory (tokenizer.save_pretrained(DIR))")
    try:
        with open(path, encoding="utf-8") as f:
            kind = (json.load(f).get("model") or {}).get("type")
    except (OSError, ValueError, AttributeError) as exc:
        raise BadInputError(f"{path}: cannot read it as a tokenizer ({exc})", "save the tokenizer again (save_pretrained)") from None
    if kind != "BPE":
        raise BadInputError(f"{path}: a {kind} tokenizer: llama.cpp's {arch} reads BPE tokenizers only here (gpt2 or llama)", CONVERTER)
    import gguf

    vocab: dict[str, Any]
    hf = None
    if arch == "llama":  # Qwen2Model.set_vocab has no LlamaHfVocab step
        try:
            hf = gguf.LlamaHfVocab(Path(source))
        except (FileNotFoundError, TypeError):  # not a byte-fallback BPE: the converter's gpt2 path
            hf = None
    if hf is None:
        tokens, types, pre = _gpt2_tokens(source, vocab_size)
        special = gguf.SpecialVocab(Path(source), load_merges=True)
        vocab = {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "scores": None}
    else:
        triples = list(hf.all_tokens())
        if len(triples) != vocab_size:
            raise BadInputError(f"{source}: the tokenizer has {len(triples)} tokens and the config's vocab_size is {vocab_size}",
                                "resize the embeddings to the tokenizer (or fix config.json) before exporting")
        vocab = {"model": "llama", "pre": "default", "tokens": [t for t, _, _ in triples],
                 "scores": [s for _, s, _ in triples], "types": [int(k) for _, _, k in triples]}
        special = gguf.SpecialVocab(Path(source), n_vocab=len(triples))
    _special_extras(source, special, vocab_size, arch)
    vocab["special"] = special
    return vocab


def _gpt2_tokens(source: str, vocab_size: int) -> tuple[list[str], list[int], str]:
    """convert_hf_to_gguf's get_vocab_base: each id's token and type, and the pre-tokenizer's name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise BadInputError(f"{source}: the tokenizer has ids up to {max(vocab.values())}, the config's vocab_size is {vocab_size}",
                            "resize the embeddings to the tokenizer (or fix config.json) before exporting")
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise BadInputError(f"{source}: its byte-level BPE pre-tokenizer (llama.cpp check hash {digest[:16]}...) is not one peftcli "
                            f"names ({', '.join(sorted(PRE_TOKENIZERS.values()))})", CONVERTER + ", whose table knows more")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
            continue
        token, kind = reverse[i], 1  # NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp takes added tokens as pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = 3  # CONTROL
            else:
                token, kind = token.replace("\u2581", " "), 4  # USER_DEFINED, spaces pre-normalised
        tokens.append(token)
        types.append(kind)
    return tokens, types, PRE_TOKENIZERS[digest]


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>")) or (token.startswith("<unused") and token.endswith(">")))


def _special_extras(source: str, special: Any, vocab_size: int, arch: str) -> None:
    """What LlamaModel.set_vocab adds to gguf's SpecialVocab, and the chat template newer
    transformers save as chat_template.jinja (which gguf 0.17's SpecialVocab does not read)."""
    jinja = os.path.join(source, "chat_template.jinja")
    if special.chat_template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            special.chat_template = f.read()
    if arch == "llama" and vocab_size == 49152:  # LlamaModel.set_vocab: "granite small models" (SmolLM's vocabulary size too)
        special.add_special_token["bos"] = False


# -- writing -------------------------------------------------------------------------------------


def _add_hparams(w: Any, p: ModelPlan, outtype: str) -> None:
    """TextModel.set_gguf_parameters and (llama only) LlamaModel.set_gguf_parameters, in their
    order; Qwen2Model adds nothing a causal LM without RoPE scaling uses (its pooling type is
    for embedding models)."""
    import gguf

    h = p.hparams
    w.add_block_count(h["num_hidden_layers"])
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(p.heads)
    w.add_head_count_kv(p.kv_heads)
    if p.rope is not None:  # llama only (_rope)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(p.rope[1])
    params = h.get("rope_parameters") or {}
    theta = params.get("rope_theta") if isinstance(params, dict) and "rope_theta" in params else h.get("rope_theta")
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(h.get("rms_norm_eps", 1e-6)))
    if h.get("head_dim") is not None:
        w.add_key_length(h["head_dim"])
        w.add_value_length(h["head_dim"])
    w.add_file_type(FILE_TYPES[outtype])
    if p.arch == "llama":
        w.add_vocab_size(h["vocab_size"])
        w.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // p.heads)


def _add_vocab(w: Any, p: ModelPlan) -> None:
    v = p.vocab
    tokenizer_config = os.path.join(p.source, "tokenizer_config.json")
    if p.arch == "llama" and os.path.isfile(tokenizer_config):  # LlamaModel.set_vocab's, not Qwen2Model's
        with open(tokenizer_config, encoding="utf-8") as f:
            prefix = json.load(f).get("add_prefix_space")
        if isinstance(prefix, bool):
            w.add_add_space_prefix(prefix)
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    if v["scores"] is not None:
        w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    v["special"].add_to_gguf(w, quiet=True)


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> Any:
    """The GGML type the converter gives a tensor: F32 for 1-D ones and norms, else the
    outtype's, Q8_0 falling back to F16 for a row that is not whole blocks."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}[outtype]
    quantised = qtype not in (Q.F32, Q.F16, Q.BF16)
    return Q.F16 if quantised and shape[-1] % Q8_BLOCK else qtype  # every block type here is 32 values


def write(target: str, p: ModelPlan, outtype: str, name: str) -> dict[str, int]:
    """Write the model file at ``target`` (a temporary path), one tensor in memory at a time.
    Returns the count of tensors per GGML type written."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFType, GGUFWriter
    from gguf.constants import GGML_QUANT_VERSION
    from gguf.quants import quantize

    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.serving.gguf import permute

    w = GGUFWriter(target, p.arch)
    w.add_type(GGUFType.MODEL)
    w.add_name(name)
    _add_hparams(w, p, outtype)
    _add_vocab(w, p)
    w.add_quantization_version(GGML_QUANT_VERSION)
    types: dict[str, int] = {}
    with open_checkpoint(p.source) as ckpt:
        plan_types = {}
        for hf, gname in p.names.items():
            shape = tuple(ckpt.tensors[hf].shape)
            qtype = plan_types[hf] = tensor_type(gname, shape, outtype)
            block, nbytes = GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(gname, shape, np.dtype(np.float32), int(np.prod(shape)) // block * nbytes, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf, gname in p.names.items():
            value = ckpt.get(hf).float().numpy()
            kind = gname.split(".")[2] if gname.startswith("blk.") else ""
            if p.arch == "llama" and kind in ("attn_q", "attn_k"):  # LlamaModel.permute, weights and biases alike (not Qwen2Model)
                value = permute(value, p.heads if kind == "attn_q" else p.kv_heads)
            w.write_tensor_data(np.ascontiguousarray(quantize(np.ascontiguousarray(value, np.float32), plan_types[hf])))
    w.close()
    with open(target, "rb") as f:
        os.fsync(f.fileno())
    return dict(sorted(types.items()))
