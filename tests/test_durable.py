"""offsite.durable: one fsync policy for every saved artifact."""

import errno
import os

import pytest

from offsite import durable


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    durable.atomic_write(target, b"old")
    durable.atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_that_fails_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    durable.atomic_write(target, b"old")

    def broken(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(durable.os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        durable.atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_synced_never_overwrites(tmp_path):
    durable.write_synced(tmp_path / "a", b"1")
    with pytest.raises(FileExistsError):
        durable.write_synced(tmp_path / "a", b"2")
    assert (tmp_path / "a").read_bytes() == b"1"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_directory_fsync_is_skipped_only_where_unsupported(tmp_path, monkeypatch, code):
    (tmp_path / "f").write_bytes(b"x")
    real = os.fsync

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(durable.os, "fsync", fsync)
    durable.fsync_path(tmp_path)  # a filesystem that cannot sync a directory: skipped
    with pytest.raises(OSError):
        durable.fsync_path(tmp_path / "f")  # a file must sync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        durable.fsync_path(tmp_path)  # a real failure is never swallowed
    monkeypatch.setattr(durable.os, "fsync", real)
    durable.fsync_path(tmp_path)
    durable.fsync_path(tmp_path / "f")


def test_fsync_of_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        durable.fsync_path(tmp_path / "missing")


def test_write_behind_writes_every_buffer_in_order(tmp_path):
    target = tmp_path / "out.bin"
    with durable.WriteBehind(open(target, "wb"), depth=1) as out:
        for i in range(50):
            out.write(bytes([i]) * 1000)
    assert target.read_bytes() == b"".join(bytes([i]) * 1000 for i in range(50))


def test_write_behind_finish_flushes_and_keeps_the_file_open_to_read_back(tmp_path):
    handle = open(tmp_path / "out.bin", "w+b")
    out = durable.WriteBehind(handle)
    out.write(b"abc")
    out.finish()
    assert os.pread(handle.fileno(), 3, 0) == b"abc" and not handle.closed
    with pytest.raises(RuntimeError, match="after finish"):
        out.write(b"d")
    out.close()
    assert handle.closed


class _FailingFile:
    def __init__(self):
        self.closed = False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_write_behind_raises_the_write_error_and_never_blocks_after_it():
    handle = _FailingFile()
    out = durable.WriteBehind(handle, depth=1)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):  # the thread keeps draining after the error, so no put() blocks forever
            out.write(b"x")
        out.close()
    out.abort()  # after an error: closes without raising
    assert handle.closed
