"""The adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

For methods PEFT has (LoRA, DoRA, rsLoRA, IA³, prompt and prefix tuning) the directory is
exactly PEFT's, so ``PeftModel.from_pretrained`` loads it and we load PEFT's. Methods PEFT
lacks (bottleneck adapters, BitFit, layer groups) use the same layout with
``"peft_type": "PEFTCLI"`` and a ``"peftcli"`` section holding the method and its options.
Provenance (peftcli version, method options, seed, base) goes in the safetensors
``__metadata__`` under ``peftcli.*`` keys, which PEFT ignores.

Reading checks the JSON type (and range) of every ``adapter_config.json`` field peftcli
reads, PEFT's and the ``peftcli`` section's, so that a hand-edited or corrupt config is one
error naming the field, never a crash further on in a method.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass

from peftcli.checkpoint.atomic import atomic_output, open_new_file
from peftcli.checkpoint.model_config import is_json_number
from peftcli.checkpoint.reader import ADAPTER_WEIGHTS, load_json, open_checkpoint
from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec
from peftcli.errors import BadInputError
from peftcli.methods import METHODS, method_for_adapter_config
from peftcli.methods.base import materialize
from peftcli.methods.peftcli_section import PEFTCLI_PEFT_TYPE

if typing.TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Adapter:
    path: str
    config: dict  # adapter_config.json
    tensors: Mapping  # name -> torch.Tensor (a dict, or ``LazyTensors`` reading each on demand)
    metadata: dict[str, str]

    @property
    def method_name(self) -> str:
        return method_for_adapter_config(self.config, self.path).name


# -- the fields of adapter_config.json peftcli reads, and what PEFT allows in each ----------------

MAX_COUNT = 2**31 - 1  # ranks, token counts, widths: anything larger cannot be allocated anyway


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_names(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _count(v: object) -> bool:
    return _is_int(v) and 1 <= v <= MAX_COUNT


_KINDS: dict[str, tuple[typing.Callable[[object], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bool?": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "count": (_count, f"an integer from 1 to {MAX_COUNT}"),
    "count?": (lambda v: v is None or _count(v), f"an integer from 1 to {MAX_COUNT}, or null"),
    "positive": (lambda v: is_json_number(v) and v > 0, "a positive number"),
    "fraction": (lambda v: is_json_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "names?": (lambda v: v is None or isinstance(v, str) or _is_names(v), "a string, a list of strings or null"),
    "list-of-names?": (lambda v: v is None or _is_names(v), "a list of strings or null"),
    "layers?": (
        lambda v: v is None or (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
        "a layer index, a list of layer indices or null",
    ),
    "object?": (lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
    "bool-or-str": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
}

# PEFT's fields (LoRA, IA³, prompt and prefix tuning) that peftcli reads. Absent keys are fine:
# each method has its own rule for those.
PEFT_FIELDS = {
    "peft_type": "str",
    "base_model_name_or_path": "str?",
    "task_type": "str?",
    "r": "count",
    "lora_alpha": "positive",
    "lora_dropout": "fraction",
    "target_modules": "names?",
    "exclude_modules": "names?",
    "feedforward_modules": "names?",
    "modules_to_save": "list-of-names?",
    "layers_to_transform": "layers?",
    "layers_pattern": "names?",
    "rank_pattern": "object?",
    "alpha_pattern": "object?",
    "use_dora": "bool?",
    "lora_bias": "bool?",
    "use_rslora": "bool?",
    "fan_in_fan_out": "bool?",
    "bias": "str",
    "init_lora_weights": "bool-or-str",
    "num_virtual_tokens": "count",
    "token_dim": "count?",
    "num_attention_heads": "count?",
    "num_layers": "count?",
    "num_transformer_submodules": "count?",
    "encoder_hidden_size": "count?",
    "prefix_projection": "bool?",
    "prompt_tuning_init": "str?",
    "prompt_tuning_init_text": "str?",
    "peftcli": "object?",
}

CORRUPT_CONFIG = "the adapter config is corrupt or was edited by hand"



def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_adapter_config(config: dict, where: str) -> None:
    """Refuse an adapter config whose fields have types (or values) PEFT never writes."""
    for key, kind in PEFT_FIELDS.items():
        if key == "r" and config.get("peft_type") == "OFT":
            continue  # OFT's r counts blocks, 0 when oft_block_size is given: peftcli.methods.oft checks it
        if key in config:
            ok, expected = _KINDS[kind]
            if not ok(config[key]):
                raise BadInputError(f"{where}: '{key}' must be {expected}, not {_short(config[key])}", CORRUPT_CONFIG)
    section = config.get("peftcli")
    if config.get("peft_type") == PEFTCLI_PEFT_TYPE:
        if not isinstance(section, dict) or not isinstance(section.get("method"), str):
            raise BadInputError(
                f"{where}: peft_type {PEFTCLI_PEFT_TYPE} needs a 'peftcli' section naming its method", CORRUPT_CONFIG
            )
        _check_peftcli_section(section, where)


def _check_peftcli_section(section: dict, where: str) -> None:
    """The ``peftcli`` section's options have the types of the method's config class."""
    method = METHODS.get(section["method"])
    if method is None:
        return  # the registry names unknown methods
    hints = typing.get_type_hints(method.config_cls)
    for key, value in section.items():
        if key in hints and not _fits(value, hints[key]):
            raise BadInputError(
                f"{where}: 'peftcli.{key}' must be {_describe(hints[key])}, not {_short(value)}", CORRUPT_CONFIG
            )


def _fits(value: object, hint: object) -> bool:
    """Whether the JSON ``value`` can be a value of the type ``hint`` (str, int, float, bool, list[str], unions)."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value) and abs(value) <= MAX_COUNT
    if hint is float:
        return is_json_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_fits(x, args[0]) for x in value))
    return True  # a type this check does not know: the method's own code decides


