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
