"""Reading a llama.cpp GGUF file as a Hugging Face checkpoint: header, names, config, dequantisation.

The header (metadata and tensor table) is parsed here by hand, validated like a safetensors
header, and reads only the header's bytes: ``inspect model.gguf`` needs no other package.
Tensor values are read one tensor at a time; F32, F16 and BF16 keep their type, quantised
types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, the IQ and TQ types) are dequantised to
F32 by the ``gguf`` package (llama.cpp's own Python reader, the optional ``peftcli[gguf]``
extra), which is imported only then.

Two architectures are mapped back (GGUF names to Hugging Face names, the config from the
metadata): ``llama`` and ``qwen2``. For llama, llama.cpp's converter permutes the rows of
``attn_q`` and ``attn_k`` for its rotary layout (``LlamaModel.permute`` in
``convert_hf_to_gguf.py``), and reading undoes that permutation exactly; its ``Qwen2Model``
does not permute, so qwen2 rows are read as stored (with qwen2's q/k/v biases). Anything not understood (another architecture, a tensor with no Hugging
Face name, RoPE scaling, experts, a type nothing here dequantises) is refused, naming it.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, uint32 version, uint64 tensor count,
uint64 metadata count, the metadata (key, value type, value), the tensor table (name, dims in
ggml's reversed order, type, offset), padding to ``general.alignment``, the tensor data.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from peftcli.checkpoint.reader import Checkpoint, TensorInfo, read_file_range
from peftcli.errors import BadInputError

if TYPE_CHECKING:
    import torch

CORRUPT = "the file is truncated or corrupt; replace it with an intact copy"
NEEDS_GGUF = "pip install gguf (or pip install 'peftcli[gguf]')"
CONVERT = "convert it with transformers (from_pretrained(dir, gguf_file=...), then save_pretrained) and pass that directory"

# ggml type id -> (name, elements per block, bytes per block), for the types peftcli reads.
# F32/F16/BF16 are read as they are; the others are dequantised by gguf.quants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    29: ("IQ1_M", 256, 56), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}
# Types ggml defines that peftcli does not read (no dequantiser, or not a weight type).
OTHER_TYPES = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 39: "MXFP4"}
STORED = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # read as stored; everything else becomes F32

MAX_COUNT = 1 << 24  # tensors, keys, array items: far beyond any model, small enough to refuse garbage early
MAX_STRING = 1 << 24


class GGUFTensor(NamedTuple):
    """One tensor of the GGUF table: its shape in numpy order (ggml's ``ne`` reversed)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # scalars and short arrays as values; long arrays as ArrayInfo
    tensors: list[GGUFTensor]
    data_start: int


class ArrayInfo(NamedTuple):
    """A long metadata array (a vocabulary), kept as its item type and length only."""

    item_type: int
    length: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
KEEP_ARRAY = 64  # arrays up to this length are kept; longer ones (vocabularies, merges) are skipped over


class _Cursor:
    """Sequential reads from the header, each checked against the file's size."""

    def __init__(self, f: BinaryIO, path: str, size: int):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise BadInputError(f"{self.path}: the GGUF header ends inside {what} (byte {self.pos} of {self.size})", CORRUPT)
        data = self.f.read(n)
        if len(data) != n:
            raise BadInputError(f"{self.path}: the file shrank while reading its GGUF header", "rerun once the file is complete")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise BadInputError(f"{self.path}: the GGUF header ends inside {what} (byte {self.pos} of {self.size})", CORRUPT)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str) -> int:
        n: int = self.unpack("<Q", what)
        if n > MAX_COUNT:
            raise BadInputError(f"{self.path}: {what} is {n}, over the limit of {MAX_COUNT}", CORRUPT)
        return n

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise BadInputError(f"{self.path}: {what} is {n} bytes long, over the limit of {MAX_STRING}", CORRUPT)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise BadInputError(f"{self.path}: {what} is not UTF-8", CORRUPT) from None