def _describe(hint: object) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(hint, str(hint))


def read_adapter_config(path: str) -> dict:
    """``adapter_config.json`` of the adapter directory ``path``, read and checked."""
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise BadInputError(f"{path}: no {ADAPTER_CONFIG}", "is this an adapter directory written by peftcli inject or PEFT?")
    config = load_json(config_path, "adapter config")
    check_adapter_config(config, config_path)
    return config


def read_adapter(path: str, *, lazy: bool = False) -> Adapter:
    """Read and minimally validate an adapter directory (keys vs base are checked at attach).

    ``lazy``: ``tensors`` is a ``LazyTensors`` that reads a tensor from the file each time it is
    asked for (a merge folds one target at a time and never holds the adapter whole). The header
    (names, dtypes, shapes, the file's length) is checked here all the same, before any value is read.
    """
    if not os.path.isdir(path):
        raise BadInputError(f"{path}: not an adapter directory", f"expected a directory with {ADAPTER_CONFIG}")
    config = read_adapter_config(path)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise BadInputError(f"{path}: adapter weights are a pickle (adapter_model.bin)", "re-save the adapter with safetensors")
        raise BadInputError(f"{path}: no {ADAPTER_WEIGHTS}", "the adapter directory is incomplete; pass one written whole by peftcli inject or train")
    ckpt = open_checkpoint(weights)
    tensors: Mapping
    if lazy:
        dtypes = {name: _header_dtype(ckpt, name) for name in ckpt}  # what ckpt.get refuses, refused now
        files = from_file_layout(config, {name: name for name in ckpt}, path)
        tensors = LazyTensors(ckpt, files, {inner: dtypes[f] for inner, f in files.items()})
    else:
        tensors = from_file_layout(config, {name: ckpt.get(name) for name in ckpt}, path)
    config = _task_heads(_saved_paths(config, tensors), tensors)
    check_adapter_tensors(config, tensors, path)
    return Adapter(path=path, config=config, tensors=tensors, metadata=dict(ckpt.metadata))


def _header_dtype(ckpt, name: str) -> "torch.dtype":
    """The torch dtype of ``name``'s header entry, refused as ``Checkpoint.get`` refuses it."""
    from peftcli.checkpoint.dtypes import torch_dtype

    info = ckpt.tensors[name]
    try:
        return torch_dtype(info.dtype)
    except BadInputError as exc:
        raise BadInputError(f"{info.file}: tensor {name!r}: {exc.message}", exc.hint) from None


class LazyTensors(Mapping):
    """An adapter's tensors by (inner) name, each read from the safetensors file when asked for
    and never kept: every ``[key]`` is a new tensor that goes when its user drops it, so a merge
    folding one target at a time holds one target's tensors. The header was checked on open."""

    def __init__(self, ckpt, files: dict[str, str], dtypes: dict[str, "torch.dtype"], held: dict | None = None):
        self._ckpt, self._files, self._dtypes = ckpt, files, dtypes
        self._held = held or {}  # tensors read once and kept (small ones every target uses)

    def __getitem__(self, key: str) -> "torch.Tensor":
        if key in self._held:
            return self._held[key]
        return self._ckpt.get(self._files[key])

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def dtype(self, key: str) -> "torch.dtype":
        """``self[key].dtype`` without reading the values."""
        return self._dtypes[key]

    def nbytes(self, key: str) -> int:
        return self._ckpt.tensors[self._files[key]].nbytes

    def subset(self, keys, held: dict | None = None) -> "LazyTensors":
        """The same file's tensors ``keys`` only (one target's, for its fold); those in ``held``
        are these tensors, read once (``{k: self[k]}``) and handed out as they are."""
        return LazyTensors(self._ckpt, {k: self._files[k] for k in keys}, {k: self._dtypes[k] for k in keys}, held)


