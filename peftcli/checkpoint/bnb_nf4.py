"""A bitsandbytes NF4 checkpoint directory as transformers' ``save_pretrained`` writes it, read and
written back (``peftcli merge BNB_DIR RUN -o OUT_DIR``).

transformers saves a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` with each quantized Linear weight as bitsandbytes' ``QuantState
.as_dict(packed=True)`` gives it: under the weight's own name the packed codes (uint8
``[ceil(n/2), 1]``), beside it ``.absmax`` (fp32, or with double quantisation uint8 indices
into ``.nested_quant_map`` with ``.nested_absmax``), ``.quant_map`` (the 16 NF4 levels) and
``.quant_state.bitsandbytes__nf4``: the JSON ``{"quant_type", "blocksize", "dtype", "shape"[,
"nested_blocksize", "nested_dtype", "nested_offset"]}`` stored as uint8 bytes. Every other
tensor (embeddings, norms, ``lm_head``, ``llm_int8_skip_modules``) is stored plain.

Only what ``peftcli.quantize.nf4`` writes bit for bit is read: NF4, blocksize 64, nested
blocksize 256, the standard level maps, uint8 storage. Anything else in the
``quantization_config`` or the tensors (8-bit, fp4, another blocksize or map, a shape that
contradicts its quant_state, a companion without its quant_state) is refused by name: the
weights would be decoded wrongly. Every message starts as ``model_config``'s refusal does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from peftcli.errors import BadInputError

WHAT = "a pre-quantized checkpoint (quant_method 'bitsandbytes')"
STATE = ".quant_state.bitsandbytes__"
NF4_STATE = STATE + "nf4"
COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
FULL_PRECISION = "merge into the full-precision model it was quantized from"
STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
DTYPES = ("float32", "float16", "bfloat16")
# quantization_config keys and the values peftcli understands (any other key must be off).
_BOOL = (True, False)
_ACCEPTED = {
    "quant_method": lambda v: v == "bitsandbytes",
    "load_in_4bit": lambda v: v is True, "_load_in_4bit": lambda v: v is True,
    "load_in_8bit": lambda v: v is False, "_load_in_8bit": lambda v: v is False,
    "bnb_4bit_quant_type": lambda v: v == "nf4",
    "bnb_4bit_use_double_quant": lambda v: v in _BOOL,
    "bnb_4bit_quant_storage": lambda v: v == "uint8",
    "bnb_4bit_compute_dtype": lambda v: v is None or isinstance(v, str),  # the compute dtype at run time only
    "llm_int8_threshold": lambda v: True,  # 8-bit inference only
    "llm_int8_has_fp16_weight": lambda v: v is False,
    "llm_int8_enable_fp32_cpu_offload": lambda v: v in _BOOL,  # where modules run; the tensors say which are quantized
    "llm_int8_skip_modules": lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def _refuse(where: str, what: str, hint: str = FULL_PRECISION) -> BadInputError:
    return BadInputError(f"{where}: {WHAT}: {what}", hint)


def is_bnb(path: str | None) -> bool:
    """Whether ``path`` is a checkpoint directory whose config.json names bitsandbytes quantisation."""
    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False  # the ordinary reader says what is wrong with it
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == "bitsandbytes"


def check_config(q: dict, where: str) -> None:
    """The quantization_config is 4-bit NF4 in uint8 storage, each key one peftcli understands."""
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise _refuse(where, "8-bit (load_in_8bit) weights, which peftcli does not requantize")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":  # transformers' default is fp4
        raise _refuse(where, f"bnb_4bit_quant_type {q.get('bnb_4bit_quant_type', 'fp4')!r}: peftcli requantizes NF4 only")
    for key, value in q.items():
        ok = _ACCEPTED.get(key)
        if ok is None and value not in (None, False, [], {}, ""):
            raise _refuse(where, f"quantization_config {key!r} = {json.dumps(value)[:40]}, which peftcli does not understand")
        if ok is not None and not ok(value):
            raise _refuse(where, f"quantization_config {key!r} = {json.dumps(value)[:40]} is not a 4-bit NF4 setting peftcli writes")


@dataclass
class NF4Entry:
    """One NF4 weight: its name, the file holding it and its parsed quant_state JSON."""

    name: str
    file: str
    state: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.state["shape"])

    @property
    def nested(self) -> bool:
        return "nested_offset" in self.state


def weight_files(directory: str) -> dict[str, str]:
    """Tensor name -> the safetensors file (in ``directory``) holding it."""
    from peftcli.checkpoint.reader import SAFETENSORS_INDEX, load_json

    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        weight_map = load_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise _refuse(directory, f"{SAFETENSORS_INDEX} has no weight_map of file names", "re-save the model with save_pretrained")
        return dict(weight_map)
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        raise _refuse(directory, "no model.safetensors", "save the quantized model with save_pretrained(safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def read_entries(directory: str, files: dict[str, str], double_quant: bool | None) -> dict[str, NF4Entry]:
    """Every NF4 weight of the checkpoint, its tensors checked against its quant_state."""
    import torch
    from safetensors import safe_open

    from peftcli.quantize import nf4

    entries: dict[str, NF4Entry] = {}
    for name in files:
        if STATE in name and not name.endswith(NF4_STATE):
            raise _refuse(directory, f"{name}: a {name.rsplit('__', 1)[-1]!r} quant_state, which peftcli does not requantize")
    for state_name in (n for n in files if n.endswith(NF4_STATE)):
        weight = state_name[: -len(NF4_STATE)]
        with safe_open(os.path.join(directory, files[state_name]), "pt") as f:
            blob = f.get_tensor(state_name)
        entries[weight] = NF4Entry(weight, files.get(weight, ""), _parse_state(directory, state_name, blob))
    for name in files:
        owner = next((name[: -len(c)] for c in COMPANIONS if name.endswith(c)), None)
        if owner is not None and owner not in entries:
            raise _refuse(directory, f"{name} has no {owner}{NF4_STATE} beside it (missing quant_state)", "re-save the model with save_pretrained")
    code, dynamic = torch.tensor(nf4.NF4_CODE), nf4.dynamic_map()
    for e in entries.values():
        if double_quant is not None and e.nested != double_quant:
            raise _refuse(directory, f"{e.name}: double quantisation {e.nested}, the quantization_config says {double_quant}",
                          "re-save the model with save_pretrained")
        _check_tensors(directory, files, e, code, dynamic)
    return entries


def _parse_state(where: str, name: str, blob: Any) -> dict:
    """The quant_state JSON, every field what peftcli's NF4 writes."""
    try:
        state = json.loads(bytes(blob.reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError, RecursionError):  # RecursionError: JSON nested too deeply
        state = None
    if not isinstance(state, dict) or not set(state) <= set(STATE_KEYS):
        raise _refuse(where, f"{name} is not a quant_state JSON object with the fields {', '.join(STATE_KEYS)}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise _refuse(where, f"{name}: shape {json.dumps(shape)[:40]} is not a list of positive sizes")
    from peftcli.quantize import nf4

    wanted = {"quant_type": "nf4", "blocksize": nf4.BLOCK}
    if "nested_offset" in state or "nested_blocksize" in state:
        wanted |= {"nested_blocksize": nf4.BLOCK2, "nested_dtype": "float32"}
        offset = state.get("nested_offset")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise _refuse(where, f"{name}: nested_offset {json.dumps(offset)[:40]} is not a number")
    for key, value in wanted.items():
        if state.get(key) != value:
            raise _refuse(where, f"{name}: {key} {json.dumps(state.get(key))[:40]}, and peftcli writes NF4 with {key} {value}")
    if state.get("dtype") not in DTYPES:
        raise _refuse(where, f"{name}: dtype {json.dumps(state.get('dtype'))[:40]} is not one of {', '.join(DTYPES)}")
    return state


def _check_tensors(where: str, files: dict[str, str], e: NF4Entry, code: Any, dynamic: Any) -> None:
    """Each of ``e``'s tensors has the dtype and size its quant_state implies, the maps the standard ones."""
    import torch
    from safetensors import safe_open

    from peftcli.quantize import nf4

    n = math.prod(e.shape)
    blocks = -(-n // nf4.BLOCK)
    expect = {e.name: ("U8", [-(-n // 2), 1]), e.name + ".absmax": ("U8" if e.nested else "F32", [blocks]),
              e.name + ".quant_map": ("F32", [16])}
    if e.nested:
        expect |= {e.name + ".nested_absmax": ("F32", [-(-blocks // nf4.BLOCK2)]), e.name + ".nested_quant_map": ("F32", [256])}
    for name, (dtype, shape) in expect.items():
        if name not in files:
            raise _refuse(where, f"{name} is missing, and its quant_state says it is quantized", "re-save the model with save_pretrained")
        with safe_open(os.path.join(where, files[name]), "pt") as f:
            sl = f.get_slice(name)
            got = (sl.get_dtype(), list(sl.get_shape()))
            if got != (dtype, shape):
                raise _refuse(where, f"{name} is {got[0]} {got[1]}, and its quant_state (shape {list(e.shape)}) implies {dtype} {shape}")
            if name.endswith(".quant_map") and not torch.equal(f.get_tensor(name), code.float()):
                raise _refuse(where, f"{name} is not the NF4 level map")
            if name.endswith(".nested_quant_map") and not torch.equal(f.get_tensor(name), dynamic.float()):
                raise _refuse(where, f"{name} is not bitsandbytes' dynamic map")


def dequantize(e: NF4Entry, get) -> Any:
    """The weight ``e`` in fp32 (``get(name)`` gives a stored tensor)."""
    import torch

    from peftcli.quantize import nf4

    packed, absmax = get(e.name).reshape(-1), get(e.name + ".absmax")
    if e.nested:
        w = nf4.NF4Weight(packed, absmax, get(e.name + ".nested_absmax"), torch.tensor(e.state["nested_offset"], dtype=torch.float32), e.shape)
        return nf4.dequantize(w)
    n = math.prod(e.shape)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = torch.tensor(nf4.NF4_CODE)[idx]
    out = torch.nn.functional.pad(values, (0, -n % nf4.BLOCK)).view(-1, nf4.BLOCK) * absmax.unsqueeze(1)
    return out.reshape(-1)[:n].view(e.shape)


def requantize(e: NF4Entry, value: Any) -> tuple[dict[str, Any], NF4Entry]:
    """``value`` (fp32) in ``e``'s layout: the stored tensors that change (codes, absmaxes, quant_state),
    and the entry that describes them."""
    import torch

    from peftcli.quantize import nf4

    state = dict(e.state)  # its key order kept: the JSON bytes are bitsandbytes' for the same values
    if e.nested:
        q = nf4.quantize(value)
        state["nested_offset"] = q.offset.item()
        tensors = {e.name: q.packed, e.name + ".absmax": q.qabsmax, e.name + ".nested_absmax": q.absmax2}
    else:
        codes, absmax = nf4._blockwise(value.reshape(-1).float(), nf4.BLOCK, torch.tensor(nf4.NF4_CODE))
        if codes.numel() % 2:  # padded with the level 0.0, as nf4.quantize and bitsandbytes do
            codes = torch.nn.functional.pad(codes, (0, 1), value=nf4.NF4_CODE.index(0.0))
        tensors = {e.name: (codes[0::2] << 4) | codes[1::2], e.name + ".absmax": absmax}
    tensors[e.name] = tensors[e.name].reshape(-1, 1).contiguous()
    blob = json.dumps(state).encode("utf-8")
    tensors[e.name + NF4_STATE] = torch.tensor(list(blob), dtype=torch.uint8)
    return tensors, NF4Entry(e.name, e.file, state)
