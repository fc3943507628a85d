"""Adapter bundles on the wire: a plain (uncompressed) tar of the bundle's files.

The client packs a bundle it has verified (`pack_bundle`). The server streams the body to a
temp file under a size limit, unpacks it strictly (regular files with safe names only, no
links, devices, sparse files or duplicates, bounded count and size), then checks it with the
same code as `offsite plugin`: `load_adapter` (manifest, every hash, the data owner's
signature when the owner registered its key, safetensors headers, dtypes, LoRA settings) and
`check_issued` against the published emulator whose fingerprint the adapter names (same
emulator, exactly its trainable blocks, same base model). Tensor shapes, values and norms need
the base model and are checked by the job, before the model is touched. A rejected upload
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ..adapter import AdapterBundle, load_adapter
from ..bundle import MANIFEST, SIGNATURE, read_manifest
from ..errors import OffsiteError
from ..plugin import check_issued, issued_emulator
from ..signing import key_id
from .errors import ServiceError
from .published import Catalog, check_member_name
from .store import Owner, Store, Upload, new_id

ARCHIVE_TYPE = "application/x-tar"
MAX_ARCHIVE_MEMBERS = 64
_CHUNK = 1 << 20


def pack_bundle(bundle_dir: str | Path, out_file: str | Path) -> dict:
    """Verify an adapter bundle and write its files (manifest and signature included) as a tar.

    Entries are sorted, with fixed owner, mode and time, so the same bundle packs to the same
    bytes. Returns the bundle's manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind="adapter", trusted_key=False)
    names = sorted(manifest["files"]) + [MANIFEST] + ([SIGNATURE] if (bundle_dir / SIGNATURE).is_file() else [])
    with tarfile.open(out_file, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = bundle_dir / name
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return manifest


def unpack_archive(archive: Path, out_dir: Path, max_bytes: int) -> None:
    """Unpack an uploaded tar into the new folder `out_dir`, refusing anything but plain files."""
    out_dir.mkdir()
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isdir() and name in ("", "."):
                    continue
                try:
                    check_member_name(name.rstrip("/") if member.isdir() else name)
                except OffsiteError:
                    raise ServiceError(422, f"archive member {name[:100]!r} has an unsafe name") from None
                if member.isdir():
                    continue
                if not member.isreg() or member.issparse():
                    raise ServiceError(422, f"archive member {name[:100]!r} is not a regular file (links, devices and sparse files are refused)")
                if name in seen:
                    raise ServiceError(422, f"archive holds {name[:100]!r} twice")
                seen.add(name)
                if len(seen) > MAX_ARCHIVE_MEMBERS:
                    raise ServiceError(422, f"archive holds more than {MAX_ARCHIVE_MEMBERS} files")
                total += member.size
                if total > max_bytes:
                    raise ServiceError(413, f"archive unpacks to more than the upload limit of {max_bytes} bytes")
                dest = out_dir / name
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    with source, open(dest, "xb") as target:
                        shutil.copyfileobj(source, target, _CHUNK)
                except OSError as e:
                    raise ServiceError(422, f"archive member {name[:100]!r} cannot be unpacked ({e.strerror or e})") from None
    except (tarfile.TarError, EOFError) as e:
        raise ServiceError(422, f"upload is not a readable tar archive ({str(e)[:100] or type(e).__name__})") from None
    if MANIFEST not in seen:
        raise ServiceError(422, f"archive holds no {MANIFEST} at its top level: not an offsite bundle")


def public_key_from_pem(pem: str):
    return serialization.load_pem_public_key(pem.encode())


def check_adapter(bundle_dir: Path, catalog: Catalog, owner: Owner):
    """(adapter, published emulator, signer key id) of an unpacked upload, or ServiceError(422)."""
    keys = [public_key_from_pem(owner.public_key)] if owner.public_key else False
    try:
        adapter: AdapterBundle = load_adapter(bundle_dir, trusted_key=keys)
        claimed = adapter.manifest["emulator"]["fingerprint"]
        emulator = catalog.by_fingerprint(claimed)
        if emulator is None:
            raise ServiceError(422, f"adapter was trained on emulator {claimed[:16]!r}, which this server does not publish")
        check_issued(adapter, issued_emulator(emulator.manifest))
    except ServiceError:
        raise
    except OffsiteError as e:
        # The temp path means nothing to the client: name the upload instead.
        raise ServiceError(422, str(e).replace(str(bundle_dir), "the uploaded bundle")) from None
    return adapter, emulator, (key_id(keys[0]) if keys else None)


def accept_upload(store: Store, catalog: Catalog, owner: Owner, archive: Path, sha256: str, size: int, max_bytes: int) -> Upload:
    """Unpack and check a received archive (in its temp folder); store it, or raise ServiceError."""
    bundle_dir = archive.parent / "bundle"
    unpack_archive(archive, bundle_dir, max_bytes)
    adapter, emulator, signer = check_adapter(bundle_dir, catalog, owner)
    upload = Upload(
        id=new_id("up"),
        owner=owner.name,
        created=time.time(),
        emulator=emulator.name,
        emulator_manifest=json.dumps(emulator.manifest),
        fingerprint=adapter.fingerprint,
        sha256=sha256,
        size=size,
        adapter_type=adapter.manifest["adapter"]["type"],
        blocks=sorted(adapter.blocks),
        signed_by=signer,
    )
    store.add_upload(upload, bundle_dir)
    return upload


class SizeLimitedWriter:
    """Receives an upload's body chunk by chunk: hashes it, writes it, stops past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.file = open(path, "xb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ServiceError(413, f"upload is larger than the limit of {self.max_bytes} bytes")
        self.hash.update(chunk)
        self.file.write(chunk)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
