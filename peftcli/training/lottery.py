"""Training a lottery-ticket run: the rounds of iterative magnitude pruning with rewinding.

Round r (0 … rounds) is a full fine-tuning into ``RUN/round-r/`` (the ``--full`` loop, with
``--phase1-steps``/``--phase1-lr``) that starts from the rewind point masked by the current
mask and re-applies the mask after every optimizer step, so pruned weights stay exactly 0.
After each round but the last, ``--prune-rate`` of the surviving prunable weights are pruned
(the smallest |θ| of the trained round, or at random) and the round's directory is deleted;
the last round's directory becomes ``RUN/ticket/``. ``RUN/metrics.jsonl`` gets one line per
round (density, steps, final loss, best validation loss/accuracy, wall time: the summary's
``wall_seconds`` is their sum, split in ``wall_seconds_by_phase``); ``RUN/lottery_state.json``
records the next round, so ``--resume`` continues where a run was killed (inside a round,
through that round's checkpoints).

Under ``--nproc`` every round is a data-parallel full fine-tuning in one process group (the mask
re-applied on every worker after each step); rank 0 writes the mask, rewind point and metrics.

The rewind point (``RUN/rewind.safetensors``) is the model after ``--rewind-step`` steps of
round 0 — with 0, the pretrained weights and the seeded initial head.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from peftcli.artifacts.adapter_dir import read_adapter
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.errors import UsageError
from peftcli.methods import method_for_adapter_config
from peftcli.methods.lottery import prunable
from peftcli.training import distributed
from peftcli.training.common import ARGS_FILE, METRICS_FILE, TrainHooks, read_json, resolve_config, resolve_device, with_model_dir, write_json
from peftcli.training.config import TrainConfig
from peftcli.training.one_pass import train_full_pass
from peftcli.training.phased import phase1_config
from peftcli.training.selection import counterparts

STATE = "lottery_state.json"
MASK = "mask.safetensors"
MASK_NEXT = "mask.next.safetensors"  # the next round's mask, until that round is committed
REWIND = "rewind.safetensors"
TICKET = "ticket"


def _round_dir(run: str, r: int) -> str:
    return os.path.join(run, f"round-{r}")


def train(run: str, cfg: TrainConfig | None, *, resume: bool, force: bool, log, progress, return_model: bool):
    adapter = read_adapter(run)
    method = method_for_adapter_config(adapter.config, run)
    lcfg = method.config_from_adapter(adapter.config)
    if resume:
        cfg, state = _resumed(run, lcfg)
        if state["round"] > lcfg.rounds:  # all rounds done: the ticket is in place
            return _finished(run, lcfg, state["summary"], return_model)
    else:
        cfg = resolve_config(run, cfg, resume=False)
        if os.path.exists(os.path.join(run, STATE)) and not force:
            raise UsageError(f"{run} has already been trained", "pass `resume` to continue it or `force` to train it again")
        state = {"round": 0}
    cfg = with_model_dir(cfg, adapter)
    with open_checkpoint(cfg.model) as base:
        base_prunable = prunable({t.name: t.shape for t in base.tensors.values()})

    cfg_round = phase1_config(cfg)
    summary = None
    # Under --nproc every worker runs the rounds (each a data-parallel full fine-tuning); rank 0
    # alone writes the run's files between them, and the others wait for it at a barrier.
    with distributed.held_group(resolve_device(cfg.device).type) as world:
        if not world.main:  # one log, from rank 0
            log = lambda line: None  # noqa: E731
        _begin(run, cfg, state, resume, world)
        for r in range(state["round"], lcfg.rounds + 1):
            hooks = _hooks(run, r, lcfg, base_prunable, world.main)
            log(f"round {r}/{lcfg.rounds}: training at density {_density(run):.4f}")
            summary = train_full_pass(_round_dir(run, r), cfg_round, resume=resume, world=world, log=log, progress=progress, hooks=hooks)
            resume = False  # later rounds start fresh
            if world.main:
                _commit_round(run, r, lcfg, cfg.train_seed + r, summary, base_prunable)
            distributed.barrier(world)
    return _finished(run, lcfg, summary, return_model)


def _resumed(run: str, lcfg) -> tuple[TrainConfig, dict]:
    """The configuration and state of the run to resume; a run killed after its last round
    was committed gets its ticket moved into place (by rank 0 under --nproc)."""
    state_path = os.path.join(run, STATE)
    if not os.path.isfile(state_path):
        raise UsageError(f"{run}: nothing to resume (no {STATE})", "start a run with `data` first")
    cfg = TrainConfig(**read_json(os.path.join(run, ARGS_FILE)))
    state = read_json(state_path)
    if state["round"] > lcfg.rounds and state.get("ticket_from") and os.path.isdir(os.path.join(run, state["ticket_from"])):
        if int(os.environ.get("RANK", "0")) == 0:  # killed after the last round was committed:
            _commit_ticket(run)  # only the move was left (rank 0's to do under --nproc)
        return cfg, state
    if state["round"] > lcfg.rounds:
        raise UsageError(f"{run}: nothing to resume, all {lcfg.rounds} rounds are done", "start a new run to train further")
    return cfg, state


def _begin(run: str, cfg: TrainConfig, state: dict, resume: bool, world) -> None:
    """Rank 0 starts the run afresh, or completes what a kill interrupted; the others wait."""
    if not resume:
        if world.main:
            _clear(run)
            write_json(os.path.join(run, ARGS_FILE), dataclasses.asdict(cfg))
            write_json(os.path.join(run, STATE), state)
        distributed.barrier(world)
    elif world.main:
        _finish_commit(run, state)
        _drop_metrics_from(run, state["round"])  # a round killed after its metrics line trains again
    distributed.barrier(world)


def _commit_round(run: str, r: int, lcfg, seed: int, summary: dict, base_prunable: list[str]) -> None:
    """Record round ``r``, then prune for the next one (or, after the last, keep it as the ticket)."""
    rdir = _round_dir(run, r)
    _append_metrics(run, {
        "round": r, "density": _density(run), "steps": summary["steps"], "final_loss": summary["final_loss"],
        "eval_loss": summary["best"]["eval_loss"], "eval_accuracy": summary["best"]["eval_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    })
    # The next mask and the next round are committed together: the mask is written aside, the
    # state names it, then it replaces the mask. A kill at any point resumes either round r
    # again (the mask untouched) or round r + 1 on its mask.
    if r < lcfg.rounds:
        _prune(run, rdir, lcfg, seed, base_prunable, os.path.join(run, MASK_NEXT))
        write_json(os.path.join(run, STATE), {"round": r + 1, "next_mask": MASK_NEXT})
        _commit_mask(run)
        shutil.rmtree(rdir)
    else:
        write_json(os.path.join(run, STATE), {"round": r + 1, "ticket_from": os.path.basename(rdir), "summary": summary})
        _commit_ticket(run)


def _finished(run: str, lcfg, summary: dict, return_model: bool):
    split = _round_walls(run)
    summary = {
        **summary, "run": run, "rounds": lcfg.rounds, "density": _density(run), "ticket": os.path.join(run, TICKET),
        "wall_seconds": sum(split.values()), "wall_seconds_by_phase": split,
    }
    return (summary, None) if return_model else summary


def _round_walls(run: str) -> dict[str, float]:
    """Each round's training wall time, from its metrics line (rounds of an earlier, resumed
    invocation included): the run's wall time is their sum."""
    walls = {}
    with open(os.path.join(run, METRICS_FILE), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if "round" in row:
                walls[f"round {row['round']}"] = row.get("wall_seconds", 0.0)
    return walls


def _commit_mask(run: str) -> None:
    os.replace(os.path.join(run, MASK_NEXT), os.path.join(run, MASK))


def _commit_ticket(run: str) -> None:
    state = read_json(os.path.join(run, STATE))
    rdir = os.path.join(run, state["ticket_from"])
    if os.path.isdir(rdir):  # else: already moved
        shutil.rmtree(os.path.join(run, TICKET), ignore_errors=True)
        os.replace(rdir, os.path.join(run, TICKET))


def _finish_commit(run: str, state: dict) -> None:
    """On --resume, complete what a kill interrupted between rounds (see ``train``)."""
    pending = os.path.join(run, MASK_NEXT)
    if state.get("next_mask") and os.path.isfile(pending):
        _commit_mask(run)
        shutil.rmtree(_round_dir(run, state["round"] - 1), ignore_errors=True)
    elif os.path.isfile(pending):  # pruned, but the round was not committed: it trains again
        os.unlink(pending)
    if state.get("ticket_from"):
        _commit_ticket(run)


def _drop_metrics_from(run: str, first_round: int) -> None:
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("round", -1) < first_round]
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)


