"""Tensor level: converting φ between artifact kinds (the SVD itself is ``peftcli.lowrank``).

- adapter → ``.diff``: the adapter's ΔW (its method's ``deltas``, exact for LoRA, DoRA, IA³,
  BitFit, layers) written dense or selected by the same exact top-K as ``peftcli diff``; a
  classification run's trained head goes whole into the diff's ``task_head``;
- ``.diff``, foldable adapter or fine-tuned checkpoint (θ_ft − θ₀, with its base) → LoRA
  adapter: per linear weight, the best rank-r approximation of ΔW (truncated SVD,
  Eckart–Young), B = U·√S, A = √S·Vᵀ, α = r so the scale is 1, r given or chosen per weight by
  the share of ‖ΔW‖² to keep; ΔW is made one tensor at a time, never for the whole model. The
  report gives the share of ‖ΔW‖² each tensor keeps, and the tensors a LoRA cannot carry
  (biases, norms, embeddings) with their share;
- several inputs → one LoRA (``merge --to-adapter``): per linear weight the merge method's
  combination of the ΔWᵢ (the registry's kernel with θ₀ = 0; linear, TIES, DARE...), factored
  the same way."""

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
DEFAULT_RANK = 16


@dataclass
class ConvertOptions:
    """The options of ``peftcli convert`` (and of a recipe's convert step).

    ``diff``: the selection of ``--to diff``, given as ``DiffOptions``' fields by name (a mapping,
    None or False where not given) and built into a ``DiffOptions`` here; with ``--to lora`` none
    may be given."""

    target: str | None = option(None, help="What to convert SOURCE into.", flag="--to", choices=TARGETS, required=True)
    base: str | None = option(None, help="The base checkpoint (default: the one SOURCE records).", path=True)
    rank: int | None = option(None, "-r", min=1, help=f"LoRA rank of the SVD extraction (--to lora; default {DEFAULT_RANK}).")
    energy: float | None = option(
        None, metavar="E", help="Instead of --rank: per weight the smallest rank keeping this share (0 < E ≤ 1) of ‖ΔW‖² (--to lora).",
    )
    force: bool = option(False, help="Replace OUTPUT if it exists.")
    allow_pickle: bool = option(False, help="Allow a PyTorch .bin/.pt base (torch.load(weights_only=True)).")
    diff: DiffOptions | dict | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"`target` must be diff or lora, got {self.target!r}", "see `peftcli convert --help`")
        self._check_lora()
        if isinstance(self.diff, dict):
            given = sorted(k for k, v in self.diff.items() if v not in (None, False))
            if self.target == "lora" and given:
                raise UsageError(f"`{given[0]}` only applies with `target` diff", "see `peftcli convert --help`")
            chosen = {k: (v if v is not False else None) for k, v in self.diff.items()}
            self.diff = from_options(DiffOptions, chosen) if self.target == "diff" else None
        elif self.diff is None and self.target == "diff":
            self.diff = DiffOptions()  # refuses: exactly one of --density, --top-k or --dense
        check_declared(self)


    def _check_lora(self) -> None:
        if self.target != "lora":
            given = next((k for k in ("rank", "energy") if getattr(self, k) is not None), None)
            if given:
                raise UsageError(f"`{given}` only applies with `target` lora", "see `peftcli convert --help`")
        elif self.rank is not None and self.energy is not None:
            raise UsageError("`rank` and `energy` are two ways to choose the rank: give one", "e.g. `rank` 16, or `energy` 0.9")
        elif self.energy is not None and not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            raise UsageError(f"`energy` must be in (0, 1], got {self.energy!r}", "e.g. `energy` 0.9 keeps 90% of ‖ΔW‖² per weight")


def convert_options(values: dict) -> ConvertOptions:
    """``ConvertOptions`` from the command line's values or a recipe step's keys."""
    return from_options(ConvertOptions, values, diff={f.name: values.get(f.name) for f in option_fields(DiffOptions)})


def convert(source: str, out: str, opts: ConvertOptions, *, progress=None):
    """Convert ``source`` as ``opts`` says: an adapter to a ``.diff``; a ``.diff``, a foldable adapter or
    a fine-tuned checkpoint (with ``opts.base``) to a LoRA adapter."""
    if opts.target == "lora":
        return to_lora(source, out, opts)
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
    rank: int  # the adapter's r: --rank, or the largest rank --energy chose
    source: str = "diff"  # diff | adapter | checkpoint
    energy: float | None = None  # --energy's target share, None with --rank
    tensors: list[dict] = field(default_factory=list)  # {name, shape, rank, kept_energy}
    dropped: list[dict] = field(default_factory=list)  # {name, shape, energy_share}
    kept_energy: float = 0.0  # share of ‖φ‖² over all tensors the adapter keeps

    def to_json(self) -> dict:
        return {"schema": "peftcli.convert/1", "to": "lora", **dataclasses.asdict(self)}


