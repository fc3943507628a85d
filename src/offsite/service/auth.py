"""Per-data-owner API tokens.

A token is `ofs.<token id>.<secret>`: the id finds its row, the secret (32 random bytes) is
stored only as its SHA-256 and compared in constant time. A fast hash is enough because the
secret is random and long: there is nothing to brute-force, unlike a password. The token is
shown once, when it is created (`offsite serve-token`), and sent as `Authorization: Bearer`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from ..errors import ConfigError

TOKEN_PREFIX = "ofs"
OWNER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN = re.compile(r"ofs\.([0-9a-f]{12})\.([A-Za-z0-9_-]{43})")


def check_owner_name(name: str) -> str:
    if not isinstance(name, str) or not OWNER_NAME.fullmatch(name):
        raise ConfigError(f"data owner names are 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit), got {name!r}")
    return name


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(token, token id, SHA-256 of its secret)."""
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}.{token_id}.{secret}", token_id, secret_hash(secret)


def split_token(token: str) -> tuple[str, str] | None:
    """(token id, secret) of a well-formed token, else None."""
    match = _TOKEN.fullmatch(token or "")
    return (match[1], match[2]) if match else None


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(secret_hash(secret), stored_hash)
