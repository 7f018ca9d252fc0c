"""PEFT's LoRA ``bias="all"`` / ``"lora_only"``: the base's biases trained beside LoRA and saved
in the adapter, read and folded only (``peftcli inject lora`` trains none; attaching such an
adapter is refused).

PEFT's ``get_peft_model_state_dict`` saves, with ``"all"``, every state-dict entry whose name
holds ``bias``; with ``"lora_only"``, the bias of each LoRA-adapted module. A targeted module's
bias sits under its ``base_layer`` (``base_model.model.<module>.base_layer.bias``), any other
under its own name. PEFT's merge_and_unload keeps the trained bias, plus s·``lora_B.bias``
where ``lora_bias`` is on: folding is replacement (``Replacement``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from peftcli.errors import BadInputError
from peftcli.methods.base import PEFT_PREFIX, LazyTensor, Replacement, peft_key

if TYPE_CHECKING:
    import torch

BIASES = ("none", "all", "lora_only")


def read(value, corrupt: str) -> str:
    """An adapter config's ``bias``, refused unless PEFT's."""
    if value not in BIASES:
        raise BadInputError(f"LoRA adapter config has bias {value!r}, which peftcli does not read",
                            f"PEFT writes one of {', '.join(map(repr, BIASES))}: {corrupt}")
    return value


def expected(bias: str, names, targeted: set[str]) -> dict[str, str]:
    """The adapter key of each base tensor (checkpoint name) PEFT saves for ``bias`` with LoRA on ``targeted``."""
    out: dict[str, str] = {}
    if bias == "none":
        return out
    for name in names:
        module = name.rsplit(".", 1)[0]
        adapted = name.endswith(".bias") and module in targeted
        if (bias == "lora_only" and adapted) or (bias == "all" and "bias" in name):
            out[peft_key(module, "base_layer.bias") if adapted else PEFT_PREFIX + name] = name
    return out


def split(tensors: dict, bias: str, lora_suffixes: tuple[str, ...]) -> tuple[dict, dict]:
    """(the saved base biases, the rest: LoRA's own tensors) of an adapter's tensors."""
    if bias == "none":
        return {}, tensors
    saved = {k: t for k, t in tensors.items() if "bias" in k and not any(k.endswith("." + s) for s in lora_suffixes)}
    return saved, {k: t for k, t in tensors.items() if k not in saved}


def init(bias: str, ckpt, targeted: set[str]) -> dict:
    """The biases an adapter of ``bias`` holds on ``ckpt``, at PEFT's init (the base's own), for check."""
    import torch

    def base(name: str) -> Callable[[], "torch.Tensor"]:
        return lambda: ckpt.get(name).to(torch.float32)

    return {key: LazyTensor(ckpt.tensors[name].shape, torch.float32, base(name)) for key, name in expected(bias, ckpt.tensors, targeted).items()}


def fold(bias: str, saved: dict, ckpt, targeted: set[str], out: dict, problems: list[str]) -> None:
    """Each saved bias replaces the base's in ``out`` (adding LoRA's bias delta already there);
    a key of no such bias, of another shape, or a bias PEFT saves that is missing, into ``problems``."""
    want = expected(bias, ckpt.tensors, targeted)
    found: set[str] = set()
    for key, t in sorted(saved.items()):
        name = want.get(key) or want.get(_headless(key))
        if name is None:
            problems.append(f"{key}: no base bias that a bias={bias!r} LoRA adapter saves on this base")
        elif tuple(t.shape) != tuple(ckpt.tensors[name].shape):
            problems.append(f"{key} is {list(t.shape)}, but the base's {name} is {list(ckpt.tensors[name].shape)}")
        else:
            found.add(name)
            out[name] = Replacement(_trained(t, out.get(name)))
    missing = sorted(set(want.values()) - found)
    if missing and not problems:
        problems.append(f"no saved bias {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                        + f", which a bias={bias!r} LoRA adapter saves")


def _headless(key: str) -> str:
    """``key`` without the head model's base prefix (``bert.encoder...`` for a BertModel's ``encoder...``)."""
    rest = key[len(PEFT_PREFIX):].partition(".")[2]
    return PEFT_PREFIX + rest


def _trained(t: "torch.Tensor", lora_delta: Callable | None):
    """The merged bias: the trained one, plus s·lora_B.bias (PEFT's lora_bias) where LoRA has one."""
    if lora_delta is None:
        return lambda stored: t
    return lambda stored: t.float() + lora_delta(stored)


def refuse_attach(bias: str) -> None:
    if bias != "none":
        raise BadInputError(
            f"LoRA adapter trains the base's biases (bias={bias!r}): peftcli reads and folds it only",
            "merge it (peftcli merge BASE ADAPTER) and use the merged model, or load it with PEFT",
        )
