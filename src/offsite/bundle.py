"""Bundles: directories that cross between the parties, with a manifest that hashes every file.

An emulator bundle is an ordinary Hugging Face checkpoint (config, safetensors weights,
tokenizer) plus `manifest.json`; an adapter bundle holds the adapter weights keyed by the
*original* block indices plus its manifest. A bundle may also carry `manifest.sig`, an Ed25519
signature of the exact manifest bytes (see `offsite.signing`).

Writing: files go into a temporary sibling directory, are hashed and fsynced, the manifest (and
signature) is written last, and the directory is renamed into place, so a finished bundle is
never half-written, a killed writer leaves at most a hidden `.NAME.tmp-PID-*` directory (removed
by the next write to the same place), and an existing bundle is never overwritten unless asked.

Reading never executes anything and never leaves the bundle directory: only regular files are
accepted (no symbolic links, devices or FIFOs anywhere), manifest paths must be plain relative
names, sizes are checked against `Limits` with `lstat` before a byte is read, the signature is
checked when a trusted key is configured, every hash is verified, and only safetensors and
JSON are ever parsed (nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, signing
from .durable import WriteBehind, fsync_path, write_synced
from .errors import BundleError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "offsite-bundle"
FORMAT_VERSION = 1
KINDS = ("emulator", "adapter", "plugged", "pema-head", "pema-adapter", "scaleot-artifact")
MAX_SIGNATURE_BYTES = 4096
MAX_JSON_BYTES = 64 * 1024 * 1024  # any JSON side file (config, tokenizer, LoRA config)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_CHUNK = 1 << 22
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Size limits checked (with lstat) before any file of a bundle is read.

    Defaults allow a bundle of a 100B-parameter fp32 model; tighten them for adapter bundles
    from a party you do not trust, e.g. `OFFSITE_MAX_BUNDLE_BYTES=20000000000`.
    Environment variables: OFFSITE_MAX_MANIFEST_BYTES, OFFSITE_MAX_FILE_BYTES,
    OFFSITE_MAX_BUNDLE_BYTES, OFFSITE_MAX_FILES.
    """

    max_manifest_bytes: int = 4 * 1024 * 1024
    max_file_bytes: int = 64 * _GiB
    max_bundle_bytes: int = 512 * _GiB
    max_files: int = 10_000

    @classmethod
    def from_env(cls) -> "Limits":
        values = {}
        for name in ("max_manifest_bytes", "max_file_bytes", "max_bundle_bytes", "max_files"):
            raw = os.environ.get("OFFSITE_" + name.upper())
            if raw:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise BundleError(f"OFFSITE_{name.upper()} must be an integer, got {raw!r}") from None
        return cls(**values)


MAX_MANIFEST_BYTES = Limits.max_manifest_bytes


def _open_nofollow(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))


