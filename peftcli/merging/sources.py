"""What a merge input contributes: for each base tensor it touches, its task vector φ.

φ is fp32, or fp64 for an F64 base tensor (``dtypes.work_dtype``): a dtype that holds the base's
values exactly. A full checkpoint's tensors of other dtypes (integers, bool, FP8) cannot be
merged: the input lists them as ``fixed``, to be checked equal to the base's as they are copied.

Three kinds of input, all opened lazily and read one tensor at a time:
- a ``.diff`` (checked against the base's fingerprint): φ scattered from idx/val or dense;
- an adapter directory whose method folds (``method.folds``; ``peftcli.methods.foldable()``): φ = ΔW from
  the method's ``deltas``, computed from the base tensor;
- a full checkpoint with the base's tensors: φ = θ_ft − θ₀, read in lockstep with the base.

Each may carry a task head (``peftcli.heads.TaskHead``): a classification run's
``modules_to_save`` head, a ``.diff``'s ``task_head``, or the head of a full checkpoint that is
the base's architecture with a head (whose body is then compared with the base name by name).

``deltas`` gives a tensor's whole φ from the whole base tensor. Diffs and checkpoints also give
it in flat element ranges (``streams``), so the merge never holds more than a range of a large
tensor: a ``Stream`` computes φ[start:stop] from the base's values in that range with exactly
the operations ``deltas`` applies to every element, so both give the same bits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftcli.artifacts.adapter_dir import ADAPTER_CONFIG, LazyTensors, read_adapter, replaced_modules
from peftcli.artifacts.sparse_diff import check_base, read_diff
from peftcli.checkpoint.dtypes import torch_dtype, work_dtype
from peftcli.checkpoint.fingerprint import file_sha256, summarize_differences, table_differences, tensor_table
from peftcli.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint
from peftcli.errors import BadInputError, UsageError
from peftcli.heads import TaskHead, build_head_model, label_names, match_head_checkpoint
from peftcli.methods.base import Replacement

MERGED_DTYPES = ("F16", "BF16", "F32", "F64")  # what a merge computes with; other tensors pass through unchanged


class Stream:
    """One input's φ for one base tensor, a flat element range at a time.

    ``read`` is where the input's own bytes of the tensor are, ``(file, offset, dtype)``, or
    None when it needs none per range. The merge reads bytes ``[offset + start·size, offset +
    stop·size)`` of that file and hands them to ``phi`` as ``raw``.
    """

    read: tuple[str, int, str] | None = None

    def phi(self, start: int, stop: int, base: torch.Tensor, raw: torch.Tensor | None, out: torch.Tensor) -> None:
        """Write φ[start:stop] into ``out`` (the work dtype: fp64 for F64 bases, else fp32).

        ``base`` holds the base's values in that range: fp32 for F16/BF16/F32 bases (an exact
        upcast) and as stored otherwise.
        """
        raise NotImplementedError


@dataclass
class Source:
    path: str
    kind: str  # "diff" | "adapter" | "checkpoint"
    deltas: dict[str, Callable[[torch.Tensor], torch.Tensor]]  # base tensor name -> φ from the base tensor
    hashes: dict[str, str] = field(default_factory=dict)  # weight file -> sha256
    close: Callable[[], None] = lambda: None
    head: TaskHead | None = None  # a trained task head, named as in the head model
    head_values: Callable[[str], torch.Tensor] | None = None  # its tensors' values, by name
    streams: dict[str, Callable[[], Stream]] = field(default_factory=dict)  # names with a ranged φ -> opener
    # A full checkpoint's tensors that no merge can change (integers, bool, FP8, F4/F6): they must
    # equal the base's byte for byte, or the merge would drop the fine-tune's change.
    fixed: dict[str, TensorInfo] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None  # a full checkpoint input, to read ``fixed`` tensors whole


def open_source(
    path: str, base: Checkpoint, allow_pickle: bool = False, sha256: Callable[[str], str] = file_sha256,
    reindex: Callable[[Checkpoint], Checkpoint] | None = None,
) -> Source:
    """Open merge input ``path`` against ``base``; every mismatch is a one-line error.

    ``sha256`` hashes a weight file for provenance (a ``Hasher``'s, to get hashes computed ahead).
    ``reindex`` wraps a full checkpoint's reader (``merging.vocab``: its rows in the output's token order).
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        return _adapter_source(path, base, sha256)
    if path.endswith(".diff"):
        return _diff_source(path, base, sha256)
    return _checkpoint_source(path, base, allow_pickle, sha256, reindex)


