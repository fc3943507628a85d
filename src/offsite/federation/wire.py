"""Adapter bundles through Flower: every file of the bundle, verbatim, as one byte Array of an ArrayRecord.

The receiver writes the files back into a fresh folder and reads it with `load_adapter`, so an update
from a client passes exactly the checks an adapter bundle passes on disk (its manifest, every file's
SHA-256, the signature where a key is trusted, the safetensors headers) before the plug-in's own checks.
Flower streams large Arrays in chunks, so a 7B model's 1.7 GB full-block adapter travels as one does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flwr.app import Array, ArrayRecord

from ..bundle import MANIFEST, SIGNATURE, Limits, bundle_members, check_member_name
from ..errors import BundleError

STYPE = "offsite.bundle-file"  # the Array's serialisation: the file's bytes, as they are on disk


def bundle_record(bundle_dir: str | Path) -> ArrayRecord:
    """The bundle folder's files (the manifest and signature too) as an ArrayRecord keyed by relative path."""
    bundle_dir = Path(bundle_dir)
    names = sorted(bundle_members(bundle_dir)) + [n for n in (MANIFEST, SIGNATURE) if (bundle_dir / n).is_file()]
    record = ArrayRecord()
    for rel in names:
        data = (bundle_dir / rel).read_bytes()
        record[rel] = Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)
    return record


def write_record(record: ArrayRecord, out_dir: str | Path, limits: Limits | None = None) -> Path:
    """Write an ArrayRecord from `bundle_record` as a bundle folder `out_dir` (which must not exist).
    Names that would leave the folder, anything but this module's byte Arrays and sizes over `limits`
    are refused before a byte is written; whether it is a valid bundle is for the reader to decide."""
    out_dir = Path(out_dir)
    limits = limits or Limits.from_env()
    if out_dir.exists():
        raise BundleError(f"{out_dir} already exists; a received bundle is written to a fresh folder")
    if MANIFEST not in record:
        raise BundleError(f"the received bundle has no {MANIFEST}")
    if len(record) > limits.max_files:
        raise BundleError(f"the received bundle has {len(record)} files (limit {limits.max_files})")
    total = 0
    for rel, array in record.items():
        if rel not in (MANIFEST, SIGNATURE):
            check_member_name(out_dir, rel)
        if not isinstance(array, Array) or array.stype != STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
            raise BundleError(f"the received bundle's file {rel[:100]!r} is not a byte array of this protocol")
        total += len(array.data)
        if len(array.data) > limits.max_file_bytes or total > limits.max_bundle_bytes:
            raise BundleError(f"the received bundle is larger than the limits ({limits.max_file_bytes} bytes a file, "
                              f"{limits.max_bundle_bytes} in all)")
    tmp = out_dir.with_name(f".{out_dir.name}.receiving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, array in record.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(array.data)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


__all__ = ["STYPE", "bundle_record", "write_record"]
