"""Merging inputs that carry a task head: the output is the head model's checkpoint, one per task.

A classification run trains φ on the base plus a new head (``classifier`` for BERT, ``score``
for Llama and GPT-2); a classifier's ``.diff`` or full checkpoint carries its head too
(``peftcli.heads``). Folding φ alone would lose the head, so the merged output is a checkpoint
of the head model (``BertForSequenceClassification`` ...): the merged body under that model's
names (``bert.encoder...``), minus the base tensors it has no place for (a causal LM's
``lm_head``), plus the head, and a config.json naming the class and its labels.

Heads group into tasks: by default each input is its own task (equal labels do not make one
task: SST-2 and RTE are both 0/1); with ``--heads average`` the inputs are one task trained
several times and their heads (``TaskHead.same_task``: class, tensor names and shapes,
labels) are averaged, weighted by the merge's λᵢ (one input's head is taken as it is,
whatever its λ). One task: ``-o DIR`` is that head model. Several tasks (2
and 4 labels, say): ``DIR`` holds one complete head model per task, ``DIR/<task>/``, named after
the first input of the task (its file name without ``.diff``; ``-2``, ``-3`` ... on repeats).
Every task directory holds the same merged body in the same shard files, copy-on-write clones
of the first task's where the file system has them (copies otherwise, never hard links), and
its head in a last shard of its
own, with the index, config.json and tokenizer files of that task.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftcli.checkpoint.atomic import open_new_file
from peftcli.checkpoint.dtypes import torch_dtype
from peftcli.checkpoint.reader import SAFETENSORS_INDEX, Checkpoint
from peftcli.checkpoint.writer import SafetensorsStreamWriter, TensorSpec, copy_model_files, shard_name
from peftcli.errors import BadInputError, UsageError
from peftcli.merging.ranged import check_finite
from peftcli.heads import HeadModel, TaskHead, head_config_json, head_model_for

Values = Callable[[str], torch.Tensor]  # a head tensor's values, by name


@dataclass
class Task:
    """One task of the output: its head and the inputs that carry it (index, values, λ)."""

    name: str
    head: TaskHead
    members: list[tuple[int, Values]] = field(default_factory=list)

    def value(self, name: str, lam: list[float], dtype: str | None) -> torch.Tensor:
        """The task's head tensor ``name``: one input's as it is, several inputs' λ-weighted mean."""
        out_dtype = torch_dtype(dtype or self.head.tensors[name][0])
        if len(self.members) == 1:
            return self.members[0][1](name).to(out_dtype).contiguous()
        weights = [lam[i] for i, _ in self.members]
        if sum(weights) == 0:
            raise UsageError(
                f"the weights of the inputs with task {self.name}'s head add up to 0: their mean head is undefined",
                "give inputs of one task weights with a nonzero sum",
            )
        values = [v(name) for _, v in self.members]
        work = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
        total = torch.zeros(values[0].shape, dtype=work)
        for w, v in zip(weights, values):
            total.add_(v.to(work), alpha=w)
        return total.div_(sum(weights)).to(out_dtype).contiguous()


@dataclass
class HeadPlan:
    model: HeadModel  # where each base tensor goes (the same for every task)
    tasks: list[Task]

    @property
    def multi(self) -> bool:
        return len(self.tasks) > 1


def plan_heads(base: Checkpoint, sources: list, mode: str = "each") -> HeadPlan | None:
    """The tasks of the inputs that carry a head (``Source.head``); None when none does.

    ``each``: every input is a task of its own, whatever its labels (SST-2 and RTE both have
    the labels 0 and 1; averaging their heads would give a classifier for neither). ``average``:
    the user says the inputs are one task trained several times: their heads are averaged,
    and heads that cannot be (another class, shape or label set) are an error."""
    tasks: list[Task] = []
    model = None
    for i, s in enumerate(sources):
        if s.head is None:
            continue
        this = head_model_for(base, s.head)
        if model is not None and this.rename != model.rename:
            raise BadInputError(
                f"{s.path}: its head model {this.architecture} keeps other base tensors than {model.architecture}",
                "merge heads of head models that share the base's body",
            )
        model = model or this
        task = tasks[0] if mode == "average" and tasks else None
        if task is not None and not task.head.same_task(s.head):
            raise BadInputError(
                f"{s.path}: its head ({s.head.architecture}, labels {s.head.labels}) is not of the same task as "
                f"{sources[task.members[0][0]].path}'s (labels {task.head.labels}): `heads` average cannot average them",
                "use `heads` each for one model per input",
            )
        if task is None:
            tasks.append(task := Task("", s.head))
        task.members.append((i, s.head_values))
    if not tasks:
        return None
    for task, name in zip(tasks, task_names([sources[t.members[0][0]].path for t in tasks])):
        task.name = name
    return HeadPlan(model, tasks)