def refuse_unmergeable(source: Source, base: Checkpoint) -> None:
    """Refuse an input that changes a tensor no merge computes with (an adapter on an FP8 or integer weight)."""
    for name in source.deltas:
        dtype = base.tensors[name].dtype
        if dtype not in MERGED_DTYPES:
            raise BadInputError(
                f"{source.path} changes {name!r}, a {dtype} tensor: peftcli merges only F16, BF16, F32 and F64 tensors exactly",
                "use a base whose changed tensors are floating-point (dequantize it first)",
            )


def _hashes(files: list[str], sha256: Callable[[str], str]) -> dict[str, str]:
    return {os.path.basename(f): sha256(f) for f in files}


class _DiffStream(Stream):
    def __init__(self, load: Callable[[], tuple[torch.Tensor | None, torch.Tensor]]):
        self._load = load  # read at the first range: a merge plans every tensor before it starts
        self.idx = self.val = None

    def phi(self, start, stop, base, raw, out) -> None:
        if self.val is None:
            self.idx, val = self._load()
            self.val = val.reshape(-1)
        if self.idx is None:
            out.copy_(self.val[start:stop])  # .float() of that range
            return
        lo, hi = (int(i) for i in torch.searchsorted(self.idx, torch.tensor([start, stop], dtype=self.idx.dtype)))
        out.zero_()
        out[self.idx[lo:hi].long() - start] = self.val[lo:hi].to(out.dtype)


def _diff_source(path: str, base: Checkpoint, sha256: Callable[[str], str] = file_sha256) -> Source:
    diff = read_diff(path)
    # The content hash too, when the diff has one: a diff of another base with the same
    # architecture has the same tensor table but would merge into silently wrong weights.
    check_base(diff, base, content=diff.fingerprint.content is not None)

    def delta(name: str):
        def compute(stored: torch.Tensor) -> torch.Tensor:
            idx, val = diff.get(name)
            work = work_dtype(stored.dtype)
            if idx is None:
                return val.to(work)
            phi = torch.zeros(stored.numel(), dtype=work)
            phi[idx.long()] = val.to(work)
            return phi.view(stored.shape)

        return compute

    def stream(name: str):
        return lambda: _DiffStream(lambda: diff.get(name))

    names = diff.names
    return Source(
        path, "diff", {n: delta(n) for n in names}, _hashes([path], sha256), diff.close,
        streams={n: stream(n) for n in names}, head=diff.task_head, head_values=diff.get_head,
    )


def _adapter_source(path: str, base: Checkpoint, sha256: Callable[[str], str] = file_sha256) -> Source:
    from peftcli.methods import ROUNDS, foldable_hint, method_for_adapter_config

    adapter = read_adapter(path, lazy=True)
    method = method_for_adapter_config(adapter.config, path)
    if method.schedule == ROUNDS:
        raise UsageError(
            f"{path}: a lottery run is not an adapter: its result is the checkpoint {os.path.join(path, 'ticket')}",
            "use that directory as a model (it is θ ∘ m already), or as a fine-tuned input to merge",
        )
    if not method.folds:
        raise UsageError(
            f"{path}: {method.name} adds computation (new modules or inputs) that no weight change reproduces",
            foldable_hint(),
        )
    from peftcli.methods.base import PEFT_PREFIX

    tensors = adapter.tensors
    assert isinstance(tensors, LazyTensors)  # read_adapter(lazy=True)
    heads = {}
    for head in adapter.config.get("modules_to_save") or []:
        for key in tensors:
            if key.startswith(f"{PEFT_PREFIX}{head}."):
                heads[key[len(PEFT_PREFIX) :]] = tensors[key]
    cfg = method.config_from_adapter(adapter.config)
    phi = tensors.subset([k for k in tensors if k[len(PEFT_PREFIX) :] not in heads])
    deltas = _streamed_deltas(method, cfg, phi, base)
    # A saved module with the base's own tensor names (an lm_head trained whole) replaces them.
    replaced = replaced_modules(adapter.config, tensors, base.tensors)
    heads = {n: t for n, t in heads.items() if n not in replaced}
    deltas.update({n: Replacement(lambda stored, t=t: t) for n, t in replaced.items()})  # written as saved
    weights = os.path.join(path, "adapter_model.safetensors")
    head = adapter_head(path, heads, base) if heads else None
    return Source(path, "adapter", deltas, _hashes([weights], sha256), head=head, head_values=heads.__getitem__)


