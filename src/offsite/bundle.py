"""Bundles: directories that cross between the parties, with a manifest that hashes every file.

An emulator bundle is an ordinary Hugging Face checkpoint (config, safetensors weights,
tokenizer) plus `manifest.json`; an adapter bundle holds the adapter weights keyed by the
*original* block indices plus its manifest. Bundles are written into a temporary sibling
directory and renamed into place, so a finished bundle is never half-written and an existing
one is never overwritten unless asked. Reading verifies every hash before anything is loaded;
only safetensors and JSON are ever read, nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .errors import BundleError

MANIFEST = "manifest.json"
FORMAT = "offsite-bundle"
FORMAT_VERSION = 1
KINDS = ("emulator", "adapter", "plugged")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in key order.

    Identifies the exact base weights an emulator was made from, so an adapter is only ever
    plugged into the model it was trained for.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _listed_files(directory: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def write_bundle(
    out_dir: str | Path,
    kind: str,
    manifest: dict,
    write_files: Callable[[Path], None],
    overwrite: bool = False,
) -> Path:
    """Create a bundle at `out_dir`: `write_files(tmp)` fills a temp dir, then hashes + manifest, then rename.

    An existing `out_dir` is refused unless `overwrite`; then it is replaced only once the new
    bundle is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_files(tmp)
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "created_by": f"offsite {__version__}",
            **manifest,
            "files": _listed_files(tmp),
        }
        _write_json(tmp / MANIFEST, full)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.replace(src, dst)
        return
    backup = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(bundle_dir: str | Path, kind: str | None = None, verify: bool = True) -> dict:
    """Load and check a bundle's manifest; with `verify`, every listed file must match its hash.

    Files present but not listed are rejected as well: a bundle is exactly what its manifest says.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle not found (no such directory): {bundle_dir}")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"not an offsite bundle (no {MANIFEST}): {bundle_dir}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is too large ({path.stat().st_size} bytes): {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"manifest is not valid JSON ({e}): {path}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"not an offsite bundle manifest: {path}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"unsupported bundle format version {manifest.get('format_version')!r}: {path}")
    if manifest.get("kind") not in KINDS:
        raise BundleError(f"unknown bundle kind {manifest.get('kind')!r}: {path}")
    if kind is not None and manifest["kind"] != kind:
        raise BundleError(f"expected an {kind} bundle, got an {manifest['kind']} bundle: {bundle_dir}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"manifest lists no files: {path}")
    if verify:
        verify_files(bundle_dir, files)
    return manifest


def _safe_member(bundle_dir: Path, rel: object) -> Path:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
        raise BundleError(f"manifest names an unsafe path {rel!r} in {bundle_dir}")
    path = bundle_dir / rel
    if path.is_symlink() or not path.resolve().is_relative_to(bundle_dir.resolve()):
        raise BundleError(f"bundle file {rel} points outside the bundle: {bundle_dir}")
    return path


def verify_files(bundle_dir: Path, files: dict) -> None:
    for rel, meta in files.items():
        path = _safe_member(bundle_dir, rel)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("size"), int):
            raise BundleError(f"manifest entry for {rel} is malformed in {bundle_dir}")
        if not path.is_file():
            raise BundleError(f"bundle file missing: {rel} in {bundle_dir}")
        if path.stat().st_size != meta["size"]:
            raise BundleError(f"bundle file {rel} has size {path.stat().st_size}, manifest says {meta['size']}: {bundle_dir}")
        if sha256_file(path) != meta["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its SHA-256 (corrupt or tampered): {bundle_dir}")
    extra = sorted(
        p.relative_to(bundle_dir).as_posix()
        for p in bundle_dir.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST and p.relative_to(bundle_dir).as_posix() not in files
    )
    if extra:
        raise BundleError(f"bundle holds files its manifest does not list: {extra[:5]} in {bundle_dir}")


def bundle_fingerprint(manifest: dict) -> str:
    """Identity of a bundle: SHA-256 over its file hashes (what the manifest vouches for)."""
    entries = sorted((name, meta["sha256"]) for name, meta in manifest["files"].items())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: object) -> torch.dtype:
    """A floating dtype from its name, as written in manifests and on the command line."""
    if name not in DTYPES:
        raise BundleError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]
