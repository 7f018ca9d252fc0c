"""Training a run (module level): ``train`` chooses how, by the method's declared schedule.

A method declares its ``schedule`` (``peftcli.methods.base``): ``one-pass`` runs (and every
``--full`` fine-tune) are one pass of the loop (``one_pass.train_adapter``: prepare → step →
evaluate → save); ``phases`` runs (LT-SFT, diff-pruning) are ``phased.train``; ``rounds`` runs
(lottery tickets) are ``lottery.train``. Each of those drives the one-pass loop itself, once
per pass. The dependencies go one way: ``common`` (what they share) ← ``one_pass`` ←
``phased`` ← ``lottery``, and this module on top of them all.
"""

from __future__ import annotations

import os
from typing import Callable

from peftcli.errors import BadInputError, UsageError
from peftcli.methods import method_for_adapter_config
from peftcli.methods.base import ONE_PASS, PHASES, ROUNDS
from peftcli.threads import torch_threads
from peftcli.training import distributed, lottery, phased
from peftcli.training.common import ARGS_FILE, evaluate, read_json  # noqa: F401 (evaluate re-exported: the public API's)
from peftcli.training.config import SCHEDULES, TrainConfig, check_threads, check_total_steps  # noqa: F401 (re-exported)
from peftcli.training.one_pass import train_adapter

_SCHEDULED = {PHASES: phased.train, ROUNDS: lottery.train}  # how a multi-pass schedule trains


def train(
    run: str, cfg: TrainConfig | None = None, *, resume: bool = False, force: bool = False,
    log: Callable[[str], None] | None = None, progress=None, return_model: bool = False, steps: int | None = None,
    shard: bool | None = None,
):
    """Train the run in directory ``run``; returns the final summary (and the model if asked).

    Methods that train in phases or rounds (LT-SFT, diff-pruning: ``phased``; lottery tickets:
    ``lottery``) drive this loop themselves; every other run is one pass of it. ``steps``
    (with ``resume``): continue the run, finished or not, until it has that many steps.
    ``shard`` (with ``resume``): whether this invocation shards the model (``TrainConfig.shard``:
    how the run is executed, not what it trains), whatever the run recorded.
    """
    if cfg is not None and cfg.loraplus_ratio is not None and not resume:
        _check_loraplus(run)
    method = None if (cfg is not None and cfg.full) else multi_phase_method(run)
    if steps is not None and resume and method is not None:
        raise UsageError(
            f"cannot continue {run} to {steps} steps: a {method.name} run trains in phases or rounds",
            "train it again with `force` and the `steps` you want",
        )
    with torch_threads(_requested_threads(run, cfg, resume)), distributed.timeouts_as_errors():
        if method is not None:
            scheduled = _SCHEDULED[method.schedule]
            return scheduled(run, cfg, resume=resume, force=force, log=log or (lambda line: None), progress=progress, return_model=return_model)
        return train_adapter(
            run, cfg, resume=resume, force=force, log=log, progress=progress, return_model=return_model,
            continue_to=steps if resume else None, shard=shard if resume else None,
        )


def _requested_threads(run: str, cfg: TrainConfig | None, resume: bool) -> int | None:
    """``--threads`` of this run: as given, or as saved in the run when resuming."""
    if cfg is not None:
        return cfg.threads
    args_path = os.path.join(run, ARGS_FILE)
    if resume and os.path.isfile(args_path):
        try:
            return check_threads(read_json(args_path).get("threads"))  # a file may say 100000
        except (OSError, ValueError):
            return None  # resolve_config reports a broken file in one line
    return None


def _check_loraplus(run: str) -> None:
    """``loraplus_ratio`` needs a LoRA run (its lora_A and lora_B); full runs are refused by the config."""
    config_path = os.path.join(run, "adapter_config.json")
    if not os.path.isfile(config_path):
        return  # train_adapter names what is missing
    try:
        name = method_for_adapter_config(read_json(config_path), run).name
    except (ValueError, BadInputError):
        return  # train_adapter's reader reports a broken config in one line
    if name != "lora":
        raise UsageError(f"`loraplus_ratio` applies to lora runs, and {run} is a {name} run", "drop `loraplus_ratio`")


def multi_phase_method(run: str):
    """The method of ``run`` if it trains in phases or rounds (LT-SFT, diff-pruning, lottery), else None."""
    config_path = os.path.join(run, "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        method = method_for_adapter_config(read_json(config_path), run)
    except (ValueError, BadInputError):
        return None  # train_adapter's reader reports a broken config in one line
    return None if method.schedule == ONE_PASS else method
