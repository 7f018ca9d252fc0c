"""Data-parallel training on torch.distributed: gloo on CPU, NCCL on GPUs.

``peftcli train --nproc N`` re-launches itself under ``torch.distributed.run`` (the same as
``torchrun --nproc-per-node N -m peftcli train ...``). Every worker holds the whole model and
takes its slice of each global batch (global batch = per-worker batch × N × accumulation);
DDP averages the gradients, so every worker applies the same update. Only rank 0 writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from peftcli.errors import UsageError


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


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def teardown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``peftcli <argv>`` in ``nproc`` workers through torch.distributed.run; its exit code."""
    if nproc < 1:
        raise UsageError(f"--nproc must be positive, got {nproc}", "e.g. --nproc 2 for two worker processes, or leave it out for one")
    # Every worker runs on this machine, so all traffic stays on loopback. Without this, torchrun
    # hands the workers this host's name as MASTER_ADDR and gloo binds to whatever that name
    # resolves to: on a machine whose hostname does not resolve (a CI sandbox, a container),
    # the workers retry the lookup for the full 30-minute timeout instead of starting.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1",
        f"--nproc-per-node={nproc}", "-m", "peftcli", *argv,
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