def _clear(run: str) -> None:
    """Forget a previous training (``--force``): the run is as ``inject`` wrote it."""
    for name in os.listdir(run):
        if name.startswith("round-") or name == TICKET:
            shutil.rmtree(os.path.join(run, name))
        elif name in (MASK, MASK_NEXT, REWIND, METRICS_FILE, ARGS_FILE, STATE):
            os.unlink(os.path.join(run, name))


def _density(run: str) -> float:
    path = os.path.join(run, MASK)
    if not os.path.isfile(path):
        return 1.0
    with open_checkpoint(path) as ckpt:
        kept = sum(int(ckpt.get(n).sum()) for n in ckpt.tensors)
        total = sum(t.numel for t in ckpt.tensors.values())
    return kept / total if total else 1.0


def _append_metrics(run: str, row: dict) -> None:
    with open(os.path.join(run, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _load(path: str, device) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.get(n).to(device) for n in ckpt.tensors}


def _hooks(run: str, r: int, lcfg, base_prunable: list[str], main: bool = True):
    """Start from the masked rewind point; keep pruned weights at 0; record the rewind point (``main``: rank 0 writes it)."""
    masks: dict[str, torch.Tensor] = {}

    def snapshot(adapted) -> None:
        if not main:
            return
        params = adapted.phi_parameters()
        save_state_dict({n: p.detach().cpu() for n, p in params.items()}, os.path.join(run, REWIND), force=True)

    def apply_mask(adapted) -> None:
        params = adapted.phi_parameters()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m.to(params[n].dtype))

    def start(adapted, resumed: bool) -> None:
        params = adapted.phi_parameters()
        device = next(iter(params.values())).device
        if os.path.isfile(os.path.join(run, MASK)):
            masks.update(_load(os.path.join(run, MASK), device))
        if r == 0 and lcfg.rewind_step == 0 and not resumed:
            snapshot(adapted)
        if r > 0 and not resumed:
            rewind = _load(os.path.join(run, REWIND), device)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(rewind[n])
        apply_mask(adapted)

    def after_step(adapted, step: int) -> None:
        apply_mask(adapted)
        if r == 0 and lcfg.rewind_step and step == lcfg.rewind_step:
            snapshot(adapted)

    return TrainHooks(start=start, after_step=after_step)


