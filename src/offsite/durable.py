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
import queue
import tempfile
import threading
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


class WriteBehind:
    """Writes to an open binary file from a thread, up to `depth` buffers behind the caller, so the
    caller's own work on the next buffer (hashing it, reading it) overlaps the disk write of this
    one; a write releases the GIL, as hashlib does on large buffers. The buffers must not change
    once handed over (bytes). A write error is raised by the next `write` or by `close`; `abort`
    (or leaving a `with` block on an exception) stops the thread and closes the file."""

    _END = object()

    def __init__(self, handle, depth: int = 3):
        self.handle = handle
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not self._END:
            if self._error is None:  # after an error it only empties the queue, so no put() blocks forever
                try:
                    self.handle.write(item)
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    self._error = e

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("WriteBehind: write after finish()")
        self._queue.put(data)

    def finish(self) -> None:
        """Write everything handed over and flush the file, which stays open (to be read back, say);
        raises the first write error. No write may follow."""
        if self._thread.is_alive():
            self._queue.put(self._END)
            self._thread.join()
        if self._error is not None:
            raise self._error
        self.handle.flush()

    def close(self) -> None:
        """`finish`, then close the file."""
        try:
            self.finish()
        finally:
            self.handle.close()

    def abort(self) -> None:
        """Stop without raising: what is queued may or may not be written; the file is closed."""
        try:
            self.finish()
        except BaseException:  # noqa: BLE001 - the caller is already handling an error
            pass
        finally:
            self.handle.close()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.abort() if exc_type is not None else self.close()
