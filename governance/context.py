"""Per-request context (request id, source IP) that the audit trail and the logs read."""
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="")
source_ip_var: ContextVar[str | None] = ContextVar("source_ip", default=None)


def client_ip(meta: dict) -> str | None:
    """The peer address. Behind a proxy, REMOTE_ADDR is set from X-Forwarded-For by the proxy layer
    (gunicorn --forwarded-allow-ips), never trusted from the header here."""
    return meta.get("REMOTE_ADDR") or None
