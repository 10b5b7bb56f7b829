"""Outgoing webhooks: `webhook_emit` records one delivery per subscribed endpoint in the caller's transaction;
after commit the Celery task `deliver_webhook` POSTs it, signed, and retries with exponential backoff.

Each POST's body is JSON {"id", "event", "created_at", "data"}; its headers carry X-Tollgate-Event,
X-Tollgate-Delivery (the id) and X-Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>"
keyed with the endpoint's secret> (`signature_verify` is how a receiver checks it). Delivery is at least once:
receivers drop an id they have already seen. Payloads carry ids, key prefixes, names, amounts and links, never
a secret.
"""
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Iterable
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from governance.audit import audit_record
from governance.logging import scrub
from governance.models import Person, WebhookDelivery, WebhookEndpoint

EVENTS = frozenset(name for name, _ in WebhookEndpoint.EVENTS)
SIGNATURE_TOLERANCE_SECONDS = 300
USER_AGENT = "Tollgate-Webhooks/1"


class DeliveryRetry(Exception):
    """The receiver could not be reached or answered 5xx/429: the task tries again later (message scrubbed)."""


# --- Emitting --------------------------------------------------------------------------------------------

def webhook_emit(event: str, payload: dict) -> list[WebhookDelivery]:
    """One pending delivery per active endpoint subscribed to `event`, written in the caller's transaction
    (a change that rolls back sends nothing); each is queued for sending once that transaction commits."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    endpoints = [endpoint for endpoint in WebhookEndpoint.objects.filter(is_active=True) if endpoint.wants(event)]
    if not endpoints:
        return []
    data = json.loads(json.dumps(payload, cls=DjangoJSONEncoder))  # Decimals and dates as the receiver reads them
    now = timezone.now()
    deliveries = WebhookDelivery.objects.bulk_create(
        [WebhookDelivery(uuid=uuid.uuid4(), endpoint=endpoint, event=event, payload=data, created_at=now)
         for endpoint in endpoints])
    for delivery in deliveries:
        _queue(delivery.pk)
    return deliveries


def _queue(delivery_id: int) -> None:
    from governance.tasks import deliver_webhook

    # robust: a broker that is down must not undo the change; the delivery stays pending and can be replayed.
    transaction.on_commit(lambda: deliver_webhook.delay(delivery_id), robust=True)


# --- Signing ---------------------------------------------------------------------------------------------

def secret_new() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def body_of(delivery: WebhookDelivery) -> bytes:
    return json.dumps({"id": str(delivery.uuid), "event": delivery.event, "created_at": delivery.created_at.isoformat(),
                       "data": delivery.payload}, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def signature_verify(*, secret: str, header: str, body: bytes, tolerance: int = SIGNATURE_TOLERANCE_SECONDS,
                     now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC over "<t>.<raw body>", compare in constant time, and refuse
    a timestamp older than `tolerance` seconds (a replayed capture)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


# --- Sending (the task calls this once per attempt) -------------------------------------------------------

def delivery_attempt(delivery_id: int, *, final: bool) -> str:
    """POST one pending delivery and record the attempt. Returns its status; raises DeliveryRetry when the
    receiver failed in a way worth retrying and this is not the `final` attempt.

    The row is locked while the POST is made (another worker holding it skips it) and a delivery that is no
    longer pending is not sent again, so a task delivered twice by the broker does not POST twice at once."""
    with transaction.atomic():
        delivery = (WebhookDelivery.objects.select_for_update(skip_locked=True, of=("self",))
                    .select_related("endpoint").filter(pk=delivery_id, status=WebhookDelivery.Status.PENDING).first())
        if delivery is None:
            return "skipped"
        endpoint = delivery.endpoint
        code, error, retryable = None, "", False
        if not endpoint.is_active:
            error = "the endpoint was deactivated"
        else:
            secret = endpoint.secret
            body = body_of(delivery)
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "X-Tollgate-Event": delivery.event, "X-Tollgate-Delivery": str(delivery.uuid),
                       "X-Tollgate-Signature": signature(secret, int(time.time()), body)}
            try:
                response = requests.post(endpoint.url, data=body, headers=headers, allow_redirects=False,
                                         timeout=settings.TOLLGATE_WEBHOOK_TIMEOUT_SECONDS)
            except requests.RequestException as exc:
                error, retryable = f"{type(exc).__name__}: {exc}", True
            else:
                code = response.status_code
                if not 200 <= code < 300:
                    error = f"HTTP {code}: {response.text[:200]}"
                    retryable = code >= 500 or code == 429
            error = _scrubbed(error, endpoint, secret)
        delivery.attempts += 1
        delivery.last_status_code, delivery.last_error = code, error[:500]
        if not error:
            delivery.status, delivery.delivered_at = WebhookDelivery.Status.DELIVERED, timezone.now()
        elif final or not retryable:
            delivery.status = WebhookDelivery.Status.FAILED
        delivery.save(update_fields=["attempts", "last_status_code", "last_error", "status", "delivered_at"])
    if delivery.status == WebhookDelivery.Status.PENDING:
        raise DeliveryRetry(f"delivery {delivery.pk} attempt {delivery.attempts}: {delivery.last_error}")
    return delivery.status


def _scrubbed(error: str, endpoint: WebhookEndpoint, secret: str) -> str:
    """Errors name the URL (requests puts it in its messages); its query string and credentials may be a
    token of the receiver's, so only scheme, host and path are kept, and no secret-looking text at all."""
    if not error:
        return ""
    url = urlsplit(endpoint.url)
    for part in (url.query, url.password, url.username):
        if part:
            error = error.replace(part, "[REDACTED]")
    return scrub(error, secret)


