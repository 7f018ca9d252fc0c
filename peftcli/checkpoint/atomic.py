"""Atomic outputs: every file or directory peftcli writes appears whole or not at all.

An output is built under a temporary name in the target's own directory (so the final
``rename`` never crosses a file system), fsynced, renamed into place, and the directory
fsynced. A killed run leaves only ``.<name>.peftcli-tmp-<pid>-<rand>`` entries, which the
next run in that directory removes. Outputs are never allowed to replace an input.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from typing import Iterable, Iterator

from peftcli.errors import ResourceError, UsageError

TEMP_MARK = ".peftcli-tmp-"
_TEMP_RE = re.compile(r"^\..+\.peftcli-tmp-(\d+)-[0-9a-f]+$")


def temp_path_for(target: str) -> str:
    parent, base = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{base}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str) -> list[str]:
    """Remove temporaries left in ``directory`` by peftcli runs that no longer exist."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            path = os.path.join(directory, name)
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: str) -> None:
    # Cleanup must never mask the error that caused it (e.g. EROFS on a read-only mount).
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (``root`` last).

    A directory output is renamed into place only once all of it is on disk: files copied
    with shutil (config, tokenizer) or written by other code are not fsynced where they are
    made, and a crash after the rename must not leave a complete-looking output with an
    empty config.json. Files already fsynced cost a no-op system call.
    """
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _same_or_inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _input_paths(inputs: Iterable[str]) -> list[str]:
    """Inputs, plus the files of input directories (their real paths: HF caches symlink shards)."""
    paths = []
    for inp in inputs:
        paths.append(inp)
        if os.path.isdir(inp):
            for name in os.listdir(inp):
                paths.append(os.path.realpath(os.path.join(inp, name)))
    return paths


def check_output_path(target: str, inputs: Iterable[str] = (), force: bool = False) -> None:
    """Refuse outputs that would replace an input or an existing file without ``force``."""
    if not target or not target.strip():
        raise UsageError("the output path is empty", "pass -o PATH")
    inputs = list(inputs)
    for inp in _input_paths(inputs):
        # Replacing an input, a directory that holds one, or anything already inside an
        # input directory would destroy input data.
        inside_existing = _same_or_inside(target, inp) and os.path.lexists(target)
        if _same_or_inside(inp, target) or inside_existing:
            raise UsageError(f"output {target} would overwrite the input {inp}", "choose another -o path")
    if os.path.lexists(target) and not force:
        raise UsageError(f"output {target} already exists", "pass --force to replace it, or choose another -o path")
    parent = os.path.dirname(os.path.abspath(target))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"output {target} is inside {existing}, which is a file", "choose another -o path")


def os_error(exc: OSError, target: str) -> ResourceError:
    """The one-line error for an OS failure while writing ``target``."""
    if exc.errno == errno.ENOSPC:
        return ResourceError(f"no space left on device while writing {target}", "free some space and rerun")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ResourceError(f"cannot write {target}: {exc.strerror}", "check the output directory's permissions")
    return ResourceError(f"cannot write {target}: {exc.strerror or exc}", "check the output path and that its file system is writable")


@contextlib.contextmanager
def atomic_output(target: str, *, directory: bool, inputs: Iterable[str] = (), force: bool = False) -> Iterator[str]:
    """Yield a temporary path to build ``target`` at; move it into place only on success.

    With ``directory=True`` the temporary path is an empty directory already created.
    On any exception (including KeyboardInterrupt) the temporary is removed and nothing
    at ``target`` changes.
    """
    inputs = list(inputs)
    target = os.path.normpath(target)  # "runs/lora/" names the directory runs/lora
    check_output_path(target, inputs, force)
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)  # like mkdir -p: "-o runs/new/lora" just works
    except OSError as exc:
        raise os_error(exc, target) from exc
    clean_stale_temps(parent)
    tmp = temp_path_for(target)
    try:
        if directory:
            os.mkdir(tmp)
        yield tmp
        if directory:
            fsync_tree(tmp)
        _replace(tmp, target)
        fsync_dir(parent)
    except OSError as exc:
        _remove(tmp)
        raise os_error(exc, target) from exc
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: str, target: str) -> None:
    if os.path.lexists(target) and (os.path.isdir(tmp) or (os.path.isdir(target) and not os.path.islink(target))):
        # rename() cannot replace a non-empty directory: move the old one aside first,
        # so there is never a moment with neither a complete old nor a complete new output.
        old = temp_path_for(target)
        os.rename(target, old)
        os.rename(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def open_new_file(path: str):
    """Create ``path`` for binary writing with the usual permissions (0666 minus umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "wb")
