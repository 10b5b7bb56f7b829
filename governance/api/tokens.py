"""Management API tokens: `tg_api_<43 base62 random chars><6 base62 chars of CRC32>`, a prefix distinct from
relay keys (tg_l_/tg_t_) so neither is mistaken for the other, by people or by secret scanners. Only SHA-256
and a visible prefix are stored; issue and revoke write their audit events in the same transaction."""
import secrets
import zlib
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from governance.audit import audit_record, snapshot
from governance.models import Person
from keys import keyformat
from keys.models import ApiToken

PREFIX = "tg_api_"
VISIBLE_PREFIX_LEN = len(PREFIX) + 7
RESOURCES = ("departments", "cost-centers", "teams", "memberships", "providers", "models", "grants", "keys",
             "access-requests", "increases", "usage", "rollups", "chargeback", "alerts", "audit-events")
LEVELS = ("read", "write")


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str  # shown once to whoever issued it; never stored


def _checksum(head: str) -> str:
    return keyformat._base62(zlib.crc32(head.encode()), keyformat.CHECKSUM_LEN)


def generate() -> tuple[str, str, str]:
    """(secret, visible prefix, hash)."""
    head = PREFIX + keyformat._base62(int.from_bytes(secrets.token_bytes(keyformat.RANDOM_BYTES), "big"),
                                      keyformat.BODY_LEN)
    secret = head + _checksum(head)
    return secret, secret[:VISIBLE_PREFIX_LEN], keyformat.hash_key(secret)


def is_well_formed(candidate: str) -> bool:
    """Shape and checksum only, so a mistyped token costs no query."""
    body = candidate[len(PREFIX):]
    if not candidate.startswith(PREFIX) or len(body) != keyformat.BODY_LEN + keyformat.CHECKSUM_LEN:
        return False
    if any(c not in keyformat.ALPHABET for c in body):
        return False
    return secrets.compare_digest(_checksum(candidate[:-keyformat.CHECKSUM_LEN]), candidate[-keyformat.CHECKSUM_LEN:])


def validate_scopes(scopes) -> dict:
    if not isinstance(scopes, dict) or not scopes:
        raise ValidationError({"scopes": 'Give at least one scope, e.g. {"keys": "write", "usage": "read"}.'})
    unknown = [name for name in scopes if name not in (*RESOURCES, "*")]
    bad = [name for name, level in scopes.items() if level not in LEVELS]
    if unknown or bad:
        raise ValidationError({"scopes": f"Resources are {', '.join(RESOURCES)} or *; levels are read or write."
                                         + (f" Unknown: {', '.join(map(str, unknown))}." if unknown else "")})
    return dict(scopes)


@transaction.atomic
def api_token_issue(*, person: Person, name: str, scopes: dict, actor: Person | None, days: int | None = 90,
                    kind: str = ApiToken.Kind.PERSONAL, actor_label: str | None = None) -> IssuedToken:
    """Issue a token acting as `person`. `days` None: no expiry (service tokens an operator rotates)."""
    if not name.strip():
        raise ValidationError({"name": "Say what the token is for."})
    scopes = validate_scopes(scopes)
    secret, prefix, digest = generate()
    token = ApiToken.objects.create(
        name=name.strip(), kind=kind, person=person, prefix=prefix, token_hash=digest, scopes=scopes,
        expires_at=timezone.now() + timezone.timedelta(days=days) if days else None, created_by=actor,
    )
    audit_record(actor=actor, actor_label=actor_label, action="api_token.issue", obj=token, after=snapshot(token))
    return IssuedToken(token=token, secret=secret)


@transaction.atomic
def api_token_revoke(*, token: ApiToken, actor: Person | None, reason: str = "") -> ApiToken:
    token = ApiToken.objects.select_for_update().get(pk=token.pk)
    if token.revoked_at is not None:
        return token
    before = snapshot(token)
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    audit_record(actor=actor, action="api_token.revoke", obj=token, before=before,
                 after={**snapshot(token), "reason": reason})
    return token


def token_by_secret(secret: str) -> ApiToken | None:
    """The token for a presented secret, usable or not (the caller tells expired and revoked apart), or None."""
    if not is_well_formed(secret):
        return None
    token = ApiToken.objects.select_related("person").filter(token_hash=keyformat.hash_key(secret)).first()
    if token is None or not keyformat.matches(secret, token.token_hash):
        return None
    return token


def api_token_touch(token: ApiToken, *, every_seconds: int = 60) -> None:
    """Record use at most once a minute per token: a conditional UPDATE, so busy scripts do not write per call."""
    now = timezone.now()
    ApiToken.objects.filter(pk=token.pk).exclude(last_used_at__gt=now - timezone.timedelta(seconds=every_seconds)) \
        .update(last_used_at=now)