# --- Managing endpoints and deliveries (the admin's actions call these) ----------------------------------

@transaction.atomic
def webhook_secret_rotate(*, endpoint: WebhookEndpoint, actor: Person | None) -> str:
    """A new signing secret at once (the old one stops signing); returned to be shown once."""
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    secret = secret_new()
    endpoint.set_secret(secret)
    endpoint.save(update_fields=["secret_encrypted"])
    audit_record(actor=actor, action="webhookendpoint.rotate_secret", obj=endpoint, after={"url": endpoint.url})
    return secret


@transaction.atomic
def webhook_replay(*, deliveries: Iterable[WebhookDelivery], actor: Person | None) -> int:
    """Send the deliveries again as new attempts (same id, so a receiver that has it can drop it); each one
    audited. A delivery still pending is sent again too: the row lock keeps two sends from overlapping."""
    count = 0
    for delivery in WebhookDelivery.objects.select_for_update().filter(pk__in=[d.pk for d in deliveries]).order_by("pk"):
        before = {"status": delivery.status, "attempts": delivery.attempts}
        delivery.status, delivery.delivered_at = WebhookDelivery.Status.PENDING, None
        delivery.save(update_fields=["status", "delivered_at"])
        audit_record(actor=actor, action="webhookdelivery.replay", obj=delivery, before=before,
                     after={"event": delivery.event, "endpoint": delivery.endpoint_id, "status": delivery.status})
        _queue(delivery.pk)
        count += 1
    return count


# --- Payloads: what each event tells (ids, prefixes, names, amounts, links; never a secret) --------------

def _link(viewname: str, *args) -> str:
    return settings.TOLLGATE_BASE_URL + reverse(viewname, args=args)


def _person(person) -> dict | None:
    if person is None:
        return None
    return {"id": person.pk, "username": person.get_username(), "email": person.email, "name": str(person)}


def _team(team) -> dict | None:
    return None if team is None else {"id": team.pk, "slug": team.slug, "name": team.name}


def access_request_payload(request) -> dict:
    return {
        "access_request": request.pk, "kind": request.kind, "status": request.status,
        "requester": _person(request.requester), "team": _team(request.team),
        "models": sorted(alias.name for alias in request.aliases.all()), "use_case": request.use_case,
        "key_class": request.key_class, "environment": request.environment, "project": request.project,
        "duration_days": request.duration_days, "monthly_budget": request.monthly_budget,
        "review_reasons": request.review_reasons, "created_at": request.created_at,
        "decided_by": _person(request.decided_by), "decided_by_policy": request.decided_by_policy,
        "decided_at": request.decided_at, "decision_reason": request.decision_reason,
        "key": {"id": request.key.pk, "prefix": request.key.prefix} if request.key_id else None,
        "url": _link("admin:keys_accessrequest_change", request.pk), "approvals_url": _link("keys:approvals"),
    }


def key_payload(key, **extra) -> dict:
    return {
        "key": key.pk, "name": key.name, "prefix": key.prefix, "status": key.status, "key_class": key.key_class,
        "team": _team(key.team), "person": _person(key.person), "expires_at": key.expires_at,
        "monthly_budget": key.monthly_budget, "url": _link("keys:key-detail", key.pk), **extra,
    }


def grant_alert_payload(alert) -> dict:
    grant = alert.grant
    return {
        "grant": grant.pk, "name": grant.name, "scope": grant.scope, "team": _team(grant.team),
        "owner": _person(grant.owner), "period": grant.period, "period_start": alert.period_start,
        "threshold": alert.kind, "limit": grant.limit_amount, "spent": alert.spent,
        "currency": settings.TOLLGATE_CURRENCY, "url": _link("admin:budgets_grant_change", grant.pk),
    }


def reconciliation_payload(result) -> dict:
    return {
        "reconciliation": result.pk, "provider": {"id": result.provider_id, "name": result.provider.name},
        "month": result.month.strftime("%Y-%m"), "status": result.status, "billed": result.billed,
        "ledger": result.ledger, "bypass": result.bypass, "explained": result.explained,
        "unexplained": result.unexplained, "currency": settings.TOLLGATE_CURRENCY,
        "url": _link("ledger:reconciliation", result.pk),
    }
