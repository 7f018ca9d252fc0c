"""Tensor level: converting φ between artifact kinds.

- adapter → ``.diff``: the adapter's ΔW (its method's ``deltas``, exact for LoRA, DoRA, IA³,
  BitFit, layers) written dense or selected by the same exact top-K as ``peftcli diff``; a
  classification run's trained head goes whole into the diff's ``task_head``;
- ``.diff`` → LoRA adapter: per linear weight, the best rank-r approximation of φ (truncated
  SVD, Eckart–Young), B = U·√S, A = √S·Vᵀ, α = r so the scale is 1; the report gives the
  share of ‖φ‖² each tensor keeps, and the tensors a LoRA cannot carry (biases, norms,
  embeddings) with their share.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from peftcli import __version__
from peftcli.checkpoint.atomic import check_output_path
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.diffing import DiffOptions
from peftcli.errors import BadInputError, UsageError
from peftcli.options import check_declared, from_options, option, option_fields

TARGETS = ("diff", "lora")


@dataclass
class ConvertOptions:
    """The options of ``peftcli convert`` (and of a recipe's convert step).

    ``diff``: the selection of ``--to diff``, given as ``DiffOptions``' fields by name (a mapping,
    None or False where not given) and built into a ``DiffOptions`` here; with ``--to lora`` none
    may be given."""

    target: str | None = option(None, help="What to convert SOURCE into.", flag="--to", choices=TARGETS, required=True)
    base: str | None = option(None, help="The base checkpoint (default: the one SOURCE records).", path=True)
    rank: int = option(16, "-r", help="LoRA rank of the SVD extraction (--to lora).", show_default=True)
    force: bool = option(False, help="Replace OUTPUT if it exists.")
    allow_pickle: bool = option(False, help="Allow a PyTorch .bin/.pt base (torch.load(weights_only=True)).")
    diff: DiffOptions | dict | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"`target` must be diff or lora, got {self.target!r}", "see `peftcli convert --help`")
        if isinstance(self.diff, dict):
            given = sorted(k for k, v in self.diff.items() if v not in (None, False))
            if self.target == "lora" and given:
                raise UsageError(f"`{given[0]}` only applies with `target` diff", "see `peftcli convert --help`")
            chosen = {k: (v if v is not False else None) for k, v in self.diff.items()}
            self.diff = from_options(DiffOptions, chosen) if self.target == "diff" else None
        elif self.diff is None and self.target == "diff":
            self.diff = DiffOptions()  # refuses: exactly one of --density, --top-k or --dense
        check_declared(self)


def convert_options(values: dict) -> ConvertOptions:
    """``ConvertOptions`` from the command line's values or a recipe step's keys."""
    return from_options(ConvertOptions, values, diff={f.name: values.get(f.name) for f in option_fields(DiffOptions)})


def convert(source: str, out: str, opts: ConvertOptions, *, progress=None):
    """Convert ``source`` as ``opts`` says: an adapter to a ``.diff``, or a ``.diff`` to a LoRA adapter."""
    if opts.target == "lora":
        return diff_to_lora(source, out, opts.rank, base=opts.base, force=opts.force, allow_pickle=opts.allow_pickle)
    return adapter_to_diff(source, out, opts.diff, base=opts.base, force=opts.force, progress=progress, allow_pickle=opts.allow_pickle)


class _FoldedAdapter:
    """A task-vector source for diff's selection: φ of each tensor from an adapter's deltas."""

    def __init__(self, path: str, deltas: dict, base):
        self.path, self._deltas, self._base = path, deltas, base

    def phi(self, name: str):
        import torch

        from peftcli.checkpoint.dtypes import work_dtype

        stored = self._base.get(name)
        phi = self._deltas[name](stored).to(work_dtype(stored.dtype)).reshape(-1)  # fp64 for F64, as diff
        if not bool(torch.isfinite(phi).all()):
            raise BadInputError(f"{self.path}: ΔW of {name!r} is not finite", "the adapter holds NaN or inf")
        return phi


def _base_of(path: str, base: str | None, recorded: str | None) -> str:
    chosen = base or recorded
    if not chosen or not os.path.exists(chosen):
        raise UsageError(f"{path}: the base checkpoint is needed and {chosen!r} is not there", "pass `base` DIR")
    return chosen


def adapter_to_diff(
    adapter_path: str, out: str, options, *, base: str | None = None, force: bool = False, progress=None, allow_pickle: bool = False,
):
    """Write the adapter's ΔW as a ``.diff`` (``options``: a ``peftcli.diffing.DiffOptions``)."""
    from peftcli.artifacts.sparse_diff import DiffMetadata, recorded_inputs, write_diff
    from peftcli.checkpoint.fingerprint import Fingerprint, file_hashes
    from peftcli.diffing import DiffReport, _entries
    from peftcli.merging.sources import open_source, refuse_unmergeable

    if not out.endswith(".diff"):
        raise UsageError(f"output {out} must be a .diff file", "name it e.g. lora.diff")
    from peftcli.artifacts.adapter_dir import read_adapter

    recorded = read_adapter(adapter_path).config.get("base_model_name_or_path")
    base = _base_of(adapter_path, base, recorded)
    check_output_path(out, [adapter_path, base], force)
    with open_checkpoint(base, allow_pickle=allow_pickle) as ckpt:
        source = open_source(adapter_path, ckpt)
        refuse_unmergeable(source, ckpt)  # a .diff holds floating-point tensors only
        covered = [ckpt.tensors[n] for n in sorted(source.deltas)]
        selected = [t for t in covered if options.dense or options.sparse_small or len(t.shape) >= 2]
        n = sum(t.numel for t in selected)
        if not n and not options.dense:
            raise UsageError(f"{adapter_path} changes no tensor with two or more dimensions", "use `dense`")
        k = options.k_for(n)
        folded = _FoldedAdapter(adapter_path, source.deltas, ckpt)
        provenance = {
            "tool": "peftcli", "version": __version__, "command": "convert",
            "inputs": recorded_inputs({"base": base, "adapter": adapter_path}, out),
            "input_hashes": {"base": file_hashes(ckpt), "adapter": source.hashes}, "options": dataclasses.asdict(options),
        }
        fingerprint = Fingerprint.of(ckpt, [t.name for t in covered])
        entries = _entries(ckpt, folded, covered, selected, k, options, progress)
        metadata = DiffMetadata(options.method, fingerprint, provenance, source.head)  # a trained head travels whole
        stored = write_diff(
            out, entries, metadata, values=options.values, force=force, inputs=[adapter_path, base], head_values=source.head_values,
        )
    head = source.head.to_json() if source.head else None
    return DiffReport(out, options.method, options.selection, options.values, stored, [], os.path.getsize(out), head)


