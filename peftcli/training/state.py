"""Training checkpoints: φ plus everything needed to continue bit-exactly.

``<run>/checkpoints/step-NNNNNNN/`` holds the adapter files and ``trainer_state.pt``
(optimizer, scheduler, RNG states, data position, early-stopping state). Every run ends with
one at its last step, so a finished run can be continued (``train RUN --resume --steps N``). Directories are
written atomically, so the newest one is always complete; ``trainer_state.pt`` is read
back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import torch

from peftcli.checkpoint.atomic import atomic_output
from peftcli.errors import BadInputError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{7})$")


def step_dir(run: str, step: int) -> str:
    return os.path.join(run, CHECKPOINTS, f"step-{step:07d}")


def latest_checkpoint(run: str) -> str | None:
    root = os.path.join(run, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = sorted(int(m.group(1)) for n in os.listdir(root) if (m := _STEP_DIR.match(n)))
    return step_dir(run, steps[-1]) if steps else None


def checkpoint_step(checkpoint: str) -> int:
    """The step a checkpoint directory (``step-NNNNNNN``) was written at."""
    return int(_STEP_DIR.match(os.path.basename(checkpoint)).group(1))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run: str, step: int, adapted, trainer_state: dict, keep: int | None = None, phi: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep`` (None: all).
    ``phi``: φ already gathered (a sharded run), else read from ``adapted``."""
    target = step_dir(run, step)
    with atomic_output(target, directory=True, force=True) as tmp:
        adapted.save_into(tmp, phi=phi) if phi is not None else adapted.save_into(tmp)
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
    if keep is not None:
        root = os.path.join(run, CHECKPOINTS)
        steps = sorted(int(m.group(1)) for n in os.listdir(root) if (m := _STEP_DIR.match(n)))
        for old in steps[:-keep]:
            shutil.rmtree(step_dir(run, old), ignore_errors=True)
    return target


def load_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file breaks torch.load in many ways
        from peftcli.checkpoint.reader import torch_error_text

        raise BadInputError(
            f"{path}: cannot read the training state: {torch_error_text(exc)}",
            f"the checkpoint is damaged; delete {checkpoint} to resume from the one before it",
        ) from None
