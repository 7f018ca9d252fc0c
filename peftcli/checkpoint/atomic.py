"""Atomic outputs: every file or directory peftcli writes appears whole or not at all.

An output is built inside a temporary directory next to its target (so the final ``rename``
never crosses a file system), fsynced, renamed into place, and the directory fsynced.

Temporaries are unforgeable and owned. Each is a directory
``.<name>.peftcli-tmp-<token>`` (``token``: 128 random bits, hex) holding ``.peftcli-owner``,
a file whose content is the token and on which the writer holds an exclusive ``flock`` for
its whole life, and the payload (the output file or directory, under the target's name).
A killed run leaves its temporary behind; the next run in that directory removes it only
when it can prove it stale: the name matches exactly, it is a real directory (not a
symlink), its marker is a regular file holding the token of the name, and a non-blocking
``flock`` on the marker succeeds. The kernel drops a lock when its holder dies, whatever its
PID namespace or host, so no PID is ever trusted; anything else with a similar name is left
alone.

Without ``--force`` the payload moves into place with a no-replace rename (Linux
``renameat2(RENAME_NOREPLACE)``), so the existence check and the move are one atomic step:
of two runs writing the same new output, exactly one succeeds and the other fails with
"already exists". Outputs are never allowed to replace an input, nor to go inside an input
directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from peftcli.errors import ResourceError, UsageError

TEMP_MARK = ".peftcli-tmp-"
OWNER_FILE = ".peftcli-owner"
_TEMP_RE = re.compile(r"\.(.+)\.peftcli-tmp-([0-9a-f]{32})", re.DOTALL)  # with fullmatch: exactly this
_NAME_IN_TEMP = 100  # bytes of the target's name kept in the temporary's (NAME_MAX is 255 bytes)
_ASIDE = "old"  # inside the temporary: where --force moves a replaced directory


def _lock_unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


class _Temp:
    """This process's temporary for one output: the directory, its locked marker, the payload."""

    def __init__(self, target: str, directory: bool):
        parent, base = os.path.split(os.path.abspath(target))
        self.token = secrets.token_hex(16)
        short = base if len(os.fsencode(base)) <= _NAME_IN_TEMP else base[: _NAME_IN_TEMP // 4]  # 4 bytes a character at most
        self.dir = os.path.join(parent, f".{short}{TEMP_MARK}{self.token}")
        self.payload = os.path.join(self.dir, base if base not in (OWNER_FILE, _ASIDE) else "payload")
        self.fd = -1
        os.mkdir(self.dir, 0o700)
        try:
            self.fd = os.open(os.path.join(self.dir, OWNER_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            # Lock before writing the token: a cleaner only tries the lock once it has read the
            # whole token, so it can never take the lock of a temporary that is being made.
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if not _lock_unsupported(exc):
                    raise
                # No locks on this file system: cleaners cannot lock either, so they never
                # remove this temporary (a killed run's stays; nothing live is ever removed).
            os.write(self.fd, self.token.encode())
            if directory:
                os.mkdir(self.payload)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        # Removed while still locked, then unlocked. Cleanup never masks the error that caused
        # it (e.g. EROFS on a read-only mount).
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def clean_stale_temps(directory: str) -> list[str]:
    """Remove the temporaries in ``directory`` that provably belong to no live writer."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.fullmatch(name)
        path = os.path.join(directory, name)
        if m is not None and _remove_if_stale(path, m.group(2)):
            removed.append(path)
    return removed


def _remove_if_stale(path: str, token: str) -> bool:
    """Remove ``path`` if it is a temporary of ``token`` whose writer is gone; else touch nothing."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)  # a symlink fails here
    except OSError:
        return False
    fd = -1
    try:
        # O_NONBLOCK: a FIFO planted as the marker must not hang the open.
        fd = os.open(OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.read(fd, 65) != token.encode():
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while the writer lives
        if not os.path.samestat(os.lstat(path), os.fstat(dfd)):
            return False  # replaced since it was checked
        shutil.rmtree(path, ignore_errors=True)  # refuses a symlink; never follows one inside
        return True
    except OSError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dfd)


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
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
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
    """Refuse outputs that would replace an input, go inside an input directory, or replace
    an existing file without ``force``."""
    if not target or not target.strip():
        raise UsageError("the output path is empty", "pass -o PATH")
    inputs = list(inputs)
    for inp in _input_paths(inputs):
        # Replacing an input, a directory that holds one, or anything already inside an
        # input directory would destroy input data.
        inside_existing = _same_or_inside(target, inp) and os.path.lexists(target)
        if _same_or_inside(inp, target) or inside_existing:
            raise UsageError(f"output {target} would overwrite the input {inp}", "choose another -o path")
    for inp in inputs:
        # Nothing new goes inside an input directory either, at any depth: a loader reads
        # more of a directory than the files peftcli opened. transformers reads every shard
        # the index names and config.json, PEFT reads adapter_model.* and keeps further
        # adapters in subdirectories (save_pretrained of several adapters, subfolder=), and
        # peftcli reads a training run's best/ and checkpoints. A new shard or a new
        # directory named like a weights file makes the input unreadable or changes what
        # it loads as, so an output is only ever written outside it.
        if os.path.isdir(inp) and _same_or_inside(target, inp):
            raise UsageError(f"output {target} is inside the input directory {inp}", "write the output outside the input directory")
    if os.path.lexists(target) and not force:
        raise UsageError(f"output {target} already exists", "pass `force` to replace it, or choose another `output` path")
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
    at ``target`` changes. Without ``force``, a ``target`` that appears while the output is
    being built (another run) is kept and this one fails with "already exists".
    """
    inputs = list(inputs)
    target = os.path.normpath(target)  # "runs/lora/" names the directory runs/lora
    check_output_path(target, inputs, force)
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)  # like mkdir -p: "-o runs/new/lora" just works
        clean_stale_temps(parent)
        temp = _Temp(target, directory)
    except OSError as exc:
        raise os_error(exc, target) from exc
    try:
        yield temp.payload
        if directory:
            fsync_tree(temp.payload)
        _move_into_place(temp.payload, target, force)
        fsync_dir(parent)
    except OSError as exc:
        raise os_error(exc, target) from exc
    finally:
        temp.remove()


def _move_into_place(payload: str, target: str, force: bool) -> None:
    if not force:
        if not _rename_noreplace(payload, target):
            raise UsageError(f"output {target} already exists", "another run wrote it first; pass `force` to replace it, or choose another `output` path")
        return
    if os.path.lexists(target) and (os.path.isdir(payload) or (os.path.isdir(target) and not os.path.islink(target))):
        # rename() cannot replace a non-empty directory: move the old one aside (into this
        # run's own temporary, which is removed with it), so there is never a moment with
        # neither a complete old nor a complete new output.
        aside = os.path.join(os.path.dirname(payload), _ASIDE)
        os.rename(target, aside)
        try:
            os.rename(payload, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(aside, target)
            raise
    else:
        os.replace(payload, target)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2() -> Callable[..., Any] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc 2.28+ wrapper (e.g. another libc)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def _rename_noreplace(src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then False), as one atomic step."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    return _rename_noreplace_locked(src, dst)


def _rename_noreplace_locked(src: str, dst: str) -> bool:
    """Fallback where the kernel or file system has no RENAME_NOREPLACE: check and rename
    under an exclusive flock on the target's directory, which every peftcli writer takes
    here, so two peftcli runs cannot both see the target missing (no lock file is left)."""
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # no locks here: the check and rename stay close together
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
        return True
    finally:
        os.close(fd)  # releases the lock


def open_new_file(path: str) -> BinaryIO:
    """Create ``path`` for binary writing with the usual permissions (0666 minus umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "wb")
