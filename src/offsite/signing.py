"""Ed25519 signatures over bundle manifests, so each party can verify who produced a bundle.

The manifest already pins every file of a bundle by SHA-256, so signing its exact bytes signs
the whole bundle. A key pair is two PEM files: `offsite.key` (private, mode 600, never leaves
its owner) and `offsite.pub` (handed to the other party out of band). The signature travels in
the bundle as a small JSON file beside the manifest (see `bundle.SIGNATURE`).

Which keys are trusted is the caller's choice: an explicit `trusted_key=` (a path, a public
key, or a list of them; a string may name several files separated by `os.pathsep`), else the
`OFFSITE_TRUSTED_KEY` environment variable (the same), else none, in which case signatures
are not checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SigningError

PRIVATE_NAME, PUBLIC_NAME = "offsite.key", "offsite.pub"
TRUSTED_KEY_ENV = "OFFSITE_TRUSTED_KEY"
ALGORITHM = "ed25519"
MAX_KEY_BYTES = 16 * 1024

PrivateKeyLike = str | os.PathLike | Ed25519PrivateKey
PublicKeyLike = str | os.PathLike | Ed25519PublicKey
TrustedKeys = PublicKeyLike | Iterable[PublicKeyLike] | None


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new `offsite.key` (mode 600) and `offsite.pub` into `out_dir`; never overwrites either."""
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningError(f"key file already exists, not overwriting: {path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _create_exclusive(private_path, pem, 0o600)
    try:
        _create_exclusive(public_path, pub, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temp file, then hard-link it to `path`: atomic, and fails if `path` exists."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen beyond `mode`
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise SigningError(f"key file already exists, not overwriting: {path}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise SigningError(f"{what} key file not found: {path}")
    if path.stat().st_size > MAX_KEY_BYTES:
        raise SigningError(f"{what} key file is too large to be a key: {path}")
    return path.read_bytes()


def load_private_key(key: PrivateKeyLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (or the key itself)."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    path = Path(key)
    try:
        loaded = serialization.load_pem_private_key(_read_key_file(path, "private"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningError(f"not an unencrypted PEM private key: {path}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningError(f"not an Ed25519 private key: {path}")
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (or the key itself)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    path = Path(key)
    try:
        loaded = serialization.load_pem_public_key(_read_key_file(path, "public"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningError(f"not a PEM public key: {path}") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SigningError(f"not an Ed25519 public key: {path}")
    return loaded


def trusted_keys(trusted: TrustedKeys = None) -> list[Ed25519PublicKey]:
    """The public keys to check signatures against: `trusted`, else $OFFSITE_TRUSTED_KEY, else none."""
    if trusted is None:
        trusted = os.environ.get(TRUSTED_KEY_ENV, "")
    if isinstance(trusted, str):
        trusted = [p for p in trusted.split(os.pathsep) if p]
    elif isinstance(trusted, (os.PathLike, Ed25519PublicKey)):
        trusted = [trusted]
    return [load_public_key(k) for k in trusted]


def _signature_record(key_id_: str, signature: bytes) -> bytes:
    record = {"algorithm": ALGORITHM, "key_id": key_id_, "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(record, indent=2) + "\n").encode()


def sign_manifest(private_key: PrivateKeyLike, manifest_bytes: bytes) -> bytes:
    """The signature file's content for these exact manifest bytes."""
    key = load_private_key(private_key)
    return _signature_record(key_id(key.public_key()), key.sign(manifest_bytes))


def verify_manifest(signature_bytes: bytes | None, manifest_bytes: bytes, keys: list[Ed25519PublicKey]) -> str:
    """Check a signature file against the manifest bytes; return the signer's key id.

    The signature file must be exactly what `sign_manifest` writes for a trusted key, so that a
    change of any byte of a signed bundle, the signature file included, is rejected. Raises
    `ValueError` with a short reason (the caller names the bundle).
    """
    if signature_bytes is None:
        raise ValueError("it is not signed")
    try:
        record = json.loads(signature_bytes.decode("utf-8"))
        if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM or not isinstance(record.get("signature"), str):
            raise ValueError
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, UnicodeDecodeError, binascii.Error, RecursionError):
        raise ValueError("its signature file is malformed") from None
    for key in keys:
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        if signature_bytes != _signature_record(key_id(key), signature):
            raise ValueError("its signature file was altered")
        return key_id(key)
    claimed = record.get("key_id")
    who = f"key {claimed}" if isinstance(claimed, str) and len(claimed) <= 64 else "an unknown key"
    raise ValueError(
        f"its signature does not verify with the trusted key(s) {', '.join(key_id(k) for k in keys)} "
        f"(signed by {who}, or the manifest was changed)"
    )