@dataclass
class LoraExtraction:
    output: str
    rank: int
    tensors: list[dict] = field(default_factory=list)  # {name, shape, kept_energy}
    dropped: list[dict] = field(default_factory=list)  # {name, shape, energy_share}
    kept_energy: float = 0.0  # share of ‖φ‖² over all tensors the adapter keeps

    def to_json(self) -> dict:
        return {"schema": "peftcli.convert/1", "to": "lora", **dataclasses.asdict(self)}


def diff_to_lora(
    diff_path: str, out: str, rank: int, *, base: str | None = None, force: bool = False, allow_pickle: bool = False,
) -> LoraExtraction:
    """Write the best rank-``rank`` LoRA of the ``.diff``'s linear-layer φ as a PEFT adapter."""
    import torch

    from peftcli.artifacts.adapter_dir import write_adapter
    from peftcli.artifacts.sparse_diff import check_base, read_diff, resolve_recorded
    from peftcli.methods.base import peft_key
    from peftcli.targets import is_output_head, linear_modules

    if rank <= 0:
        raise UsageError(f"`rank` must be positive, got {rank}", "e.g. `rank` 16")
    with read_diff(diff_path) as diff:
        if diff.task_head is not None:  # dropping it would leave a classifier without its head
            raise UsageError(
                f"{diff_path} carries a task head ({diff.task_head.architecture}), which `target` lora does not convert",
                f"merge it instead: peftcli merge BASE {diff_path} -o DIR",
            )
        recorded = (diff.provenance or {}).get("inputs", {}).get("base") if isinstance(diff.provenance, dict) else None
        recorded = resolve_recorded(recorded, diff_path)
        base = _base_of(diff_path, base, recorded)
        check_output_path(out, [diff_path, base], force)
        with open_checkpoint(base, allow_pickle=allow_pickle) as ckpt:
            check_base(diff, ckpt)
            shapes = {t.name: t.shape for t in ckpt.tensors.values()}
            linear = {m.name + ".weight": m for m in linear_modules(shapes, ckpt.config) if not is_output_head(m, ckpt.config)}
            tensors, report, total, kept = {}, LoraExtraction(out, rank), 0.0, 0.0
            for name in diff.names:
                phi = diff.apply_to(name, torch.zeros(shapes[name], dtype=_dtype(ckpt, name))).float()
                if not bool(torch.isfinite(phi).all()):
                    raise BadInputError(f"{diff_path}: tensor {name!r} holds NaN or Inf", "the diff is corrupt: recompute it")
                energy = float(phi.pow(2).sum())
                total += energy
                m = linear.get(name)
                if m is not None and rank > min(m.shape):
                    raise UsageError(
                        f"`rank` {rank} is larger than min(out, in) = {min(m.shape)} of {name}",
                        "a rank above that cannot add anything",
                    )
                if m is None:
                    report.dropped.append({"name": name, "shape": list(shapes[name]), "energy": energy})
                    continue
                w = phi.T if m.transposed else phi  # [out, in]
                r = min(rank, *w.shape)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                root = s[:r].sqrt()
                tensors[peft_key(m.name, "lora_A.weight")] = (root.unsqueeze(1) * vh[:r]).contiguous()
                tensors[peft_key(m.name, "lora_B.weight")] = (u[:, :r] * root.unsqueeze(0)).contiguous()
                if r < rank:  # pad to the common rank PEFT needs: zero directions add nothing
                    a, b = tensors[peft_key(m.name, "lora_A.weight")], tensors[peft_key(m.name, "lora_B.weight")]
                    tensors[peft_key(m.name, "lora_A.weight")] = torch.cat([a, torch.zeros(rank - r, a.shape[1])])
                    tensors[peft_key(m.name, "lora_B.weight")] = torch.cat([b, torch.zeros(b.shape[0], rank - r)], dim=1)
                tensor_kept = float(s[:r].pow(2).sum())
                kept += tensor_kept
                report.tensors.append({"name": name, "shape": list(m.shape), "kept_energy": tensor_kept / energy if energy else 1.0})
            if not tensors:
                raise BadInputError(f"{diff_path} changes no linear layer a LoRA could carry", "convert only diffs of linear weights")
            for d in report.dropped:
                d["energy_share"] = d.pop("energy") / total if total else 0.0
            report.kept_energy = kept / total if total else 1.0
            modules = sorted(k[len("base_model.model.") : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
            config = {
                "peft_type": "LORA", "task_type": None, "base_model_name_or_path": os.path.abspath(base), "r": rank,
                "lora_alpha": rank, "target_modules": modules, "lora_dropout": 0.0,
                "fan_in_fan_out": any(linear[m + ".weight"].transposed for m in modules), "bias": "none", "use_dora": False,
                "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": False,
            }
            metadata = {"peftcli.version": __version__, "peftcli.method": "lora", "peftcli.converted_from": os.path.abspath(diff_path)}
            write_adapter(out, config, tensors, metadata=metadata, inputs=[diff_path, base], force=force)
    return report


def _dtype(ckpt, name: str):
    from peftcli.checkpoint.dtypes import torch_dtype

    return torch_dtype(ckpt.tensors[name].dtype)