_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def source_kind(path: str) -> str:
    """What ``path`` is: a ``.diff``, an adapter directory or a full checkpoint; a directory that is both is refused."""
    if not os.path.exists(path):
        raise BadInputError(f"{path} does not exist", "give a .diff, an adapter directory or a fine-tuned checkpoint")
    if os.path.isdir(path):
        from peftcli.artifacts.adapter_dir import ADAPTER_CONFIG

        adapter = os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
        weights = [f for f in _MODEL_WEIGHTS if os.path.isfile(os.path.join(path, f))]
        if adapter and weights:
            raise UsageError(
                f"{path} is both an adapter directory ({ADAPTER_CONFIG}) and a model checkpoint ({weights[0]}): which to convert is ambiguous",
                "move the adapter's two files, or the model's, to a directory of their own",
            )
        return "adapter" if adapter else "checkpoint"
    return "diff" if path.endswith(".diff") else "checkpoint"


def to_lora(source: str, out: str, opts: ConvertOptions) -> LoraExtraction:
    """Write the best LoRA (by ``opts.rank`` or ``opts.energy``) of ``source``'s per-linear-weight ΔW."""
    from peftcli.artifacts.sparse_diff import read_diff, resolve_recorded

    kind = source_kind(source)
    if kind == "diff":
        with read_diff(source) as diff:
            recorded = (diff.provenance or {}).get("inputs", {}).get("base") if isinstance(diff.provenance, dict) else None
            base = _base_of(source, opts.base, resolve_recorded(recorded, source))
            check_output_path(out, [source, base], opts.force)
            with open_checkpoint(base, allow_pickle=opts.allow_pickle) as ckpt:
                return _write_lora(source, kind, out, opts, ckpt, _diff_items(source, diff, ckpt))
    if kind == "adapter":
        from peftcli.artifacts.adapter_dir import read_adapter

        base = _base_of(source, opts.base, read_adapter(source).config.get("base_model_name_or_path"))
    elif opts.base is None:
        raise UsageError(f"{source} is a full checkpoint: extracting a LoRA from it needs the base it was fine-tuned from", "pass `base` DIR")
    else:
        base = _base_of(source, opts.base, None)
    check_output_path(out, [source, base], opts.force)
    with open_checkpoint(base, allow_pickle=opts.allow_pickle) as ckpt:
        return _write_lora(source, kind, out, opts, ckpt, _folded_items(source, kind, ckpt, opts.allow_pickle))


def _diff_items(path: str, diff, ckpt):
    """φ of each tensor of a ``.diff``, one at a time."""
    import torch

    from peftcli.artifacts.sparse_diff import check_base

    if diff.task_head is not None:  # dropping it would leave a classifier without its head
        raise UsageError(
            f"{path} carries a task head ({diff.task_head.architecture}), which `target` lora does not convert",
            f"merge it instead: peftcli merge BASE {path} -o DIR",
        )
    check_base(diff, ckpt)
    for name in diff.names:
        yield name, lambda name=name: diff.apply_to(name, torch.zeros(ckpt.tensors[name].shape, dtype=_dtype(ckpt, name))).float()


def _folded_items(path: str, kind: str, ckpt, allow_pickle: bool):
    """ΔW of each tensor an adapter (its method's ``deltas``) or a fine-tune (θ_ft − θ₀) changes, one at a time."""
    from peftcli.merging.sources import open_source, refuse_unmergeable

    source = open_source(path, ckpt, allow_pickle=allow_pickle)
    try:
        if source.head is not None:
            raise UsageError(
                f"{path} carries a task head ({source.head.architecture}), which `target` lora does not convert",
                f"merge it instead: peftcli merge BASE {path} -o DIR",
            )
        refuse_unmergeable(source, ckpt)
        if kind == "checkpoint":
            _check_same_model(path, source.checkpoint, ckpt)
            _check_fixed_equal(path, source, ckpt)
        for name in sorted(source.deltas):
            yield name, lambda name=name: source.deltas[name](ckpt.get(name))
    finally:
        source.close()


