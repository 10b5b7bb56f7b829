"""Encryption at rest for provider secrets: MultiFernet over TOLLGATE_ENCRYPTION_KEYS.

The first key encrypts; every listed key decrypts, so a new key is put first, `manage.py
rotate_encryption_keys` re-encrypts every stored secret with it, and the old key is then removed.
"""
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class DecryptionError(Exception):
    """A stored secret cannot be decrypted with any configured key (the message never holds the secret)."""


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            "TOLLGATE_ENCRYPTION_KEYS: each key must be 32 url-safe base64-encoded bytes (Fernet.generate_key())"
        ) from exc


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.TOLLGATE_ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise DecryptionError("stored secret cannot be decrypted with the configured TOLLGATE_ENCRYPTION_KEYS") from exc


def rotate(token: str) -> str:
    """Re-encrypt a token under the primary key (MultiFernet.rotate)."""
    try:
        return fernet().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise DecryptionError("stored secret cannot be decrypted with the configured TOLLGATE_ENCRYPTION_KEYS") from exc