# PEFT's prompt-learning models wrap the transformers model directly (LoRA's and IA³'s wrap it in a
# tuner model), so their saved modules are named ``base_model.<module>.<param>`` where LoRA's are
# ``base_model.model.<module>.<param>``: PEFT finds nothing else (KeyError at load). peftcli wrote
# LoRA's names for them before; both are read, PEFT's are written. Inside peftcli every saved
# module is ``base_model.model.<module>.<param>``, whatever the method.
PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
_SAVED = "base_model.model."  # methods.base.PEFT_PREFIX (not imported: methods import this module)
_PROMPT_SAVED = "base_model."


def from_file_layout(config: dict, tensors: dict, where: str) -> dict:
    """``tensors`` with a prompt-learning adapter's saved modules under peftcli's inner names,
    from PEFT's layout or the one peftcli wrote before; a key both could mean is refused."""
    names = config.get("modules_to_save") or []
    if config.get("peft_type") not in PROMPT_LEARNING_TYPES or not names:
        return tensors
    out = {}
    for key, t in tensors.items():
        inner = key
        rest = key[len(_PROMPT_SAVED) :] if key.startswith(_PROMPT_SAVED) else None
        if rest is not None and any(rest.startswith(f"{n}.") for n in names):
            if any(key.startswith(f"{_SAVED}{n}.") for n in names):
                raise BadInputError(
                    f"{where}: adapter tensor {key!r} may belong to two of the modules_to_save {names}",
                    "keep one of them in modules_to_save in adapter_config.json",
                )
            inner = _SAVED + rest
        if inner in out:
            raise BadInputError(
                f"{where}: the adapter holds {inner[len(_SAVED) :]!r} twice, as PEFT names it and as peftcli named it before",
                "keep one of the two tensors",
            )
        out[inner] = t
    return out


def to_file_layout(config: dict, tensors: dict) -> dict:
    """``tensors`` with saved modules named as PEFT names them for this adapter's method
    (a prompt-learning adapter's ``base_model.<module>.<param>``)."""
    names = config.get("modules_to_save") or []
    if config.get("peft_type") not in PROMPT_LEARNING_TYPES or not names:
        return tensors
    saved = lambda k: any(k.startswith(f"{_SAVED}{n}.") for n in names)  # noqa: E731
    return {(_PROMPT_SAVED + k[len(_SAVED) :] if saved(k) else k): t for k, t in tensors.items()}


def _saved_paths(config: dict, tensors: dict) -> dict:
    """``config`` with each ``modules_to_save`` name as the module paths the adapter saved it
    under. PEFT matches a name as a suffix of module paths (``embed_tokens`` saves
    ``base_model.model.model.embed_tokens.weight``); every command here reads exact paths."""
    names = config.get("modules_to_save")
    if not isinstance(names, list) or not names:
        return config
    resolved: list[str] = []
    for name in names:
        if not isinstance(name, str) or any(k.startswith(f"{_SAVED}{name}.") for k in tensors):
            resolved.append(name)  # already a path (or not a name: check_adapter_tensors says so)
            continue
        paths = sorted({p for k in tensors if k.startswith(_SAVED) for p in _suffix_paths(k[len(_SAVED) :], name)})
        resolved.extend(paths or [name])
    return {**config, "modules_to_save": list(dict.fromkeys(resolved))}


def _suffix_paths(rest: str, name: str) -> list[str]:
    """Module paths in ``rest`` (a saved key without PEFT's prefix) that end with ``.name``,
    where what follows is a saved module's parameter (not LoRA's own tensors)."""
    parts, want = rest.split("."), name.split(".")
    found = []
    for end in range(len(want) + 1, len(parts)):
        if parts[end - len(want) : end] == want and not any(p.startswith("lora_") for p in parts[end:]):
            found.append(".".join(parts[:end]))
    return found


# PEFT's classification wrappers (task_type SEQ_CLS) add these names to ``modules_to_save`` and
# wrap whichever exists in the head model: a BERT classifier saves ``classifier``, a Llama one
# ``score``, and the config lists them all. PEFT 0.22 adds ``pre_classifier`` (DistilBERT's
# freshly initialised layer before ``classifier``).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score", "pre_classifier")}


def _task_heads(config: dict, tensors: dict) -> dict:
    """``config`` without the ``modules_to_save`` names PEFT adds for its task type and the
    adapter holds no tensor of, as PEFT reads it (each command then sees only saved modules).
    Duplicates (PEFT appends the names again each time the config goes through a wrapper) go too."""
    names = config.get("modules_to_save")
    added = TASK_HEADS.get(config.get("task_type") or "", ())
    if not names or not added:
        return config
    kept = []
    for name in names:
        saved = any(k.startswith(f"base_model.model.{name}.") for k in tensors)
        if name not in kept and (saved or name not in added):
            kept.append(name)
    return {**config, "modules_to_save": kept or None}


