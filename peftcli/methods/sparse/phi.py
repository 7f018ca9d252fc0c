"""A sparse φ on base tensors (LT-SFT, diff-pruning): its adapter layout, attaching and folding.

Layout in ``adapter_model.safetensors``: for each base tensor W with selected entries,
``W.idx`` (sorted unique flat indices, int64) and ``W.val`` (fp32 values of θ − θ₀ there),
keyed by the base tensor's name — the same two names a ``.diff`` uses. Before training has
selected the entries (phase 1 of LT-SFT or diff-pruning), the adapter holds no such pair.

Training the K entries with O(K) optimizer state: each selected entry set is one fp32
Parameter of K_W values, the only thing the optimizer sees. The base tensor keeps its
storage; a forward pre-hook writes θ₀ + values into its selected entries (O(K) per forward),
and the base tensor carries the gradient (``requires_grad``) only until it has accumulated:
a post-accumulate hook gathers the K_W entries into the values' gradient and frees the dense
one at once, so a dense gradient lives for one tensor at a time, never for the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.artifacts.sparse_diff import index_problem as diff_index_problem
from peftcli.errors import BadInputError
from peftcli.methods.base import Attached, mismatch_error

if TYPE_CHECKING:
    import torch

IDX, VAL = ".idx", ".val"


def pairs(tensors: dict) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """{base tensor name: (idx, val)} of an adapter's tensors; other keys (a head) are left out."""
    out = {}
    for key in tensors:
        if key.endswith(IDX):
            name = key[: -len(IDX)]
            if name + VAL not in tensors:
                raise BadInputError(f"sparse adapter: {key} has no {name + VAL}", "the adapter file is incomplete")
            out[name] = (tensors[key], tensors[name + VAL])
    orphans = [k for k in tensors if k.endswith(VAL) and k[: -len(VAL)] not in out]
    if orphans:
        raise BadInputError(f"sparse adapter: {orphans[0]} has no {orphans[0][: -len(VAL)] + IDX}", "the adapter file is incomplete")
    return out


def is_selected(tensors: dict) -> bool:
    """Whether training has chosen the entries yet (phase 1 done)."""
    return any(k.endswith(IDX) for k in tensors)


def index_problem(name: str, idx: "torch.Tensor", val: "torch.Tensor", numel: int) -> str | None:
    """Why ``idx``/``val`` cannot be a sparse φ of a tensor with ``numel`` entries, or None."""
    import torch

    if idx.dtype not in (torch.int32, torch.int64) or idx.ndim != 1:
        return f"{name}{IDX}: must be a 1-D int32/int64 tensor"
    if val.ndim != 1 or val.numel() != idx.numel():
        return f"{name}: {idx.numel()} indices but {val.numel()} values"
    problem = diff_index_problem(idx, numel)
    return f"{name}{IDX}: {problem}" if problem else None


def stored_deltas(tensors: dict, ckpt) -> dict:
    """ΔW of each base tensor with entries: zeros but for ``val`` at ``idx`` (what merge adds)."""
    import torch

    problems, deltas = [], {}
    for name, (idx, val) in pairs(tensors).items():
        info = ckpt.tensors.get(name)
        if info is None:
            problems.append(f"{name}: no such tensor in the base")
            continue
        problem = index_problem(name, idx, val, info.numel)
        if problem:
            problems.append(problem)
            continue

        def delta(stored, idx=idx, val=val, shape=tuple(info.shape)):
            out = torch.zeros(stored.numel(), dtype=torch.float32)
            out[idx.long()] = val.float()
            return out.view(shape)

        deltas[name] = delta
    if problems:
        raise mismatch_error(problems)
    return deltas


def attach_sparse(model, tensors: dict) -> Attached:
    """Put a selected sparse φ into ``model`` (see the module docstring); φ = the value vectors."""
    import torch

    from peftcli import modules as mod

    problems: list[str] = []
    found = []
    owners: dict[int, str] = {}
    for name, (idx, val) in pairs(tensors).items():
        module_path, _, attr = name.rpartition(".")
        real = mod.resolve(model, module_path) if module_path else None
        module = model.get_submodule(real) if real is not None else None
        param = module._parameters.get(attr) if module is not None else None
        if param is None:
            problems.append(f"{name}: no such parameter in the base")
            continue
        problem = index_problem(name, idx, val, param.numel())
        if problem:
            problems.append(problem)
        elif id(param) in owners:
            problems.append(f"{name}: the same parameter as {owners[id(param)]}")
        else:
            owners[id(param)] = name
            found.append((name, module, attr, param, idx.long(), val))
    if problems:
        raise mismatch_error(problems)

    phi: dict[str, torch.nn.Parameter] = {}
    carriers: list[torch.nn.Parameter] = []
    indices: dict[str, torch.Tensor] = {}
    for name, module, attr, param, idx, val in found:
        # Registered on the owning module, so .to(device) moves them with the model.
        values = torch.nn.Parameter(val.detach().float().clone())
        module.register_parameter(f"{attr}_sparse_values", values)
        module.register_buffer(f"{attr}_sparse_idx", idx.clone(), persistent=False)
        module.register_buffer(f"{attr}_sparse_theta0", param.detach().reshape(-1)[idx].float().clone(), persistent=False)
        module.register_forward_pre_hook(_writer(attr))
        param.requires_grad_(True)  # registering the hook needs it; attach_adapter keeps it on
        param.register_post_accumulate_grad_hook(_gatherer(module, attr))
        phi[name + VAL] = values
        indices[name + IDX] = getattr(module, f"{attr}_sparse_idx")
        carriers.append(param)
        _write(module, attr)  # θ₀ + φ from the start, also for code that reads the weight directly

    def export() -> dict[str, torch.Tensor]:
        return {**{k: v for k, v in indices.items()}, **{k: p.detach() for k, p in phi.items()}}

    # The indices are part of φ's layout but not trained: "derived", as attach_adapter calls it.
    return Attached(phi=phi, export=export, derived=frozenset(indices), extras={"grad_carriers": carriers})


def _write(module, attr: str) -> None:
    import torch

    param = module._parameters[attr]
    idx = getattr(module, f"{attr}_sparse_idx")
    theta = getattr(module, f"{attr}_sparse_theta0") + getattr(module, f"{attr}_sparse_values").detach()
    with torch.no_grad():
        param.view(-1).index_copy_(0, idx, theta.to(param.dtype))


def _writer(attr: str):
    def hook(module, args):
        _write(module, attr)

    return hook


def _gatherer(module, attr: str):
    def hook(param) -> None:
        values = getattr(module, f"{attr}_sparse_values")
        g = param.grad.reshape(-1)[getattr(module, f"{attr}_sparse_idx")].float()
        values.grad = g if values.grad is None else values.grad + g
        param.grad = None  # the dense gradient lives for this one tensor only

    return hook