def _check_same_model(path: str, ft, base) -> None:
    from peftcli.targets import model_type_of

    mine, theirs = model_type_of(base.config), model_type_of(ft.config)
    if mine and theirs and mine != theirs:
        raise BadInputError(f"{path} is a {theirs} model and the base a {mine} one", "extract from a fine-tune of this base")


def _check_fixed_equal(path: str, source, ckpt) -> None:
    """A fine-tune's integer, bool or FP8 tensors must be the base's: no LoRA carries a change there."""
    for name in sorted(source.fixed):
        if source.checkpoint.read_bytes(name) != ckpt.read_bytes(name):
            raise BadInputError(
                f"{path} changes {name!r}, a {source.fixed[name].dtype} tensor no LoRA can carry",
                "extract from a fine-tune whose non-floating tensors are the base's",
            )


def _lora_config(made, linear: dict, base: str) -> dict:
    modules = sorted(k[len("base_model.model.") : -len(".lora_A.weight")] for k in made.tensors if k.endswith(".lora_A.weight"))
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": os.path.abspath(base), "r": made.rank,
        "lora_alpha": made.rank, "target_modules": modules, "lora_dropout": 0.0,
        "fan_in_fan_out": any(linear[m + ".weight"].transposed for m in modules), "bias": "none", "use_dora": False,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": False,
    }


def _extract_and_write(
    inputs: list[str], kind: str, out: str, ckpt, items, *, rank: int | None, energy: float | None, force: bool, metadata: dict,
):
    """Factor ``items`` (name, ΔW maker) into one LoRA on ``ckpt``'s linear weights and write it to ``out``."""
    from peftcli.artifacts.adapter_dir import write_adapter
    from peftcli.lowrank import extract
    from peftcli.targets import is_output_head, linear_modules

    shapes = {t.name: t.shape for t in ckpt.tensors.values()}
    linear = {m.name + ".weight": m for m in linear_modules(shapes, ckpt.config) if not is_output_head(m, ckpt.config)}
    rank = rank if rank is not None or energy is not None else DEFAULT_RANK
    where = inputs[0] if len(inputs) == 1 else "the weighted sum"
    made = extract(items, linear, rank=rank, energy=energy, where=where, skip_unchanged=kind in ("checkpoint", "merge"))
    if not made.tensors:
        what = "changes no linear layer" if kind in ("diff", "adapter") else "differs from the base in no linear layer"
        raise BadInputError(f"{where} {what} a LoRA could carry", "convert only sources that change linear weights")
    metadata = {"peftcli.version": __version__, "peftcli.method": "lora", **metadata}
    write_adapter(out, _lora_config(made, linear, ckpt.path), made.tensors, metadata=metadata, inputs=[*inputs, ckpt.path], force=force)
    return made


def _write_lora(source: str, kind: str, out: str, opts: ConvertOptions, ckpt, items) -> LoraExtraction:
    made = _extract_and_write(
        [source], kind, out, ckpt, items, rank=opts.rank, energy=opts.energy, force=opts.force,
        metadata={"peftcli.converted_from": os.path.abspath(source)},
    )
    return LoraExtraction(out, made.rank, kind, opts.energy, made.modules, made.dropped, made.kept_energy)


# -- merge --to-adapter: the inputs' ΔWs combined by a merge method, as one LoRA -------------