def replaced_modules(config: dict, tensors: dict, base_names) -> dict[str, object]:
    """The ``modules_to_save`` tensors that replace base tensors of the same name (an ``lm_head``
    trained whole), by base tensor name; the others are new task heads. PEFT's merge_and_unload
    puts the saved module in place of the base's, so merging writes it as it is saved. Refused:
    an ``lm_head`` the base ties to its input embedding (it has no lm_head weight of its own),
    which PEFT unties; a tied checkpoint cannot hold it."""
    out = {}
    for name in config.get("modules_to_save") or []:
        keys = [k for k in tensors if k.startswith(f"base_model.model.{name}.")]
        names = [k[len("base_model.model.") :] for k in keys]
        if keys and all(n in base_names for n in names):
            out.update({n: tensors[k] for n, k in zip(names, keys)})
        elif keys and name.rsplit(".", 1)[-1] == "lm_head":
            raise BadInputError(
                f"modules_to_save names {name}, which this base ties to its input embedding (it has no lm_head weight)",
                "PEFT unties the trained lm_head, which a tied checkpoint cannot hold: merge it with PEFT's merge_and_unload",
            )
    return out


def check_adapter_tensors(config: dict, tensors: Mapping, where: str) -> None:
    """What every command reading an adapter refuses before its method sees it (so that check,
    merge, convert, evaluate and attach refuse alike): a φ tensor that is not floating-point
    (only a sparse φ's ``W.idx`` beside its ``W.val``, and SHiRA's ``shira_indices`` beside its
    ``shira_weight``, hold integers), and a
    ``modules_to_save`` entry the adapter holds no tensor of."""
    import torch

    from peftcli.checkpoint.dtypes import safetensors_dtype

    for key in sorted(tensors):
        dtype = tensors.dtype(key) if isinstance(tensors, LazyTensors) else tensors[key].dtype  # lazy: from the header
        if dtype.is_floating_point:
            continue
        index = key.endswith(".idx") and key[: -len(".idx")] + ".val" in tensors and dtype in (torch.int32, torch.int64)
        # PEFT's SHiRA saves its entries' positions beside them (peftcli.methods.read_fold.shira)
        index = index or (key.endswith(".shira_indices") and key[: -len("indices")] + "weight" in tensors and dtype in (torch.int32, torch.int64))
        if not index:
            raise BadInputError(
                f"{where}: adapter tensor {key!r} is {safetensors_dtype(dtype)}, not floating-point",
                "adapter weights are F32, F16 or BF16; the adapter is corrupt or was not written by PEFT or peftcli",
            )
    for name in config.get("modules_to_save") or []:
        prefix = f"base_model.model.{name}."
        if not name.strip() or not any(k.startswith(prefix) for k in tensors):
            raise BadInputError(
                f"{where}: modules_to_save names {name}, but the adapter holds no tensor of it",
                "remove it from modules_to_save in adapter_config.json, or pass the adapter written whole by training",
            )


def _write_files(directory: str, config: dict, tensors: dict, metadata: dict[str, str] | None, force: bool) -> None:
    """The header from each value's dtype and shape, then the values one at a time: a
    ``LazyTensor`` (``peftcli.methods.base``) is made just before it is written and freed after,
    so a lazy φ is never in memory whole."""
    from peftcli.checkpoint.dtypes import safetensors_dtype

    tensors = to_file_layout(config, tensors)
    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with CheckpointWriter(os.path.join(directory, ADAPTER_WEIGHTS), specs, metadata=metadata, force=force) as w:
        for name, value in tensors.items():
            w.write(name, materialize(value))  # a made tensor is dropped as soon as it is written
    with atomic_output(os.path.join(directory, ADAPTER_CONFIG), directory=False, force=force) as tmp:
        with open_new_file(tmp) as f:
            f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def write_adapter_files(directory: str, config: dict, tensors: dict, *, metadata: dict[str, str] | None = None) -> None:
    """Replace the two adapter files inside an existing directory, each atomically (training runs).

    ``tensors`` maps names to tensors or ``LazyTensor``s, as for ``write_adapter``."""
    _write_files(directory, config, tensors, metadata, force=True)


def write_adapter(
    out: str,
    config: dict,
    tensors: dict,
    *,
    metadata: dict[str, str] | None = None,
    inputs: list[str] = (),
    force: bool = False,
) -> None:
    """Write an adapter directory atomically (the whole directory appears at once).

    ``tensors`` maps names to tensors or ``LazyTensor``s (made one at a time while writing)."""
    with atomic_output(out, directory=True, inputs=inputs, force=force) as tmp:
        _write_files(tmp, config, tensors, metadata, force=False)
