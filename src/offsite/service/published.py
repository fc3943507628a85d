"""The emulator bundles the owner publishes, and the HTTP byte ranges they are served in.

The owner points the service at a directory whose subdirectories are emulator bundles (as
`offsite compress` writes them). Only their manifests are read here (checked for structure,
not hashed: hashing gigabytes per listing would be slow, and the client verifies every byte
it receives against the manifest anyway). Only the files a manifest lists, plus the manifest
and its signature, can be downloaded; names are checked and links are never followed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ..bundle import MANIFEST, SIGNATURE, bundle_fingerprint, bundle_members, read_manifest
from ..emulator import check_blocks
from ..errors import ConfigError, OffsiteError

log = logging.getLogger("offsite.service")
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_MEMBER_NAME = 1024
MAX_MEMBER_DEPTH = 16


def check_member_name(rel: object) -> str:
    """A bundle member name that stays inside its folder: relative, POSIX, no '.', '..' or empty parts."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (
        not parts
        or len(rel) > MAX_MEMBER_NAME
        or len(parts) > MAX_MEMBER_DEPTH
        or "\\" in rel
        or "\x00" in rel
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise OffsiteError(f"unsafe file name {str(rel)[:100]!r} in a bundle")
    return rel


@dataclass(frozen=True)
class PublishedBundle:
    name: str
    path: Path
    manifest: dict
    signed: bool

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)

    @property
    def size(self) -> int:
        return sum(meta["size"] for meta in self.manifest["files"].values())


class Catalog:
    """The bundles under `root`, re-read whenever a manifest changes on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"bundles directory not found: {self.root}")
        self._cache: dict[str, tuple[tuple, PublishedBundle | None]] = {}
        self._lock = threading.Lock()

    def bundles(self) -> list[PublishedBundle]:
        names = sorted(e.name for e in os.scandir(self.root) if BUNDLE_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
        return [b for b in (self.get(n) for n in names) if b is not None]

    def get(self, name: str) -> PublishedBundle | None:
        if not BUNDLE_NAME.fullmatch(name):
            return None
        path = self.root / name
        try:
            st_dir = os.lstat(path)
            st = os.lstat(path / MANIFEST)
        except OSError:
            return None
        if not stat.S_ISDIR(st_dir.st_mode):
            return None
        signed = os.path.lexists(path / SIGNATURE)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, signed)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        try:
            manifest = read_manifest(path, kind="emulator", verify=False, trusted_key=False)
            check_blocks(manifest, path)
            bundle_members(path)  # lstat walk: a link anywhere inside (a folder too) and the bundle is not published
            bundle = PublishedBundle(name, path, manifest, signed)
        except OffsiteError as e:
            log.warning("not publishing %s: %s", path, e)
            bundle = None
        with self._lock:
            self._cache[name] = (key, bundle)
        return bundle

    def by_fingerprint(self, fingerprint: str) -> PublishedBundle | None:
        return next((b for b in self.bundles() if b.fingerprint == fingerprint), None)


@dataclass(frozen=True)
class Member:
    """One downloadable file of a published bundle."""

    bundle: Path
    rel: str
    etag: str  # the SHA-256 the manifest gives it (manifest and signature: of their bytes)

    def open(self):
        return open_regular(self.bundle, self.rel)


def find_member(bundle: PublishedBundle, rel: str) -> Member | None:
    """The file `rel` of `bundle` if it may be downloaded, else None."""
    if rel in (MANIFEST, SIGNATURE):  # small; hashed when asked for
        opened = open_regular(bundle.path, rel)
        if opened is None:
            return None
        with opened[0] as f:
            return Member(bundle.path, rel, hashlib.sha256(f.read()).hexdigest())
    meta = bundle.manifest["files"].get(rel)
    return Member(bundle.path, rel, meta["sha256"]) if meta is not None else None


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def open_regular(directory: Path, rel: str):
    """Open `directory/rel` for reading without following a link at *any* component (each folder is
    opened relative to the one before, O_NOFOLLOW); (file, size), or None if it is not a regular file
    reached through real folders. O_NOFOLLOW on the whole path guards only its last component."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    try:
        folder = os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), st.st_size


class RangeNotSatisfiable(Exception):
    pass


_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")  # 19 digits hold any file size; more is ignored (int() of
# thousands of digits raises past Python's conversion limit: it was a 500)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte (inclusive) a `Range` header asks for, or None for the whole file.

    One range only (`a-b`, `a-`, `-n`); anything else is ignored, as RFC 9110 allows, and
    the whole file is sent. Raises RangeNotSatisfiable when the range starts past the end
    (or asks for the last 0 bytes, or the file is empty): the answer is 416.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:  # suffix: the last n bytes
        n = int(match[2])
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size - 1
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None  # invalid: ignored
    if first >= size:
        raise RangeNotSatisfiable
    return first, min(int(match[2]) if match[2] else size - 1, size - 1)
