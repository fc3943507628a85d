"""Durable file writes, one policy for every artifact offsite saves (bundles, checkpoints, the
PEMA memory's bookkeeping, the service's state).

A write is durable when the file's data and the directory entry naming it have both reached the
disk: `write_synced` fsyncs a new file, `atomic_write` replaces a file so readers see the old
or the new content and never a mix, and `fsync_path` syncs a file or a directory after a rename.
Directory fsync is skipped only where the platform cannot do it at all (Windows cannot open a
directory; some filesystems answer EINVAL or ENOTSUP); any other error, EIO above all, is raised,
because a save that silently did not reach the disk is worse than one that failed.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def fsync_path(path: str | Path) -> None:
    """fsync a regular file or a directory."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if is_dir and os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (is_dir and e.errno in _UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, synced to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` through a synced temporary sibling and a rename, then sync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
