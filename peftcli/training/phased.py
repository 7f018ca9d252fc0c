"""Training a sparse fine-tuning that chooses its entries (LT-SFT, diff-pruning): the two phases.

1. Phase 1 is a full fine-tuning of the base into ``RUN/phase1/`` (the ``--full`` loop, with
   ``--phase1-steps`` and ``--phase1-lr``; diff-pruning adds its L1 penalty on θ − θ₀).
2. Selection (``peftcli.training.selection``): the exact global top-K by the method's score.
   The run directory becomes a sparse adapter: K indices with values 0 (LT-SFT resets to
   θ₀) or θ⁽¹⁾ − θ⁽⁰⁾ (diff-pruning keeps them, and its trained head). Phase 1's checkpoint
   is then deleted (it is a full copy of the model); its metrics stay in
   ``RUN/phase1_metrics.jsonl``.
3. Phase 2 is the ordinary adapter loop on the K values (``sparse_phi``: O(K) optimizer
   state), skipped by diff-pruning's ``--no-retrain``.
4. ``RUN/phi.diff``: φ = θ⁽²⁾ − θ⁽⁰⁾ with exactly K entries, for ``merge``/``combine``.

The summary is phase 2's, with ``wall_seconds`` the sum over phase 1, the selection and
phase 2 and ``wall_seconds_by_phase`` the split (phase 1's time and the selection's are kept
in ``phase1_summary.json``, so a resumed run still counts them).

Under ``--nproc`` each phase is data-parallel (phase 2 averages the K values' gradients by
hand) in one process group; rank 0 writes, selects and writes the diff. Each phase resumes on its own, so ``--resume`` after a kill in either phase ends with the
same bytes as an uninterrupted run: phase 1 through the full loop's checkpoints, the
selection is a deterministic function of the phase-1 checkpoint, phase 2 through the
adapter loop's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import torch

from peftcli import __version__
from peftcli.artifacts.adapter_dir import read_adapter, write_adapter_files
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.errors import UsageError
from peftcli.methods import method_for_adapter_config
from peftcli.methods.base import PEFT_PREFIX
from peftcli.methods.sparse import phi as sparse_phi
from peftcli.methods.sparse.fine_tuning import SparseFineTuning, candidates, dense_tensors, k_for
from peftcli.training import common, distributed
from peftcli.training import state as ckpt_state
from peftcli.training.common import ARGS_FILE, BEST_DIR, LABELS_FILE, METRICS_FILE, TrainHooks, head_modules, resolve_config, resolve_device, with_model_dir
from peftcli.training.config import TrainConfig
from peftcli.training.one_pass import train_adapter, train_full_pass
from peftcli.training.selection import counterparts, select

PHASE1 = "phase1"
PHASE1_DONE = "phase1_summary.json"
PHASE1_METRICS = "phase1_metrics.jsonl"
DIFF_FILE = "phi.diff"


def phase1_config(cfg: TrainConfig) -> TrainConfig:
    """The full fine-tuning of phase 1: ``--phase1-steps``/``--phase1-lr`` where given (else
    ``--lr`` if given, else full fine-tuning's default rate; the head trains at that rate)."""
    steps = cfg.phase1_steps or cfg.steps
    return dataclasses.replace(
        cfg, full=True, steps=steps, epochs=None if cfg.phase1_steps else cfg.epochs, lr=cfg.phase1_lr or cfg.lr,
        phase1_steps=None, phase1_lr=None, head_lr=None,
    )


def train(run: str, cfg: TrainConfig | None, *, resume: bool, force: bool, log, progress, return_model: bool):
    adapter = read_adapter(run)
    method = method_for_adapter_config(adapter.config, run)
    if not isinstance(method, SparseFineTuning):  # loop.train dispatches only phased methods here
        raise AssertionError(f"{method.name} does not train in phases")
    mcfg = method.config_from_adapter(adapter.config)
    started = sparse_phi.is_selected(adapter.tensors) or any(os.path.exists(os.path.join(run, n)) for n in (PHASE1, ARGS_FILE))
    cfg = resolve_config(run, cfg, resume)
    if not resume and started and not force:
        raise UsageError(f"{run} has already been trained", "pass `resume` to continue it or `force` to train it again")
    cfg = with_model_dir(cfg, adapter)
    # Under --nproc every worker runs this function; rank 0 alone touches the run directory
    # between the passes of the loop, and the others wait for it at a barrier.
    with distributed.held_group(resolve_device(cfg.device).type) as world:
        if not world.main:  # one log, from rank 0
            log = lambda line: None  # noqa: E731
        if not resume:
            if world.main:
                if started:
                    _reset(run, adapter)
                common.write_json(os.path.join(run, ARGS_FILE), dataclasses.asdict(cfg))
            distributed.barrier(world)
            adapter = read_adapter(run)
        summary1 = _phase1_and_selection(run, cfg, method, mcfg, adapter, resume, log, progress, world)
        if not method.retrains(mcfg):
            summary, model = summary1, None
            log("diff-pruning `no_retrain`: the pruned phase-1 φ is the result")
        else:
            summary, model = _phase2(run, cfg, resume, log, progress, return_model, world)
        if world.main:
            _write_phi_diff(run, cfg.model, method.name)
        distributed.barrier(world)
    phase2 = summary if method.retrains(mcfg) else None
    summary = {**summary, "run": run, "phase1": summary1, "k": _k_of(run, mcfg), **_wall_split(summary1, phase2)}
    return (summary, model) if return_model else summary


def _phase1_and_selection(run: str, cfg: TrainConfig, method, mcfg, adapter, resume: bool, log, progress, world) -> dict | None:
    """Phase 1 and the selection, unless the run's entries are already selected; phase 1's summary."""
    done = os.path.join(run, PHASE1_DONE)
    if sparse_phi.is_selected(adapter.tensors):
        return common.read_json(done) if os.path.isfile(done) else None
    summary1 = _phase1(run, cfg, method, mcfg, resume, log, progress, world)
    if world.main:
        t0 = time.perf_counter()
        _select(run, cfg, method, mcfg, adapter, log)
        summary1 = {**summary1, "selection_seconds": time.perf_counter() - t0}
        common.write_json(done, summary1)  # a resumed run still counts it
    distributed.barrier(world)
    return summary1


def _phase2(run: str, cfg: TrainConfig, resume: bool, log, progress, return_model: bool, world) -> tuple[dict, object]:
    """The adapter loop on the selected entries; its summary and (if asked) its model."""
    log("phase 2: training the selected entries only")
    resume2 = resume and ckpt_state.latest_checkpoint(run) is not None
    out = train_adapter(
        run, cfg, resume=resume2, force=True, log=log, progress=progress, return_model=return_model, finished_ok=True,
        pass_lr="`lr`",
    )
    if world.main:
        common.write_json(os.path.join(run, ARGS_FILE), dataclasses.asdict(cfg))  # the user's options, phase 1 included
    return out if return_model else (out, None)


def _wall_split(phase1: dict | None, phase2: dict | None) -> dict:
    """The run's wall time: phase 1 (its saved summary, so a resumed run counts it too), the
    selection and phase 2, and how it splits. Each phase counts its training loop, as a
    single-pass run does (not loading the model); a phase resumed counts from its resume."""
    split = {}
    if phase1 is not None:
        split["phase 1"] = phase1.get("wall_seconds", 0.0)
        if "selection_seconds" in phase1:
            split["selection"] = phase1["selection_seconds"]
    if phase2 is not None:
        split["phase 2"] = phase2["wall_seconds"]
    return {"wall_seconds": sum(split.values()), "wall_seconds_by_phase": split}


def _k_of(run: str, mcfg) -> int:
    """Entries chosen by the top-K (tensors trained whole by --dense not counted)."""
    from peftcli.methods.sparse.fine_tuning import is_dense

    pairs = sparse_phi.pairs(read_adapter(run).tensors)
    return sum(int(i.numel()) for name, (i, _) in pairs.items() if not is_dense(name, mcfg.dense))


def _reset(run: str, adapter):
    """Forget a previous training (``--force``): the run is as ``inject`` wrote it."""
    for name in (PHASE1, ckpt_state.CHECKPOINTS, BEST_DIR):
        shutil.rmtree(os.path.join(run, name), ignore_errors=True)
    for name in (PHASE1_DONE, PHASE1_METRICS, DIFF_FILE, METRICS_FILE, ARGS_FILE, LABELS_FILE):
        if os.path.exists(os.path.join(run, name)):
            os.unlink(os.path.join(run, name))
    config = {k: v for k, v in adapter.config.items() if k not in ("modules_to_save", "task_type")}
    write_adapter_files(run, config, {})
    return read_adapter(run)


def _phase1(run: str, cfg: TrainConfig, method, mcfg, resume: bool, log, progress, world) -> dict:
    """The full fine-tuning of phase 1 into ``RUN/phase1/``; its summary (saved by rank 0)."""
    p1 = os.path.join(run, PHASE1)
    done = os.path.join(run, PHASE1_DONE)
    if os.path.isfile(done) and os.path.isfile(os.path.join(p1, "model.safetensors")):
        return common.read_json(done)  # killed after phase 1, before the selection was written
    cfg1 = phase1_config(cfg)
    l1 = method.phase1_l1(mcfg)
    hooks = _l1_hooks(l1, cfg.model) if l1 else None
    log(f"phase 1: full fine-tuning for {cfg1.steps or cfg1.epochs} {'steps' if cfg1.steps else 'epochs'}")
    summary = train_full_pass(p1, cfg1, resume=resume, world=world, log=log, progress=progress, hooks=hooks)
    summary = {k: v for k, v in summary.items() if k != "labels"}
    if world.main:
        common.write_json(done, summary)
    return summary


def _select(run: str, cfg: TrainConfig, method, mcfg, adapter, log) -> None:
    """Choose the K entries from phase 1 and write the run as a selected sparse adapter."""
    p1 = os.path.join(run, PHASE1)
    with open_checkpoint(cfg.model) as base, open_checkpoint(p1) as trained:
        shapes = {t.name: t.shape for t in base.tensors.values()}
        names = candidates(shapes, mcfg.dense)
        n = sum(base.tensors[x].numel for x in names)
        k = k_for(mcfg, n)
        sel = select(base, trained, names, k, mcfg.select, cfg.train_seed)
        dense = counterparts(dense_tensors(shapes, mcfg.dense), trained.tensors)
        for name, theirs in dense.items():  # --dense: every entry, outside the top-K
            sel.indices[name] = torch.arange(base.tensors[name].numel, dtype=torch.int64)
            sel.values[name] = (trained.get(theirs).float() - base.get(name).float()).reshape(-1)
    log(f"selected {k:,} of {n:,} entries ({100.0 * k / n:.4g}%) by {mcfg.select}" + (f", and {len(dense)} tensor(s) whole" if dense else ""))
    tensors: dict[str, torch.Tensor] = {}
    for name, idx in sel.indices.items():
        tensors[name + sparse_phi.IDX] = idx
        tensors[name + sparse_phi.VAL] = torch.zeros(idx.numel()) if method.resets_after_phase1 else sel.values[name]
    config = dict(adapter.config)
    if not method.resets_after_phase1 and sel.head:
        # Diff-pruning keeps all of phase 1 but what it prunes: the trained head too.
        heads = head_modules(list(sel.head))
        tensors.update({PEFT_PREFIX + n: t for n, t in sel.head.items()})
        config.update(modules_to_save=heads, task_type="SEQ_CLS")
    write_adapter_files(run, config, tensors, metadata={"peftcli.version": __version__, "peftcli.method": method.name})
    metrics = os.path.join(p1, METRICS_FILE)
    if os.path.isfile(metrics):
        shutil.copyfile(metrics, os.path.join(run, PHASE1_METRICS))
    labels = os.path.join(p1, LABELS_FILE)
    if os.path.isfile(labels):
        shutil.copyfile(labels, os.path.join(run, LABELS_FILE))
    shutil.rmtree(p1)


def _l1_hooks(l1: float, model_dir: str):
    """Diff-pruning's penalty λ·mean|θ − θ₀| over the base's parameters (not a new head)."""
    theta0: dict[str, torch.Tensor] = {}

    def start(adapted, resumed: bool) -> None:
        params = adapted.phi_parameters()
        with open_checkpoint(model_dir) as base:
            shapes = {t.name: t.shape for t in base.tensors.values()}
            for base_name, name in counterparts(candidates(shapes) , params).items():
                theta0[name] = base.get(base_name).to(params[name].device, params[name].dtype)

    def extra_loss(adapted):
        params = adapted.phi_parameters()
        total = sum(v.numel() for v in theta0.values())
        return l1 * sum((params[n] - t).abs().sum() for n, t in theta0.items()) / total

    return TrainHooks(start=start, extra_loss=extra_loss)


def _write_phi_diff(run: str, model_dir: str, method: str) -> None:
    """``RUN/phi.diff``: the adapter's sparse φ in the ``.diff`` format (exactly its K entries)."""
    from peftcli.artifacts.sparse_diff import FLOAT_DTYPES, DiffEntry, DiffMetadata, recorded_inputs, write_diff
    from peftcli.checkpoint.fingerprint import Fingerprint

    adapter = read_adapter(run)
    found = sparse_phi.pairs(adapter.tensors)
    dense = (adapter.config.get("peftcli") or {}).get("dense")
    with open_checkpoint(model_dir) as base:
        shapes = {t.name: t.shape for t in base.tensors.values()}
        whole = set(dense_tensors(shapes, dense)) & set(found)
        names = sorted(n for n in set(candidates(shapes, dense)) | whole if base.tensors[n].dtype in FLOAT_DTYPES)
        entries = []
        for name in names:
            info = base.tensors[name]
            idx, val = found.get(name, (torch.zeros(0, dtype=torch.int64), torch.zeros(0)))
            if name in whole:  # trained whole: stored dense, outside the density
                entries.append(DiffEntry(name, info.dtype, tuple(info.shape), info.numel, lambda v=val, s=tuple(info.shape): (None, v.float().view(s)), whole=True))
            else:
                entries.append(DiffEntry(name, info.dtype, tuple(info.shape), int(idx.numel()), lambda i=idx, v=val: (i, v.float())))
        provenance = {
            "tool": "peftcli", "version": __version__, "command": "train", "method": method,
            "inputs": recorded_inputs({"base": model_dir, "run": run}, os.path.join(run, DIFF_FILE)),
            "options": json.loads(json.dumps(adapter.config.get("peftcli", {}))),
        }
        fingerprint = Fingerprint.of(base, names)
        write_diff(os.path.join(run, DIFF_FILE), entries, DiffMetadata(method, fingerprint, provenance), values="fp32", force=True, inputs=[model_dir])
