"""Tollgate key format: ``tg_<env>_<43 base62 chars of 32 random bytes><6 base62 chars of CRC32>``.

The fixed prefix lets secret scanners find leaked keys; the checksum rejects a mistyped key without a
database lookup. Only SHA-256 of the key and a short visible prefix are ever stored.
"""
import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_BYTES = 32
BODY_LEN = 43  # ceil(256 bits / log2(62) bits)
CHECKSUM_LEN = 6  # ceil(32 bits / log2(62) bits)
VISIBLE_PREFIX_LEN = 12  # "tg_l_" + 7 characters: enough to tell keys apart in lists, useless to an attacker
KEY_PATTERN = re.compile(r"^tg_[lt]_[0-9A-Za-z]{%d}$" % (BODY_LEN + CHECKSUM_LEN))


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(ALPHABET[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def _checksum(head: str) -> str:
    return _base62(zlib.crc32(head.encode()), CHECKSUM_LEN)


@dataclass(frozen=True)
class NewKey:
    secret: str  # shown once, never stored
    prefix: str
    hash: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate(environment: str = "l") -> NewKey:
    if environment not in ("l", "t"):
        raise ValueError("environment must be 'l' (live) or 't' (test)")
    head = f"tg_{environment}_" + _base62(int.from_bytes(secrets.token_bytes(RANDOM_BYTES), "big"), BODY_LEN)
    secret = head + _checksum(head)
    return NewKey(secret=secret, prefix=secret[:VISIBLE_PREFIX_LEN], hash=hash_key(secret))


def is_well_formed(candidate: str) -> bool:
    """Shape and checksum only: no database, and no timing signal worth having (the checksum is public)."""
    if not KEY_PATTERN.match(candidate):
        return False
    head, checksum = candidate[:-CHECKSUM_LEN], candidate[-CHECKSUM_LEN:]
    return hmac.compare_digest(_checksum(head), checksum)


def matches(candidate: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(candidate), stored_hash)