def merge_to_adapter(base: str, inputs: list[str], out: str | None, opts, lam: list[float]) -> AdapterMergeReport:
    """``peftcli merge --to-adapter``: per linear weight the merge method's combination of the inputs'
    ΔWᵢ (one tensor at a time; linear: Σ λᵢ ΔWᵢ), re-factored by truncated SVD into one LoRA
    adapter at ``opts.rank`` or ``opts.energy`` (exact at full rank).

    The method is the registry's own (``MergeMethod.combine``, the kernel a checkpoint merge
    uses on whole tensors) with the ΔWs as the task vectors; DARE's masks are keyed by the
    tensor's name and the input's position, as in a checkpoint merge, so at full rank the
    adapter is θ − θ₀ of ``merge --method M`` with the same options (up to rounding)."""
    import json

    from peftcli.merging.arithmetic import prepare
    from peftcli.merging.sources import open_source, refuse_unmergeable

    if out is None:
        raise UsageError("`to_adapter` writes an adapter directory, not a checkpoint stream", "pass -o DIR")
    m, cfg = prepare(opts.method, len(inputs), lam, {**opts.params, "density": opts.density})  # before anything is read
    check_output_path(out, [*inputs, base], opts.force)
    with open_checkpoint(base, allow_pickle=opts.allow_pickle) as ckpt:
        sources = []
        try:
            for path in inputs:
                sources.append(open_source(path, ckpt, allow_pickle=opts.allow_pickle))
                if sources[-1].head is not None:
                    raise UsageError(f"{path} carries a task head, which a LoRA adapter does not hold", "merge it into a checkpoint instead")
                refuse_unmergeable(sources[-1], ckpt)
            names = sorted(set().union(*(s.deltas for s in sources)))
            combine = _weighted_sum if m.weighted_sum else _method_combination(m, cfg, opts.seed)
            items = ((n, lambda n=n: combine(n, sources, lam, ckpt)) for n in names)
            recorded = json.dumps([{"path": os.path.abspath(p), "weight": w} for p, w in zip(inputs, lam)])
            method = {"method": m.name, "seed": opts.seed, **{f.name: getattr(cfg, f.name) for f in option_fields(type(cfg))}}
            made = _extract_and_write(
                inputs, "merge", out, ckpt, items, rank=opts.rank, energy=opts.energy, force=opts.force,
                metadata={"peftcli.merged_from": recorded, "peftcli.merge_method": json.dumps(method, sort_keys=True)},
            )
        finally:
            for s in sources:
                s.close()
    report_inputs = [{"path": s.path, "kind": s.kind, "weight": w, "tensors": len(s.deltas)} for s, w in zip(sources, lam)]
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    return AdapterMergeReport(
        out, opts.method, report_inputs, len(names), len(made.modules), size, rank=made.rank, energy=opts.energy,
        kept_energy=made.kept_energy, adapter_tensors=made.modules, dropped=made.dropped,
    )


def _weighted_sum(name: str, sources, lam: list[float], ckpt):
    """Σ λᵢ ΔWᵢ of one tensor, one input's ΔW alive at a time (``linear``)."""
    from peftcli.checkpoint.dtypes import work_dtype

    stored = ckpt.get(name)
    total = None
    for s, w in zip(sources, lam):
        if name in s.deltas:
            d = s.deltas[name](stored).to(work_dtype(stored.dtype)) * w
            total = d if total is None else total.add_(d)
    return total


def _method_combination(m, cfg, seed: int):
    """The combination of one tensor's ΔWᵢ by merge method ``m`` (one of the task vectors alone)."""

    def combine(name: str, sources, lam: list[float], ckpt):
        import torch

        from peftcli.checkpoint.dtypes import work_dtype

        stored = ckpt.get(name)
        work = work_dtype(stored.dtype)
        # Every input takes part, zero where it leaves this tensor alone, as MergeMethod.whole
        # does: the same result as a checkpoint merge, and DARE's mask for input i depends on i alone.
        phis = [s.deltas[name](stored).to(work) if name in s.deltas else torch.zeros(stored.shape, dtype=work) for s in sources]
        return m.combine(phis, lam, cfg, seed=seed, key=name, dtype=work)

    return combine


@dataclass
class AdapterMergeReport:
    """``merge --to-adapter``'s report: ``merging.engine.MergeReport``'s fields, with the LoRA's rank and kept energy."""

    output: str
    method: str
    inputs: list[dict]
    tensors: int  # tensors any input changes
    changed: int  # weights the adapter carries
    bytes: int = 0
    rank: int = 0
    energy: float | None = None
    kept_energy: float = 1.0
    adapter_tensors: list[dict] = field(default_factory=list)  # {name, shape, rank, kept_energy}
    dropped: list[dict] = field(default_factory=list)  # {name, shape, energy_share}
    metadata: dict[str, str] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)  # none: a task head is refused

    def to_json(self) -> dict:
        doc = {"schema": "peftcli.merge/1", "output": self.output, "method": self.method, "inputs": self.inputs, "to": "lora"}
        keys = ("tensors", "changed", "bytes", "tasks", "rank", "energy", "kept_energy", "adapter_tensors", "dropped")
        doc.update({("changed_tensors" if k == "changed" else k): getattr(self, k) for k in keys})
        return doc


def _dtype(ckpt, name: str):
    from peftcli.checkpoint.dtypes import torch_dtype

    return torch_dtype(ckpt.tensors[name].dtype)