# -- folding an adapter one target at a time -------------------------------------------------------
# A method's ``deltas`` checks every module's tensors (names, shapes, a finite scaled ΔW) and returns
# folds that hold them. Called on the whole adapter, that is the adapter in memory for the whole
# merge (a rank-64 LoHa of a 7B model: 261 MiB). So ``deltas`` is called on one module's tensors at
# a time (plus the tensors of no module, such as VeRA's shared projections): once up front, to
# check them all before anything is written, and again when the merge folds that target, reading
# the tensors anew. Where a module's own call refuses what the whole call might accept (a check
# across modules), the whole call decides, as before: its error, or its folds (then held).


def _module_groups(keys, base: Checkpoint) -> tuple[dict[str, list[str]], list[str]]:
    """Adapter keys by the base module they sit under (the longest prefix of the key after PEFT's
    prefix that is a module holding base tensors, or ends one: GPT-2's ``transformer.h.0…``
    is the base's ``h.0…``; a key that is a base tensor's name is its own), and the keys under no
    such module (shared by every module)."""
    from peftcli.methods.base import PEFT_PREFIX

    modules = {n.rsplit(".", 1)[0] for n in base.tensors if "." in n}
    groups: dict[str, list[str]] = {}
    shared: list[str] = []
    for key in keys:
        parts = key[len(PEFT_PREFIX) :].split(".") if key.startswith(PEFT_PREFIX) else []
        module = key if key in base.tensors else None  # in-place methods (BitFit, layers) save θ by the base's names
        for end in range(len(parts) - 1, 0, -1):
            if any(".".join(parts[start:end]) in modules for start in range(end)):
                module = ".".join(parts[:end])
                break
        (groups.setdefault(module, []) if module is not None else shared).append(key)
    return groups, shared


def _streamed_deltas(method, cfg, tensors: LazyTensors, base: Checkpoint) -> dict:
    """``method.deltas(cfg, tensors, base)``, each fold reading its own module's tensors when
    called (``tensors`` is a ``LazyTensors``); every module's tensors are checked now."""
    from peftcli.errors import PeftcliError

    groups, shared = _module_groups(list(tensors), base)
    held = {k: tensors[k] for k in shared}  # VeRA's shared projections: small, and every module's
    subsets = [tensors.subset(keys + shared, held) for keys in groups.values()]
    owner: dict[str, tuple[LazyTensors, bool]] = {}
    try:
        for sub in subsets:
            for name, replaces in _checked(method, cfg, sub, base).items():
                if name in owner:
                    raise _Fallback
                owner[name] = (sub, replaces)
    except (PeftcliError, _Fallback):
        return method.deltas(cfg, dict(tensors.items()), base)  # the whole adapter: its error, or its folds
    if not groups:
        return method.deltas(cfg, dict(tensors.items()), base)
    return {name: _fold_on_demand(method, cfg, sub, base, name, replaces) for name, (sub, replaces) in owner.items()}


def _checked(method, cfg, sub, base: Checkpoint) -> dict[str, bool]:
    """The targets of one module's tensors (and whether each is new values), checked; its folds,
    and the tensors they hold, are dropped on return."""
    return {name: isinstance(fold, Replacement) for name, fold in method.deltas(cfg, sub, base).items()}


class _Fallback(Exception):
    """Two modules' tensors fold into one target: the whole adapter's call decides."""


