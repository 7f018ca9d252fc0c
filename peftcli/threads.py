"""``--threads``: the CPU threads torch computes with, one rule for every compute command.

``check_threads`` validates the option (the options classes call it from ``__post_init__``,
so a flag and a recipe key fail alike); ``torch_threads`` applies it around the work and
restores torch's setting after. Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from peftcli.errors import UsageError

THREADS_PER_CORE = 4  # above this, threads only queue behind each other: the value is a typo

HELP = "CPU threads torch computes with (default: torch's, one per core; on a busy machine 1 can be much faster)"


def max_threads() -> int:
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(threads: int | None, flag: str = "`threads`") -> int | None:
    """``threads`` if it is None or a whole number from 1 to 4 × the cores; else a UsageError."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise UsageError(f"{flag} must be a whole number, got {threads!r}", f"e.g. {flag} 1, or leave it out")
    if threads <= 0:
        raise UsageError(f"{flag} must be positive", f"give {flag} a value of at least 1, or leave it out")
    if threads > max_threads():
        raise UsageError(
            f"{flag} {threads} is more than {THREADS_PER_CORE} per CPU core ({os.cpu_count() or 1} cores here)",
            f"use at most {flag} {max_threads()}; on a busy machine {flag} 1 is often fastest",
        )
    return threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: left alone), restored after.

    On a shared machine every parallel op waits for its slowest thread to be scheduled: with
    both cores busy, one thread ran a MiniLM LoRA step 6.6× faster than torch's default of two
    (benchmarks/train_threads.py); on an idle machine more threads help, so the choice is the user's.
    """
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
