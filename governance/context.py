"""Per-request context (request id, source IP) that the audit trail and the logs read."""
import ipaddress
from contextvars import ContextVar

from django.conf import settings

request_id_var: ContextVar[str] = ContextVar("request_id", default="")
source_ip_var: ContextVar[str | None] = ContextVar("source_ip", default=None)


def client_ip(meta: dict) -> str | None:
    """The caller's address: the peer (REMOTE_ADDR), or, when the peer is one of TRUSTED_PROXIES, the
    nearest address in X-Forwarded-For that is not a trusted proxy (walking from the right: each proxy appends
    the address it received from, so only the entries our own proxies appended can be believed)."""
    peer = meta.get("REMOTE_ADDR") or None
    trusted = settings.TRUSTED_PROXY_NETWORKS
    if not peer or not trusted or not _within(peer, trusted):
        return peer
    forwarded = [part.strip() for part in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    client = peer
    for address in reversed(forwarded):
        if not _valid(address):
            break  # garbage from the client: what our proxies appended after it is all we can believe
        client = address
        if not _within(address, trusted):
            break
    return client


def _valid(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _within(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip_of_request(request) -> str | None:
    """client_ip for code that is handed a request (django-axes' AXES_CLIENT_IP_CALLABLE)."""
    return client_ip(request.META)