def _value(c: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return c.unpack(_SCALARS[vtype], f"the value of {key!r}")
    if vtype == 8:
        return c.string(f"the value of {key!r}")
    if vtype != 9:
        raise BadInputError(f"{c.path}: metadata {key!r} has unknown value type {vtype}", CORRUPT)
    item = c.unpack("<I", f"the array type of {key!r}")
    n = c.count(f"the length of array {key!r}")
    if item == 9:
        raise BadInputError(f"{c.path}: metadata {key!r} is an array of arrays, which peftcli does not read", CORRUPT)
    if n <= KEEP_ARRAY:
        return [_value(c, item, key) for _ in range(n)]
    if item == 8:  # strings: each one's length says how far to skip
        for _ in range(n):
            c.skip(c.unpack("<Q", f"an item of {key!r}"), f"an item of {key!r}")
    elif item in _SCALARS:
        c.skip(n * struct.calcsize(_SCALARS[item]), f"array {key!r}")
    else:
        raise BadInputError(f"{c.path}: metadata {key!r} has unknown item type {item}", CORRUPT)
    return ArrayInfo(item, n)


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse and validate ``path``'s GGUF header and tensor table; reads the header's bytes only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _parse(_Cursor(f, path, size))
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read: {exc.strerror or exc}", "check that the file exists and is readable") from None


def _parse(c: _Cursor) -> GGUFHeader:
    magic = c.take(4, "the magic")
    if magic != b"GGUF":
        raise BadInputError(f"{c.path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')", "pass a .gguf file written by llama.cpp")
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        what = "a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {version}"
        raise BadInputError(f"{c.path}: {what}, which peftcli does not read", "peftcli reads little-endian GGUF versions 2 and 3")
    n_tensors = c.count("the tensor count")
    n_fields = c.count("the metadata count")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = c.string("a metadata key")
        if key in fields:
            raise BadInputError(f"{c.path}: metadata key {key!r} appears twice", CORRUPT)
        fields[key] = _value(c, c.unpack("<I", f"the type of {key!r}"), key)
    table = [_tensor_entry(c) for _ in range(n_tensors)]
    alignment = fields.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise BadInputError(f"{c.path}: general.alignment {alignment!r} is not a power of two", CORRUPT)
    data_start = -(-c.pos // alignment) * alignment
    return GGUFHeader(version, fields, _place(c, table, data_start, alignment), data_start)


def _tensor_entry(c: _Cursor) -> tuple[str, int, tuple[int, ...], int]:
    name = c.string("a tensor name")
    n_dims = c.unpack("<I", f"the rank of tensor {name!r}")
    if not 1 <= n_dims <= 4:
        raise BadInputError(f"{c.path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to 4)", CORRUPT)
    ne = [c.unpack("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
    ggml_type = c.unpack("<I", f"the type of tensor {name!r}")
    offset = c.unpack("<Q", f"the offset of tensor {name!r}")
    return name, ggml_type, tuple(reversed(ne)), offset  # ggml lists the fastest-moving dimension first


def _place(c: _Cursor, table: list[tuple[str, int, tuple[int, ...], int]], data_start: int, alignment: int) -> list[GGUFTensor]:
    """The tensors with their types checked and their byte ranges inside the file, without overlaps."""
    out, seen = [], set()
    for name, ggml_type, shape, offset in table:
        if name in seen:
            raise BadInputError(f"{c.path}: tensor {name!r} appears twice in the GGUF table", CORRUPT)
        seen.add(name)
        if ggml_type not in GGML_TYPES:
            known = OTHER_TYPES.get(ggml_type, f"type id {ggml_type}")
            raise BadInputError(
                f"{c.path}: tensor {name!r} is stored as GGML {known}, which peftcli cannot dequantise",
                "readable: " + ", ".join(t[0] for t in GGML_TYPES.values()) + "; re-quantise the file with llama.cpp to one of them",
            )
        type_name, block, block_bytes = GGML_TYPES[ggml_type]
        if any(d == 0 or d > 1 << 40 for d in shape) or shape[-1] % block:
            raise BadInputError(f"{c.path}: tensor {name!r} has shape {list(shape)}, impossible for GGML {type_name}", CORRUPT)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel // block * block_bytes
        if offset % alignment:
            raise BadInputError(f"{c.path}: tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}", CORRUPT)
        begin = data_start + offset
        if begin + nbytes > c.size:
            raise BadInputError(
                f"{c.path}: tensor {name!r} ends at byte {begin + nbytes} of a {c.size}-byte file (the file is truncated)",
                CORRUPT,
            )
        out.append(GGUFTensor(name, type_name, shape, begin, nbytes))
    by_offset = sorted(out, key=lambda t: t.begin)
    for before, after in zip(by_offset, by_offset[1:]):
        if after.begin < before.begin + before.nbytes:
            raise BadInputError(f"{c.path}: tensor {after.name!r} overlaps tensor {before.name!r}", CORRUPT)
    return out


# -- llama: names and config ---------------------------------------------------------------------

_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


# general.architecture -> (the transformers class, its model_type, q/k rows permuted by the converter).
# llama.cpp's converter permutes q/k in LlamaModel.modify_tensors only; Qwen2Model maps the names
# and leaves the rows as Hugging Face stores them. Both use the same tensor names (gguf-py's
# MODEL_TENSORS for LLAMA and QWEN2, TensorNameMap), so one name table serves both.
ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}
# The bias groups each architecture has: transformers' Qwen2Attention has q/k/v biases (always)
# and none on o_proj or the MLP; a llama has them where attention_bias/mlp_bias say.
_QWEN2_BIASES = ("attn_q", "attn_k", "attn_v")


def hf_name(path: str, name: str, layers: int, arch: str = "llama") -> str:
    """The Hugging Face (``LlamaForCausalLM``/``Qwen2ForCausalLM``) name of GGUF tensor ``name``."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < layers and m.group(1) == str(int(m.group(1))):
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise BadInputError(f"{path}: GGUF tensor {name!r} has no Hugging Face {arch} counterpart peftcli knows", CONVERT)


def _int_field(path: str, fields: dict[str, Any], key: str, default: int | None = None) -> int:
    value = fields.get(key, default)
    if type(value) is not int or value <= 0:
        shown = "missing" if key not in fields else repr(value)
        raise BadInputError(f"{path}: GGUF metadata {key!r} is {shown}, not a positive integer", CORRUPT)
    return value


def llama_config(path: str, header: GGUFHeader) -> dict[str, Any]:
    """The ``config.json`` of the ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` the GGUF was
    converted from, from its metadata (keys under ``general.architecture``'s prefix)."""
    f, tensors = header.fields, {t.name: t for t in header.tensors}
    arch = f.get("general.architecture")
    if arch not in ARCHS:
        raise BadInputError(f"{path}: GGUF architecture {arch!r}: peftcli maps GGUF names back for {', '.join(map(repr, ARCHS))} only", CONVERT)
    _refuse_unrebuilt(path, f, tensors, arch)
    hidden, heads = _int_field(path, f, f"{arch}.embedding_length"), _int_field(path, f, f"{arch}.attention.head_count")
    kv_heads = _int_field(path, f, f"{arch}.attention.head_count_kv", heads)
    head_dim = _int_field(path, f, f"{arch}.attention.key_length", hidden // heads if hidden % heads == 0 else None)
    if (_int_field(path, f, f"{arch}.rope.dimension_count", head_dim) != head_dim
            or f.get(f"{arch}.attention.value_length", head_dim) != head_dim):
        raise BadInputError(f"{path}: GGUF rotary or value dimensions differ from the head size {head_dim}", CONVERT)
    embed = tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2 or embed.shape[1] != hidden:
        raise BadInputError(f"{path}: the GGUF has no token_embd.weight of width {hidden}", CORRUPT)
    vocab = _int_field(path, f, f"{arch}.vocab_size", embed.shape[0])
    tokens = f.get("tokenizer.ggml.tokens")
    n_tokens = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else vocab
    if not vocab == embed.shape[0] == n_tokens:
        raise BadInputError(
            f"{path}: the GGUF's vocabulary sizes disagree ({arch}.vocab_size {vocab}, token_embd {embed.shape[0]} rows, {n_tokens} tokens)",
            CORRUPT,
        )
    config: dict[str, Any] = {
        "architectures": [ARCHS[arch][0]], "model_type": ARCHS[arch][1],
        "hidden_size": hidden, "intermediate_size": _int_field(path, f, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _int_field(path, f, f"{arch}.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": _int_field(path, f, f"{arch}.context_length"),
        "rms_norm_eps": float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu", "torch_dtype": _config_dtype(header.tensors),
    }
    if arch == "llama":
        config.update({"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors})
    else:  # llama.cpp's qwen2 attends to the whole context: so does the rebuilt model
        config.update({"use_sliding_window": False, "sliding_window": None})
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        value = f.get(f"tokenizer.ggml.{key}")
        if type(value) is int:
            config[hf] = value
    return config


def _refuse_unrebuilt(path: str, f: dict[str, Any], tensors: dict[str, Any], arch: str) -> None:
    """Refuse what the rebuilt config could not express: experts, RoPE scaling, llama 3's rope_freqs."""
    for key in (f"{arch}.expert_count", f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor"):
        if key in f and f[key] not in (0, "none", 1.0):
            raise BadInputError(f"{path}: GGUF metadata {key!r} = {f[key]!r} (experts or RoPE scaling), which peftcli does not rebuild", CONVERT)
    if "rope_freqs.weight" in tensors:
        raise BadInputError(f"{path}: the GGUF holds rope_freqs (llama 3 RoPE scaling), which peftcli does not rebuild", CONVERT)


def llama_shapes(config: dict[str, Any], arch: str = "llama") -> dict[str, tuple[int, ...]]:
    """Every weight a ``LlamaForCausalLM`` (or, with ``arch`` qwen2, a ``Qwen2ForCausalLM``) of
    ``config`` has, under GGUF names, with its shape."""
    hidden, inter, vocab, hd = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    per_layer = {
        "attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden), "attn_output": (hidden, q),
        "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter), "attn_norm": (hidden,), "ffn_norm": (hidden,),
    }
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (vocab, hidden)
    if arch == "qwen2":
        groups: tuple[tuple[str, ...], ...] = (_QWEN2_BIASES,)
    else:  # transformers' llama has a bias on every projection of a group, or on none
        groups = tuple(g for flag, g in (("attention_bias", ("attn_q", "attn_k", "attn_v", "attn_output")),
                                         ("mlp_bias", ("ffn_gate", "ffn_up", "ffn_down"))) if config[flag])
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in per_layer.items()})
        for group in groups:
            shapes.update({f"blk.{i}.{k}.bias": per_layer[k][:1] for k in group})
    return shapes


def check_llama_shapes(path: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any], arch: str = "llama") -> None:
    """Refuse a GGUF whose tensors are not exactly the config's model's: transformers would
    initialise a missing one at random, and a wrong shape would load as nothing sensible."""
    expected = llama_shapes(config, arch)
    for name, shape in expected.items():
        if name not in shapes:
            raise BadInputError(f"{path}: the GGUF has no tensor {name!r}, which its metadata's {arch} model needs", CORRUPT)
        if shapes[name] != shape:
            raise BadInputError(f"{path}: GGUF tensor {name!r} has shape {list(shapes[name])}, its metadata's {arch} model needs {list(shape)}", CORRUPT)
    for name in shapes:
        if name not in expected:
            hf_name(path, name, config["num_hidden_layers"], arch)  # one error for a name with no counterpart
            raise BadInputError(f"{path}: GGUF tensor {name!r} does not belong in the {arch} model its metadata describes", CORRUPT)


def _config_dtype(tensors: list[GGUFTensor]) -> str:
    read = {STORED.get(t.type_name, "F32") for t in tensors}
    return {"F16": "float16", "BF16": "bfloat16"}.get(read.pop(), "float32") if len(read) == 1 else "float32"


# -- the checkpoint ------------------------------------------------------------------------------


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A GGUF file seen under Hugging Face names; ``get`` dequantises one tensor at a time.

    Its tensors have no byte range (``begin`` is None): each one is produced whole, like a
    pickle's, since the bytes in the file are not the tensor's.
    """

    gguf_config: dict[str, Any] = field(default_factory=dict)
    _entries: dict[str, tuple[GGUFTensor, int | None]] = field(default_factory=dict, repr=False)  # HF name -> entry, heads to un-permute by

    @property
    def config(self) -> dict[str, Any] | None:
        from peftcli.checkpoint.model_config import check_model_config

        return check_model_config(dict(self.gguf_config), self.path)

    def get(self, name: str) -> "torch.Tensor":
        if name not in self._entries:
            return super().get(name)  # its one error for an unknown name
        entry, heads = self._entries[name]
        raw = read_file_range(self._file(self.files[0]), self.files[0], entry.begin, entry.nbytes, None, entry.name)
        value = _decode(self.path, entry, raw)
        if heads is not None:
            value = unpermute(value, heads)
        return value.contiguous()


def _decode(path: str, entry: GGUFTensor, raw: "torch.Tensor") -> "torch.Tensor":
    import torch

    if entry.type_name in STORED:
        return raw.view(getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[entry.type_name])).view(entry.shape)
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise BadInputError(f"{path}: tensor {entry.name!r} is GGML {entry.type_name}, and dequantising it needs the gguf package", NEEDS_GGUF) from None
    rows = raw.numpy().reshape(*entry.shape[:-1], -1)
    values = dequantize(rows, GGMLQuantizationType[entry.type_name])
    if tuple(values.shape) != entry.shape:
        raise BadInputError(f"{path}: tensor {entry.name!r} dequantised to shape {list(values.shape)}, not {list(entry.shape)}", CORRUPT)
    return torch.from_numpy(values.astype("float32", copy=False))


def unpermute(w: "torch.Tensor", heads: int) -> "torch.Tensor":
    """Undo llama.cpp's ``LlamaModel.permute(w, n_head, n_head_kv)`` on the rows of ``w``.

    The converter reorders each head's rows from (2, d/2), Hugging Face's rotate-half layout,
    to (d/2, 2), the interleaved pairs llama.cpp rotates; this is the inverse reshape.
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> GGUFCheckpoint:
    """``path`` as a checkpoint under Hugging Face names (llama or qwen2), its config rebuilt from the metadata."""
    header = read_gguf_header(path)
    config = llama_config(path, header)
    arch = header.fields["general.architecture"]
    check_llama_shapes(path, {t.name: t.shape for t in header.tensors}, config, arch)
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    permuted_rows = ARCHS[arch][2]
    tensors: dict[str, TensorInfo] = {}
    entries: dict[str, tuple[GGUFTensor, int | None]] = {}
    for t in header.tensors:
        name = hf_name(path, t.name, layers, arch)
        permuted = {"attn_q": heads, "attn_k": kv_heads}.get(t.name.split(".")[2]) if permuted_rows and t.name.startswith("blk.") else None
        if permuted is not None and t.shape[0] % (2 * permuted):
            raise BadInputError(f"{path}: tensor {t.name!r} has {t.shape[0]} rows, not a multiple of 2 × {permuted} heads", CORRUPT)
        tensors[name] = TensorInfo(name, STORED.get(t.type_name, "F32"), t.shape, path)
        entries[name] = (t, permuted)
    types: dict[str, int] = {}
    for t in header.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    metadata = {"format": "gguf", "gguf.version": str(header.version), "gguf.tensor_types": ",".join(f"{k}:{v}" for k, v in sorted(types.items()))}
    metadata.update({k: str(v) for k, v in header.fields.items() if k.startswith("general.") and isinstance(v, (str, int, float))})
    return GGUFCheckpoint(path=path, storage="gguf", files=[path], tensors=tensors, metadata=metadata, gguf_config=config, _entries=entries)
