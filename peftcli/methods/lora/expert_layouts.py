"""Checkpoints whose MoE experts transformers fuses on load: the parameters PEFT's
``target_parameters`` sees (``experts.gate_up_proj`` [E, 2·I, H], ``experts.down_proj`` [E, H, I])
found from the per-expert tensors on disk, and where each expert's ΔW goes back on disk.

Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE store expert e's gate/up/down projections one by one
(``…experts.3.w1.weight``); transformers 5's weight conversion (conversion_mapping.py:
``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``) stacks them over experts and puts gate's
rows before up's, and ``save_pretrained`` splits them back. ``LAYOUTS`` declares that mapping per
model type, as read in transformers' code; a model type not in it is not taken (its 3-D names
are no tensor of the checkpoint, and ``parameters.py`` refuses 3-D parameters of unknown
layout). A checkpoint of such a type storing fused experts itself is refused: peftcli does not
know that transformers would load it unconverted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftcli.errors import BadInputError


@dataclass(frozen=True)
class Layout:
    rename: tuple[str, str] | None  # transformers' WeightRenaming on load: (on disk, loaded)
    gate_up: tuple[str, str]  # the per-expert (gate, up) names, in the order Concatenate(dim=1) stacks them
    down: str


_QWEN2_MOE = Layout(None, ("gate_proj", "up_proj"), "down_proj")
# transformers 5.25 conversion_mapping.py: "mixtral" its own entry; qwen3_moe and olmoe use "qwen2_moe"'s
LAYOUTS: dict[str, Layout] = {
    "mixtral": Layout((".block_sparse_moe.", ".mlp."), ("w1", "w3"), "w2"),
    "qwen2_moe": _QWEN2_MOE,
    "qwen3_moe": _QWEN2_MOE,
    "olmoe": _QWEN2_MOE,
}
FUSED = ("gate_up_proj", "down_proj")  # the modules' registration order (PEFT nests by it)


@dataclass(frozen=True)
class Loaded:
    """A parameter of the loaded model whose tensor(s) on disk have other names."""

    shape: tuple[int, ...]
    # per expert, the on-disk tensors its rows come from, in order (gate, up), (down), or one 2-D tensor renamed
    disk: tuple[tuple[str, ...], ...]


def loaded_name(name: str, layout: Layout) -> str:
    if layout.rename is None:
        return name
    old, new = layout.rename
    return name.replace(old, new)


def loaded_shapes(shapes: dict, model_type: str | None) -> tuple[dict[str, tuple[int, ...]], dict[str, Loaded], set[str]]:
    """The parameters transformers' model has, from the checkpoint's ``shapes``: those stored
    under their own name, (second) those fused or renamed on load, with their on-disk tensors,
    and (third) fused expert tensors stored as such, which are refused when targeted. A model
    type without a declared layout: the checkpoint's shapes as they are."""
    layout = LAYOUTS.get(model_type or "")
    if layout is None:
        return dict(shapes), {}, set()
    parts = (*layout.gate_up, layout.down)
    per_expert = re.compile(r"^(.*)\.experts\.(\d+)\.(" + "|".join(map(re.escape, parts)) + r")\.weight$")
    plain: dict[str, tuple[int, ...]] = {}
    moved: dict[str, Loaded] = {}
    stored_fused: set[str] = set()
    groups: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    for n, s in shapes.items():
        m = per_expert.match(n)
        if m:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = tuple(s)
        elif n.rpartition(".")[2] in FUSED and n.rpartition(".")[0].endswith("experts"):
            stored_fused.add(n)
        elif loaded_name(n, layout) != n:
            moved[loaded_name(n, layout)] = Loaded(tuple(s), ((n,),))
        else:
            plain[n] = tuple(s)
    for prefix, experts in groups.items():
        moved.update(_fused(prefix, experts, layout, model_type or ""))
    return plain, moved, stored_fused


