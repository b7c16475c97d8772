"""Crash-safe file writing shared by the key, the ledger and the checkpoints, and what a full or
read-only disk means for them.

A write the OS refuses for lack of space or a read-only file system is a `StorageError`: the node
stops cleanly on it (nothing half-written is kept, the ledger stays valid, the previous checkpoint
stays the good one) and says which folder needs space. `storage_problem` refuses to start a node
whose home cannot hold what it will write.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# errno values that mean "this storage cannot take the write", as opposed to a bug or a bad path
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class StorageError(RuntimeError):
    """The disk is full or read-only; the message names the file and the fix."""

    def __init__(self, path: str | os.PathLike, err: OSError):
        self.path, self.errno = Path(path), err.errno
        super().__init__(f"cannot write {path}: {err.strerror or err}; " + _fix(Path(path), err.errno))


def _fix(path: Path, code: int | None) -> str:
    if code == errno.EROFS:
        return f"the file system of {path.parent} is read-only: remount it read-write or set --home to a writable folder"
    return f"free space on the disk of {path.parent} (or set --home to a folder on a bigger disk)"


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno in STORAGE_ERRNOS)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a new or renamed file in `path`) to disk."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a short write is retried; a refused one raises OSError)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path` (or its nearest parent)."""
    st = os.statvfs(_existing(Path(path)))
    return st.f_bavail * st.f_frsize


def storage_problem(home: str | os.PathLike, need: int, what: str) -> str | None:
    """Why `home` cannot take `need` more bytes (read-only, not writable, too little free space), or None.
    Writes nothing: the nearest existing folder is asked with access(2), which reports a read-only mount."""
    home = Path(home)
    probe = _existing(home)
    if not os.access(probe, os.W_OK):
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"the node's home {home} is on a read-only file system ({probe}); remount it read-write or set --home to a writable folder"
        return f"the node's home {home} is not writable by this user ({probe}); fix its owner or set --home to a writable folder"
    free = free_bytes(probe)
    if free < need:
        return (f"only {_mib(free)} free on the disk of {probe}, but {what} need {_mib(need)}; free space there "
                "or set --home to a folder on a bigger disk")
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def repair_lines(path: str | os.PathLike) -> None:
    """Cut a line-per-record log (rounds.jsonl) back to its last complete line: a write stopped by a full
    disk may have left half a line, and the next append must not be glued to it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if not size:
        return
    with open(path, "rb+") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
        cut = tail.rfind(b"\n")
        if not tail.endswith(b"\n") and (cut >= 0 or size <= 65536):
            f.truncate(size - len(tail) + cut + 1)