def sha256_file(path: Path, sync: bool = False) -> str:
    """SHA-256 of a regular file (never through a symbolic link); `sync` also fsyncs it."""
    h = hashlib.sha256()
    with os.fdopen(_open_nofollow(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def read_member(path: Path, max_bytes: int, what: str, writable: bool = False) -> bytes | bytearray:
    """The bytes of one bundle file, refusing links and anything larger than `max_bytes` (checked first);
    `writable` gives a private bytearray that tensors may view without a second copy."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"bundle file missing: {path.name} in {path.parent}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} is not a regular file: {path}")
    if st.st_size > max_bytes:
        raise BundleError(f"{what} is too large ({st.st_size} bytes, limit {max_bytes}): {path}")
    with os.fdopen(_open_nofollow(path), "rb") as f:
        if writable:
            data = bytearray(min(st.st_size, max_bytes) + 1)  # one byte more than expected: a file that grew is caught
            del data[f.readinto(data):]
        else:
            data = f.read(min(st.st_size, max_bytes) + 1)
    if len(data) > max_bytes:
        raise BundleError(f"{what} is too large (grew past the limit of {max_bytes} bytes while read): {path}")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def parse_json(data: bytes, where: Path | str) -> object:
    """Strict JSON (UTF-8, no NaN/Infinity, bounded depth) or a one-line BundleError naming `where`."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BundleError(f"not valid JSON ({reason}): {where}") from None


def read_json_member(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES, meta: dict | None = None) -> object:
    """A JSON bundle file; with its manifest entry `meta`, the bytes parsed are checked against its hash."""
    data = read_member(path, max_bytes, what)
    if meta is not None and (len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256")):
        raise BundleError(f"bundle file {path.name} does not match its SHA-256 (corrupt, tampered or changed while read): {path.parent}")
    return parse_json(data, path)


@torch.no_grad()
def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, for any dtype (bfloat16 included)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class Fingerprint:
    """`model_fingerprint` fed one tensor at a time, in sorted name order, each in pieces if need be
    (offsite.streaming hashes a checkpoint it never loads)."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self._hash.update(f"{name}|{dtype}|{tuple(shape)}\n".encode())

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in key order.

    Identifies the exact base weights an emulator was made from, so an adapter is only ever
    plugged into the model it was trained for.
    """
    fingerprint = Fingerprint()
    for name, tensor in sorted(model.state_dict().items()):
        fingerprint.begin(name, tensor.dtype, tuple(tensor.shape))
        fingerprint.update(tensor_bytes(tensor))
    return fingerprint.hexdigest()


def _walk(directory: Path, limits: Limits | None = None) -> dict[str, int]:
    """Every file below `directory` (relative POSIX path -> size), except the top-level manifest
    and signature, without following links. Anything but regular files and directories is an
    error, and so is exceeding `limits` (decided from lstat, before any file is opened)."""
    found: dict[str, int] = {}
    total = 0
    stack = [(directory, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise BundleError(f"cannot list bundle folder {prefix or '.'} ({e.strerror}): {directory}") from None
        for entry in entries:
            rel = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:  # removed (or made unreadable) while the folder was being read
                raise BundleError(f"bundle file {rel} vanished while the bundle was read ({e.strerror}): {directory}") from None
            if stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), rel + "/"))
                continue
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"bundle file {rel} is a symbolic link, which could point outside the bundle: {directory}")
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"bundle file {rel} is not a regular file: {directory}")
            if rel in (MANIFEST, SIGNATURE):
                continue
            found[rel] = st.st_size
            total += st.st_size
            if limits is not None:
                if len(found) > limits.max_files:
                    raise BundleError(f"bundle holds more than {limits.max_files} files: {directory}")
                if st.st_size > limits.max_file_bytes:
                    raise BundleError(f"bundle file {rel} is too large ({st.st_size} bytes, limit {limits.max_file_bytes}): {directory}")
                if total > limits.max_bundle_bytes:
                    raise BundleError(f"bundle is larger than the limit of {limits.max_bundle_bytes} bytes: {directory}")
    return found


def bundle_members(directory: Path, limits: Limits | None = None) -> dict[str, int]:
    """Every file of a bundle folder (relative path -> size) from lstat alone; a link anywhere, to a
    file or a folder, or anything but regular files and folders, is a BundleError."""
    return _walk(directory, limits)


def _listed_files(directory: Path, sync: bool = False, hashed: dict[str, str] | None = None) -> dict[str, dict]:
    """The manifest's file table for `directory`: SHA-256 and size of every file. `hashed` holds the
    SHA-256 of files their writer hashed as it wrote them (a 10 GB shard is not read back)."""
    hashed = hashed or {}
    out = {}
    for rel, size in sorted(_walk(directory).items()):
        if rel in hashed:
            if sync:
                fsync_path(directory / rel)
            out[rel] = {"sha256": hashed[rel], "size": size}
        else:
            out[rel] = {"sha256": sha256_file(directory / rel, sync), "size": size}
    return out