def task_names(paths: list[str]) -> list[str]:
    """A directory name per input: its file name without ``.diff``/``.safetensors``, made unique."""
    names: list[str] = []
    for path in paths:
        stem = os.path.basename(os.path.normpath(path))
        for suffix in (".diff", ".safetensors"):
            if stem.endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
        if stem in ("", ".", "..") or stem.startswith("."):
            stem = "task" + stem
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def config_json(base: Checkpoint, head: TaskHead, dtype: str | None) -> bytes:
    """config.json of a task's head model (in ``dtype`` when the merge casts)."""
    config = head_config_json(base, head)
    return (json.dumps(with_dtype(config, dtype), indent=2, sort_keys=True) + "\n").encode()


def with_dtype(config: dict, dtype: str | None) -> dict:
    if dtype is not None:
        name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}[dtype]
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = name
    return config


def head_specs(task: Task, dtype: str | None) -> list[TensorSpec]:
    return [TensorSpec(n, dtype or d, s) for n, (d, s) in sorted(task.head.tensors.items())]


def write_sibling(
    first: str, dest: str, task: Task, lam: list[float], dtype: str | None, metadata: dict, config: bytes,
    source_dir: str | None, body_bytes: int,
) -> None:
    """Task directory ``dest``: ``first``'s body shards (clones, else copies) and ``task``'s head shard."""
    with open(os.path.join(first, SAFETENSORS_INDEX), encoding="utf-8") as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    head_file = shard_name(len(files) - 1, len(files))  # the last shard: the head's own
    os.mkdir(dest)
    for name in files:
        if name != head_file:
            _clone_or_copy(os.path.join(first, name), os.path.join(dest, name))
    specs = head_specs(task, dtype)
    with open_new_file(os.path.join(dest, head_file)) as f:
        writer = SafetensorsStreamWriter(f, specs, metadata, atomic=True)
        for spec in specs:
            value = task.value(spec.name, lam, dtype)
            check_finite(spec.name, value)
            writer.write(spec.name, value)
        writer.finish()
        os.fsync(f.fileno())
    body = {n: file for n, file in weight_map.items() if file != head_file}
    index = {
        "metadata": {"total_size": body_bytes + sum(s.nbytes for s in specs)},
        "weight_map": {**body, **{s.name: head_file for s in specs}},
    }
    _write_new(os.path.join(dest, SAFETENSORS_INDEX), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    if source_dir:
        copy_model_files(source_dir, dest)
    if os.path.exists(os.path.join(dest, "config.json")):
        os.unlink(os.path.join(dest, "config.json"))
    _write_new(os.path.join(dest, "config.json"), config)


_FICLONE = 0x40049409  # Linux ioctl: dest shares src's extents copy-on-write (btrfs, XFS)


def _clone_or_copy(src: str, dest: str) -> None:
    """The body shard of the first task for another task: a copy-on-write clone where the file
    system has them, else a plain copy. Never a hard link: a later in-place rewrite of one task's
    shard (``save_pretrained(out/A)`` truncates and rewrites the same file) would silently change
    every other task's model too."""
    import fcntl

    with open(src, "rb") as fin, open_new_file(dest) as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        except OSError:  # EOPNOTSUPP / EXDEV / EINVAL: no sharing here, copy the bytes
            shutil.copyfileobj(fin, fout, 8 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _write_new(path: str, data: bytes) -> None:
    with open_new_file(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