def _prune(run: str, rdir: str, lcfg, seed: int, base_prunable: list[str], out: str) -> None:
    """Write the next mask to ``out``: drop ``prune_rate`` of the survivors, globally across prunable tensors."""
    from peftcli.diffing import global_cuts

    with open_checkpoint(os.path.join(rdir, "model.safetensors")) as trained:
        names = counterparts(base_prunable, trained.tensors)
        prev = _load(os.path.join(run, MASK), "cpu") if os.path.isfile(os.path.join(run, MASK)) else {}
        survivors = {n: prev[n].reshape(-1) if n in prev else torch.ones(trained.tensors[n].numel, dtype=torch.bool) for n in names.values()}
        alive = sum(int(m.sum()) for m in survivors.values())
        keep = alive - int(round(alive * lcfg.prune_rate))

        class Scores:
            path = trained.path

            def phi(self, name: str) -> torch.Tensor:
                alive_here = survivors[name]
                if lcfg.select == "random":
                    g = torch.Generator().manual_seed(seed * 1_000_003 + sorted(survivors).index(name))
                    score = torch.rand(alive_here.numel(), generator=g) + 1.0  # > 0 for survivors
                else:
                    # + the smallest positive float: a survivor at exactly 0 still outranks the pruned
                    score = trained.get(name).float().reshape(-1).abs() + torch.finfo(torch.float32).tiny
                return score * alive_here

        scores = Scores()
        infos = [trained.tensors[n] for n in sorted(survivors)]
        cuts = global_cuts(trained, scores, infos, keep, None)
        mask = {}
        for info, (cut, _) in zip(infos, cuts):
            flat = torch.zeros(info.numel, dtype=torch.bool)
            flat[cut.keep(scores.phi(info.name).view(torch.int32))] = True
            mask[info.name] = flat.view(tuple(info.shape))
    save_state_dict(mask, out, force=True)