# ---------------------------------------------------------------- writing
def write_bundle(
    out_dir: str | Path,
    kind: str,
    manifest: dict,
    write_files: Callable[[Path], dict[str, str] | None],
    overwrite: bool = False,
    sign_key: signing.PrivateKeyLike | None = None,
) -> Path:
    """Create a bundle at `out_dir`: `write_files(tmp)` fills a temp dir, then hashes + manifest
    (+ signature with `sign_key`), then fsync and rename. `write_files` may return the SHA-256 of
    files it hashed while writing them ({relative path: hex digest}); those are not read again.

    An existing `out_dir` is refused unless `overwrite`; then it is replaced only once the new
    bundle is complete.
    """
    out_dir = Path(out_dir)
    key = signing.load_private_key(sign_key) if sign_key is not None else None  # fail before any work
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        hashed = write_files(tmp)
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "created_by": f"offsite {__version__}",
            **manifest,
            "files": _listed_files(tmp, sync=True, hashed=hashed),
        }
        data = (json.dumps(full, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
        write_synced(tmp / MANIFEST, data)
        if key is not None:
            write_synced(tmp / SIGNATURE, signing.sign_manifest(key, data))
        fsync_path(tmp)
        _replace_dir(tmp, out_dir)
        fsync_path(out_dir.parent)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _recover_interrupted(out_dir: Path) -> None:
    """Clean up after a writer of `out_dir` that was killed: remove its temp dirs, and put back
    the previous bundle if it died between the two renames of an overwrite. Only leftovers of
    processes that no longer exist (on this machine) are touched."""
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(tmp|old)-(\d+)(-.*)?")
    for entry in sorted(out_dir.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or _pid_alive(int(match[2])) or entry.is_symlink() or not entry.is_dir():
            continue
        if match[1] == "old" and not out_dir.exists():
            os.replace(entry, out_dir)
        else:
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------- reading
def read_manifest(
    bundle_dir: str | Path,
    kind: str | None = None,
    verify: bool = True,
    trusted_key: signing.TrustedKeys | bool = None,
    limits: Limits | None = None,
    hashed_later: frozenset[str] = frozenset(),
) -> dict:
    """Load and check a bundle's manifest; with `verify`, every listed file must match its hash.
    `hashed_later`: files whose reader hashes the very bytes it uses (`load_private_safetensors`);
    they are checked here for presence and size only, so a multi-GB file is not read twice.

    Files present but not listed are rejected as well: a bundle is exactly what its manifest
    says. With a trusted key (`trusted_key`, else $OFFSITE_TRUSTED_KEY; `False` to skip) the
    manifest must carry a valid signature by one of the trusted keys.
    """
    bundle_dir = Path(bundle_dir)
    limits = limits or Limits.from_env()
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle not found (no such directory): {bundle_dir}")
    path = bundle_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"not an offsite bundle (no {MANIFEST}): {bundle_dir}")
    data = read_member(path, limits.max_manifest_bytes, "manifest")
    keys = [] if trusted_key is False else signing.trusted_keys(trusted_key)
    if keys:
        sig_path = bundle_dir / SIGNATURE
        sig = read_member(sig_path, MAX_SIGNATURE_BYTES, "signature") if sig_path.exists() or sig_path.is_symlink() else None
        try:
            signing.verify_manifest(sig, data, keys)
        except ValueError as e:
            raise BundleError(f"bundle {bundle_dir} is rejected: {e}") from None
    manifest = parse_json(data, path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"not an offsite bundle manifest: {path}")
    if manifest.get("format_version") != FORMAT_VERSION or type(manifest.get("format_version")) is not int:
        raise BundleError(f"unsupported bundle format version {_short(manifest.get('format_version'))}: {path}")
    if manifest.get("kind") not in KINDS:
        raise BundleError(f"unknown bundle kind {_short(manifest.get('kind'))}: {path}")
    if kind is not None and manifest["kind"] != kind:
        raise BundleError(f"expected an {kind} bundle, got an {manifest['kind']} bundle: {bundle_dir}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"manifest lists no files: {path}")
    _check_file_table(bundle_dir, files, limits)
    if verify:
        verify_files(bundle_dir, files, limits, hashed_later)
    return manifest


def _short(value: object, limit: int = 40) -> str:
    """repr of an untrusted value, cut to `limit` characters (error messages stay one short line)."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 20 else f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_file_table(bundle_dir: Path, files: dict, limits: Limits) -> None:
    if len(files) > limits.max_files:
        raise BundleError(f"manifest lists more than {limits.max_files} files: {bundle_dir}")
    total = 0
    for rel, meta in files.items():
        check_member_name(bundle_dir, rel)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("sha256"), str)
            or not _SHA256.fullmatch(meta["sha256"])
            or type(meta.get("size")) is not int
            or meta["size"] < 0
        ):
            raise BundleError(f"manifest entry for {rel} is malformed in {bundle_dir}")
        if meta["size"] > limits.max_file_bytes:
            raise BundleError(f"manifest lists {rel} with {meta['size']} bytes, over the limit of {limits.max_file_bytes}: {bundle_dir}")
        total += meta["size"]
    if total > limits.max_bundle_bytes:
        raise BundleError(f"manifest lists {total} bytes, over the bundle limit of {limits.max_bundle_bytes}: {bundle_dir}")


def check_member_name(bundle_dir: Path, rel: object) -> None:
    """A manifest's file name must stay inside the bundle (no '..', absolute or odd paths)."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (
        not parts
        or len(rel) > 1024
        or "\\" in rel
        or "\x00" in rel
        or any(p in ("", ".", "..") for p in parts)
        or rel in (MANIFEST, SIGNATURE)
    ):
        raise BundleError(f"manifest names an unsafe path {_short(rel, 100)} in {bundle_dir}")


def verify_files(bundle_dir: Path, files: dict, limits: Limits | None = None, hashed_later: frozenset[str] = frozenset()) -> None:
    """The directory holds exactly the listed files, as regular files of the listed sizes and hashes."""
    present = _walk(bundle_dir, limits or Limits.from_env())
    extra = sorted(set(present) - set(files))
    if extra:
        raise BundleError(f"bundle holds files its manifest does not list: {extra[:5]} in {bundle_dir}")
    for rel, meta in files.items():
        if rel not in present:
            raise BundleError(f"bundle file missing: {rel} in {bundle_dir}")
        if present[rel] != meta["size"]:
            raise BundleError(f"bundle file {rel} has size {present[rel]}, manifest says {meta['size']}: {bundle_dir}")
    for rel, meta in files.items():
        if rel in hashed_later:
            continue
        if sha256_file(bundle_dir / rel) != meta["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its SHA-256 (corrupt or tampered): {bundle_dir}")


def bundle_fingerprint(manifest: dict) -> str:
    """Identity of a bundle: SHA-256 over its file hashes (what the manifest vouches for)."""
    entries = sorted((name, meta["sha256"]) for name, meta in manifest["files"].items())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# ---------------------------------------------------------------- safetensors headers
# safetensors dtype name -> bytes per element (sub-byte types are rejected).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_TENSOR_DIMS = 8
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file's header against its size before the library reads it.

    Returns name -> (dtype, shape). Every tensor must have a known dtype, a shape of
    non-negative dimensions, and a byte range that matches dtype x shape; the ranges must tile
    the data section exactly. So a huge declared dimension, an overlap or a truncated file is a
    BundleError here, never an allocation or a crash later.
    """
    try:
        size = os.lstat(path).st_size
    except FileNotFoundError:
        raise BundleError(f"bundle file missing: {path.name} in {path.parent}") from None
    with os.fdopen(_open_nofollow(path), "rb") as f:
        return _parse_header(_reader(f), size, f"{path.name} in {path.parent}", path)[0]


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, begin, end) of a safetensors file, validated as by `safetensors_header`;
    begin/end are byte offsets into the file, for reading a tensor in pieces."""
    size = os.lstat(path).st_size if path.exists() else None
    if size is None:
        raise BundleError(f"file missing: {path.name} in {path.parent}")
    with os.fdopen(_open_nofollow(path), "rb") as f:
        return _parse_header(_reader(f), size, f"{path.name} in {path.parent}", path)[1]


def _reader(f):
    def read(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)

    return read


def _parse_header(read, size: int, where: str, json_where) -> tuple[dict, dict]:
    """(name -> (dtype, shape), name -> (dtype, shape, begin, end)) of the safetensors bytes `read(offset, n)`
    gives, `size` long: the header checked against the size (`_check_header`), offsets absolute."""
    n = _header_length(read(0, 8), size, where)
    raw = parse_json(read(8, n), json_where)
    header = _check_header(raw, size - 8 - n, where)
    start = 8 + n
    layout = {name: (code, shape, start + raw[name]["data_offsets"][0], start + raw[name]["data_offsets"][1])
              for name, (code, shape) in header.items()}
    return header, layout


def _header_length(prefix: bytes, size: int, where: str) -> int:
    if len(prefix) < 8:
        raise BundleError(f"{where} is not a safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_SAFETENSORS_HEADER or n > size - 8:
        raise BundleError(f"{where} declares a header of {n} bytes in a file of {size} bytes")
    return n


class PrivateTensors(Mapping):
    """The tensors of a verified safetensors file, read one at a time from a private copy: an unlinked
    temporary file that only this process holds, filled while the original was hashed. So the bytes
    used are the bytes verified (as with `load_verified_safetensors`), and memory holds one tensor, not
    the file (a 7B model's 2+2 full-block adapter is 1.7 GB). Each access reads the tensor anew."""

    def __init__(self, handle, layout: dict[str, tuple[str, tuple[int, ...], int, int]]):
        self._handle = handle
        self._layout = layout

    def __getitem__(self, name: str) -> torch.Tensor:
        code, shape, begin, end = self._layout[name]
        if end == begin:
            return torch.empty(shape, dtype=TORCH_DTYPES[code])
        data = bytearray(os.pread(self._handle.fileno(), end - begin, begin))
        if len(data) != end - begin:
            raise BundleError(f"the private copy of an adapter ended inside tensor {name[:100]}")
        return torch.frombuffer(data, dtype=TORCH_DTYPES[code]).reshape(shape)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self._layout

    def __iter__(self):
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)


def load_private_safetensors(bundle_dir: Path, rel: str, manifest: dict, limits: Limits | None = None) -> tuple[PrivateTensors, dict]:
    """`load_verified_safetensors` for files larger than memory should hold: the file is copied in pieces
    into an unlinked temporary file while it is hashed, then its tensors are read from that copy on demand."""
    limits = limits or Limits.from_env()
    meta = manifest["files"].get(rel)
    if not isinstance(meta, dict):
        raise BundleError(f"bundle lacks {rel}: {bundle_dir}")
    path = bundle_dir / rel
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle file {rel} is missing or not a regular file: {bundle_dir}")
    if st.st_size > limits.max_file_bytes:
        raise BundleError(f"{rel} is too large ({st.st_size} bytes, limit {limits.max_file_bytes}): {bundle_dir}")
    handle = tempfile.TemporaryFile(prefix="offsite-private-")
    h, size = hashlib.sha256(), 0
    copy = WriteBehind(handle)  # the copy's disk writes overlap the hashing and the next read
    try:
        with os.fdopen(_open_nofollow(path), "rb") as f:
            while chunk := f.read(64 << 20):
                size += len(chunk)
                if size > limits.max_file_bytes:
                    break
                h.update(chunk)
                copy.write(chunk)
        copy.finish()
    except BaseException:
        copy.abort()
        raise
    if size != meta["size"] or h.hexdigest() != meta["sha256"]:
        handle.close()
        raise BundleError(f"bundle file {rel} does not match its SHA-256 (corrupt, tampered or changed while read): {bundle_dir}")
    where = f"{rel} in {bundle_dir}"
    header, layout = _parse_header(lambda offset, n: os.pread(handle.fileno(), n, offset), size, where, where)
    return PrivateTensors(handle, layout), header


def load_verified_safetensors(bundle_dir: Path, rel: str, manifest: dict, limits: Limits | None = None) -> tuple[dict, dict]:
    """(tensors, header) of bundle file `rel`, from one read whose bytes are checked against the manifest.

    Hashing a file and then reopening it by path (or memory-mapping it) lets a concurrent writer
    swap the content in between; here the bytes that are hashed are the bytes that are parsed, and
    the tensors are views of that private buffer (never of the file), so nothing written to the file
    later reaches them.
    """
    limits = limits or Limits.from_env()
    meta = manifest["files"].get(rel)
    if not isinstance(meta, dict):
        raise BundleError(f"bundle lacks {rel}: {bundle_dir}")
    data = read_member(bundle_dir / rel, limits.max_file_bytes, rel, writable=True)
    if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise BundleError(f"bundle file {rel} does not match its SHA-256 (corrupt, tampered or changed while read): {bundle_dir}")
    where = f"{rel} in {bundle_dir}"
    header, layout = _parse_header(lambda offset, n: bytes(data[offset : offset + n]), len(data), where, where)
    # Views into this private buffer: one copy of the file in memory (a 2 GB adapter needs 2 GB, not 4).
    tensors = {}
    for name, (code, shape, begin, end) in layout.items():
        dtype = TORCH_DTYPES[code]
        size = SAFETENSORS_DTYPES[code]
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif begin % size:  # misaligned for its dtype: a copy of its own
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=(end - begin) // size, offset=begin).reshape(shape)
    return tensors, header


def _check_header(header: object, data_size: int, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    if not isinstance(header, dict):
        raise BundleError(f"{where} has a safetensors header that is not a JSON object")
    spans, out = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise BundleError(f"{where} has malformed safetensors metadata")
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in SAFETENSORS_DTYPES
            and isinstance(info.get("shape"), list)
            and len(info["shape"]) <= MAX_TENSOR_DIMS
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int and o >= 0 for o in info["data_offsets"])
        )
        if not ok:
            raise BundleError(f"{where} has a malformed entry for tensor {name[:100]!r}")
        begin, end = info["data_offsets"]
        if math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]] != end - begin or end > data_size:
            raise BundleError(f"{where}: tensor {name[:100]!r} of shape {info['shape']} does not fit its byte range or the file")
        spans.append((begin, end))
        out[name] = (info["dtype"], tuple(info["shape"]))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise BundleError(f"{where}: tensor byte ranges overlap or leave gaps")
        position = end
    if position != data_size:
        raise BundleError(f"{where}: the tensors do not cover the file's data section ({position} of {data_size} bytes)")
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: object) -> torch.dtype:
    """A floating dtype from its name, as written in manifests and on the command line."""
    if not isinstance(name, str) or name not in DTYPES:
        raise BundleError(f"unsupported dtype {_short(name)}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]