def _fused(prefix: str, experts: dict[int, dict[str, tuple[int, ...]]], layout: Layout, model_type: str) -> dict[str, Loaded]:
    """``<prefix>.experts.gate_up_proj`` / ``down_proj`` (loaded names) from experts 0..E-1 of one block."""
    gate, up = layout.gate_up
    first = experts.get(0, {})
    whole = sorted(experts) == list(range(len(experts))) and all(set(e) == {gate, up, layout.down} for e in experts.values())
    same = whole and all(e == first for e in experts.values())
    inter, hidden = first.get(gate, (0, 0)) if same else (0, 0)
    if not (same and first[up] == (inter, hidden) and first[layout.down] == (hidden, inter)):
        raise BadInputError(
            f"{prefix}.experts: the per-expert tensors of this {model_type} checkpoint are not experts 0..E-1 each with "
            f"{gate}, {up} [I, H] and {layout.down} [H, I] (transformers fuses exactly those on load)",
            "the checkpoint is incomplete or not of this model type: check it with `peftcli inspect MODEL --tensors`",
        )
    base = loaded_name(prefix + ".", layout) + "experts."
    order = sorted(experts)
    w = f"{prefix}.experts.{{}}.{{}}.weight"
    return {
        base + FUSED[0]: Loaded((len(order), 2 * inter, hidden), tuple((w.format(e, gate), w.format(e, up)) for e in order)),
        base + FUSED[1]: Loaded((len(order), hidden, inter), tuple((w.format(e, layout.down),) for e in order)),
    }


def refuse_undeclared(name: str, shapes: dict, model_type: str | None) -> None:
    """A fused expert name on a checkpoint that stores experts one by one, of a model type whose
    fusing on load peftcli has not declared: refused naming the type (no guess at the order)."""
    if model_type in LAYOUTS or name.rpartition(".")[2] not in FUSED:
        return
    if any(re.search(r"\.experts\.\d+\.", n) for n in shapes):
        raise BadInputError(
            f"`target_parameters` names {name}, but this {model_type} checkpoint stores its experts one by one and "
            f"peftcli does not know how transformers fuses them for {model_type} (it does for {', '.join(LAYOUTS)})",
            "use PEFT for this model, or target its per-expert linear layers with `targets`",
        )


def refuse_stored_fused(name: str, model_type: str | None) -> None:
    raise BadInputError(
        f"`target_parameters` names {name}, a fused expert tensor stored as such in a {model_type} checkpoint: "
        "transformers' conversion for this model type expects the experts one by one, so peftcli does not know what it loads",
        "save the model with transformers' save_pretrained (it writes the experts one by one), then target it",
    )


def fold_expert(stored, *, a, b, scaling: float, experts: int, expert: int, rows: slice):
    """Rows ``rows`` of ΔW[expert] = s·B_e·A_e (PEFT's layout: A's rows expert-major, B's columns
    rank-major), the part of the fused parameter one on-disk tensor holds."""
    a_e = a.float().reshape(experts, -1, a.shape[-1])[expert]  # [r, d2]
    b_e = b.float().reshape(b.shape[0], -1, experts)[:, :, expert]  # [d1, r]
    return scaling * (b_e[rows] @ a_e)


def refuse_on_disk_only(keys, shapes: dict, model_type: str | None, method: str) -> None:
    """Refuse an injected adapter keyed by a tensor transformers fuses or renames on load (one
    expert's w1, Mixtral's ``block_sparse_moe.gate``): no module of the loaded model has that
    name, so neither ``peftcli train`` nor PEFT could load it."""
    from peftcli.errors import UsageError
    from peftcli.methods.base import PEFT_PREFIX

    _, moved, _ = loaded_shapes(shapes, model_type)
    disk = {name for loaded in moved.values() for group in loaded.disk for name in group}
    if not disk:
        return
    modules = {n.removesuffix(".weight") for n in disk}
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX)
        module = next((m for m in modules if name == m + ".weight" or name.startswith(m + ".")), None)
        if module is not None:
            raise UsageError(
                f"{method} on {module}: this {model_type} checkpoint stores it one expert at a time, and transformers "
                "fuses (or renames) it on load, so the adapter would name a module neither `peftcli train` nor PEFT finds",
                "leave the experts out of `targets` (e.g. `targets` q_proj,v_proj); LoRA can adapt them as "
                "`target_parameters` experts.gate_up_proj,experts.down_proj",
            )
