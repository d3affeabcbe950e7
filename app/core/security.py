"""API keys (stored as SHA-256 digests) and Hub-token encryption (Fernet)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken

KEY_PREFIX = "sgk"


def generate_api_key() -> tuple[str, str, str]:
    """A new key: ``(key_id, full_key, digest)``. Only the digest is stored."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32).replace("_", "x").replace("-", "y")
    full = f"{KEY_PREFIX}_{key_id}_{secret}"
    return key_id, full, hash_api_key(full)


def hash_api_key(full_key: str) -> str:
    # Keys carry 256 bits of entropy, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(full_key.encode()).hexdigest()


def parse_api_key(full_key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    parts = full_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def digest_matches(full_key: str, digest: str) -> bool:
    return hmac.compare_digest(hash_api_key(full_key), digest)


def encrypt_token(key: bytes, token: str) -> bytes:
    return Fernet(key).encrypt(token.encode())


def decrypt_token(key: bytes, blob: bytes) -> str:
    try:
        return Fernet(key).decrypt(blob).decode()
    except InvalidToken as err:
        raise ValueError("stored Hub token cannot be decrypted with the configured secret key") from err
