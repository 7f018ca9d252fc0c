"""Data-parallel training on torch.distributed: gloo on CPU, NCCL on GPUs.

``peftcli train --nproc N`` re-launches itself under ``torch.distributed.run`` (the same as
``torchrun --nproc-per-node N -m peftcli train ...``). Every worker holds the whole model and
takes its slice of each global batch (global batch = per-worker batch × N × accumulation);
DDP averages the gradients, so every worker applies the same update. Only rank 0 writes.
Runs of several passes (LT-SFT and diff-pruning's phases, lottery rounds) hold one process
group for all of them (``held_group``); rank 0 does the work between passes (selection,
pruning, files) while the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch

from peftcli.errors import ResourceError, UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device_type: str) -> World:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # A worker that never hears from its peers should fail within minutes, not hang for
        # torch's default 30; PEFTCLI_DIST_TIMEOUT (seconds) raises it for slow collectives.
        timeout = timedelta(seconds=float(os.environ.get("PEFTCLI_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def any_worker(world: World, flag: bool, device) -> bool:
    """``flag`` raised on any worker (all of them get the same answer); ``flag`` alone for one process."""
    if not world.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank0_says(world: World, flag: bool, device) -> bool:
    """Rank 0's ``flag`` on every worker: a decision all must take alike (nondeterministic GPU
    kernels can make the workers' own evaluations differ in the last bits)."""
    if not world.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier(group=_wait_group)  # None: the default group


_wait_group = None  # held_group's: waits between passes may be long (rank 0 selecting, pruning)
WAIT_TIMEOUT_S = 24 * 3600


_held = False  # a multi-pass run (held_group) owns the process group: teardown leaves it alone


def teardown(world: World) -> None:
    if world.distributed and not _held:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def held_group(device_type: str) -> Iterator[World]:
    """One process group for every pass of the loop a run makes (LT-SFT's phases, lottery rounds).

    Each pass calls ``setup`` (which joins the group already there) and ``teardown`` (a no-op
    while the group is held); the group is destroyed once, when the run is done.
    """
    global _held, _wait_group
    world = setup(device_type)
    if not world.distributed:
        yield world
        return
    import torch.distributed as dist

    # Between passes the other ranks wait while rank 0 works on the whole model (the top-K
    # selection, pruning, writing the diff): minutes on a large one, beyond the collectives'
    # PEFTCLI_DIST_TIMEOUT. They wait on a gloo group of their own with a long timeout; its
    # first barrier also keeps rank 0 from touching the run before every rank has checked it.
    _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_TIMEOUT_S))
    _held = True
    try:
        barrier(world)
        yield world
    finally:
        _held = False
        _wait_group = None
        teardown(world)


@contextlib.contextmanager
def timeouts_as_errors() -> Iterator[None]:
    """A worker that waited too long for the others fails in one line, not with torch's traceback."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed's DistError and gloo's timeouts are RuntimeErrors
        text = str(exc)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not ("Timed out" in text or "timed out" in text or "Timeout" in text):
            raise
        rank = os.environ.get("RANK", "?")
        raise ResourceError(
            f"worker {rank} timed out waiting for the other workers",
            "look for another worker's error above; for steps slower than PEFTCLI_DIST_TIMEOUT "
            "(default 600 s), raise it, e.g. PEFTCLI_DIST_TIMEOUT=3600",
        ) from None


def average_gradients(world: World, params) -> None:
    """Mean of each parameter's gradient over the workers, by hand, in one all-reduce.

    For φ that DDP cannot see: sparse fine-tuning's K values get their gradients from hooks on
    the frozen weights after backward, not from autograd, so DDP's reducer never fires for them.
    A parameter without a gradient on this worker contributes zeros (every worker must send
    the same buffer); one that has none on any worker keeps none, as in one process (AdamW
    then skips it: no weight decay, no step).
    """
    if not world.distributed:
        return
    import torch.distributed as dist

    params = list(params)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [has])
    dist.all_reduce(flat)
    flat[: flat.numel() - len(params)] /= world.size
    anyone = flat[flat.numel() - len(params) :] > 0
    offset = 0
    for p, keep in zip(params, anyone.tolist()):
        n = p.grad.numel()
        if keep:
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        else:
            p.grad = None
        offset += n


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``peftcli <argv>`` in ``nproc`` workers through torch.distributed.run; its exit code."""
    if nproc < 1:
        raise UsageError(f"`nproc` must be positive, got {nproc}", "e.g. `nproc` 2 for two worker processes, or leave it out for one")
    # Every worker runs on this machine, so all traffic stays on loopback. Without this, torchrun
    # hands the workers this host's name as MASTER_ADDR and gloo binds to whatever that name
    # resolves to: on a machine whose hostname does not resolve (a CI sandbox, a container),
    # the workers retry the lookup for the full 30-minute timeout instead of starting.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1",  # argv
        f"--nproc-per-node={nproc}", "-m", "peftcli", *argv,  # argv
    ]
    env = dict(os.environ)
    loopback = _loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback
    return subprocess.run(cmd, env=env).returncode


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), or None if unknown."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)
