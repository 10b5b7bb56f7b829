"""Signed actor headers: a service key's app says which person (and feature, environment) a call is for.

    X-Tollgate-Actor:           user=alice@example.com;feature=search;environment=prod;ts=1732370000
    X-Tollgate-Actor-Signature: hex(HMAC-SHA256(signing secret, the X-Tollgate-Actor value))

A signature older than MAX_SKEW_SECONDS is refused, so a captured header cannot be replayed for long.
"""
import hashlib
import hmac
import time
from dataclasses import dataclass

MAX_SKEW_SECONDS = 300
FIELDS = ("user", "feature", "environment", "ts")


class ActorError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ActorClaims:
    user: str
    feature: str = ""
    environment: str = ""


def sign_actor(secret: str, *, user: str, feature: str = "", environment: str = "", ts: int | None = None) -> tuple[str, str]:
    """(header value, signature) for a call on behalf of `user`: what an app sends."""
    parts = {"user": user, "feature": feature, "environment": environment, "ts": str(ts or int(time.time()))}
    value = ";".join(f"{k}={v}" for k, v in parts.items() if v)
    return value, hmac.new(secret.encode(), value.encode(), hashlib.sha256).hexdigest()


def verify_actor(secret: str, value: str, signature: str, *, now: float | None = None) -> ActorClaims:
    if not secret:
        raise ActorError("invalid_actor", "this key cannot attribute calls to people (it has no signing secret)")
    expected = hmac.new(secret.encode(), value.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.strip().lower()):
        raise ActorError("invalid_actor", "X-Tollgate-Actor-Signature does not match X-Tollgate-Actor")
    try:
        parts = dict(item.split("=", 1) for item in value.split(";") if item)
        ts = int(parts["ts"])
    except (ValueError, KeyError):
        raise ActorError("invalid_actor", "X-Tollgate-Actor must carry user=...;ts=...") from None
    if abs((now or time.time()) - ts) > MAX_SKEW_SECONDS:
        raise ActorError("invalid_actor", f"X-Tollgate-Actor is stale (signed more than {MAX_SKEW_SECONDS}s from now)")
    if not parts.get("user"):
        raise ActorError("invalid_actor", "X-Tollgate-Actor must name a user")
    return ActorClaims(user=parts["user"], feature=parts.get("feature", ""), environment=parts.get("environment", ""))