def _fold_on_demand(method, cfg, sub, base: Checkpoint, name: str, replaces: bool):
    """The fold of target ``name``, reading its module's tensors only when it is called."""

    def values(stored):
        return method.deltas(cfg, sub, base)[name].values(stored)

    if replaces:
        return Replacement(values)
    return lambda stored: method.deltas(cfg, sub, base)[name](stored)


def adapter_head(path: str, heads: dict[str, torch.Tensor], base: Checkpoint) -> TaskHead:
    """The head a classification run trained (``modules_to_save``), with the labels of its labels.json."""
    from peftcli.checkpoint.dtypes import safetensors_dtype

    if base.directory is None or base.config is None:
        raise UsageError("merging a task head needs a base model directory (with config.json)", "pass the base directory")
    weight = next((t for n, t in sorted(heads.items()) if n.endswith(".weight") and t.dim() == 2), None)
    if weight is None:
        raise BadInputError(f"{path}: the adapter's saved head has no weight matrix", "the adapter is incomplete; pass one written whole by peftcli train")
    model = build_head_model(base, int(weight.shape[0]))
    if model is None:
        raise BadInputError(f"{path}: the base has no sequence-classification model for the adapter's head", "merge it into the base it was trained on")
    labels = None
    labels_path = os.path.join(path, "labels.json")
    if os.path.isfile(labels_path):
        from peftcli.checkpoint.reader import load_json

        labels = load_json(labels_path, "labels").get("labels")
    if not (isinstance(labels, list) and len(labels) == weight.shape[0] and all(isinstance(x, str) for x in labels)):
        labels = label_names(None, int(weight.shape[0]))
    tensors = {n: (safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in heads.items()}
    return TaskHead(model.architecture, tensors, labels)


class _CheckpointStream(Stream):
    def __init__(self, info: TensorInfo):
        self.read = (info.file, info.begin, info.dtype)
        self.dtype = torch_dtype(info.dtype)

    def phi(self, start, stop, base, raw, out) -> None:
        ft = raw.view(self.dtype)
        if ft.dtype == base.dtype == out.dtype:
            torch.sub(ft, base, out=out)  # one pass (F32 or F64)
        else:
            out.copy_(ft)  # .float()
            out.sub_(base)


def _checkpoint_source(
    path: str, base: Checkpoint, allow_pickle: bool, sha256: Callable[[str], str] = file_sha256, reindex=None,
) -> Source:
    whole = open_checkpoint(path, allow_pickle=allow_pickle)
    whole = reindex(whole) if reindex else whole
    try:
        headed = match_head_checkpoint(base, whole) if set(whole.tensors) != set(base.tensors) else None
    except BaseException:
        whole.close()
        raise
    # A classifier of the base: its body under the base's names; the base tensors its head model
    # has no place for (a causal LM's lm_head) are left as they are.
    ft = headed.body if headed else whole
    mine = tensor_table(base)
    if headed:
        mine = {n: t for n, t in mine.items() if n not in set(headed.dropped)}
    differences = table_differences(mine, tensor_table(ft), "the base", path)
    if differences:
        whole.close()
        raise BadInputError(f"{path} does not have the base's tensors: {summarize_differences(differences)}", "merge fine-tunes of this base only")

    def delta(name: str):
        def compute(stored: torch.Tensor) -> torch.Tensor:
            phi = ft.get(name).to(work_dtype(stored.dtype))
            return phi.sub_(stored)  # upcasts stored element by element: no second copy

        return compute

    floating = [t.name for t in base.tensors.values() if t.dtype in MERGED_DTYPES and t.name in ft.tensors]
    fixed = {t.name: ft.tensors[t.name] for t in base.tensors.values() if t.dtype not in MERGED_DTYPES and t.name in ft.tensors}
    streams = {n: (lambda info=ft.tensors[n]: _CheckpointStream(info)) for n in floating if ft.tensors[n].begin is not None}
    return Source(
        path, "checkpoint", {n: delta(n) for n in floating}, _hashes(ft.files, sha256), whole.close, streams=streams,
        fixed=fixed, checkpoint=ft, head=headed.head if headed else None, head_values=whole.get if headed else None,
    )
