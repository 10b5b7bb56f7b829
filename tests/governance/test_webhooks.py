"""Outgoing webhooks (governance.webhooks): each event reaches the endpoints subscribed to it, signed, with no
secret in it; failures are retried then marked failed; the admin shows each secret once and replays deliveries.
Receivers are real HTTP servers on loopback; Celery tasks run inline when the transaction commits."""
import json
import threading
import time
from datetime import date
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from budgets import alerts
from budgets.anomalies import Finding, Policy, alert_raise
from governance import roles, webhooks
from governance.logging import redact
from governance.models import AuditEvent, Membership, WebhookDelivery, WebhookEndpoint
from governance.tasks import deliver_webhook
from keys import services
from keys.models import VirtualKey
from ledger.reconciliation import reconcile
from tests.budgets.factories import GrantFactory
from tests.gateway.factories import ModelAliasFactory, ProviderFactory
from tests.governance.factories import MembershipFactory, PersonFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db


class Receiver:
    """An HTTP server on 127.0.0.1:<free port> that records each POST and answers with the next status in
    `statuses` (then `default`)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.statuses: list[int] = []
        self.default = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.calls.append({"headers": dict(self.headers), "body": body})
                status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"receiver says no")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tollgate"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        return [call["headers"]["X-Tollgate-Event"] for call in self.calls]

    def bodies(self, event: str | None = None) -> list[dict]:
        return [json.loads(call["body"]) for call in self.calls
                if event is None or call["headers"]["X-Tollgate-Event"] == event]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def endpoint_for(url: str, *, events=(), is_active=True) -> tuple[WebhookEndpoint, str]:
    secret = webhooks.secret_new()
    endpoint = WebhookEndpoint(url=url, events=list(events), is_active=is_active)
    endpoint.set_secret(secret)
    endpoint.save()
    return endpoint, secret


@pytest.fixture
def subscribed(receiver):
    """An endpoint for every event; (endpoint, its secret)."""
    return endpoint_for(receiver.url)


def assert_signed_and_secret_free(receiver: Receiver, secret: str, *other_secrets: str) -> None:
    assert receiver.calls
    for call in receiver.calls:
        assert webhooks.signature_verify(secret=secret, header=call["headers"]["X-Tollgate-Signature"], body=call["body"])
        text = call["body"].decode() + json.dumps(call["headers"])
        for value in (secret, *other_secrets):
            assert value not in text
        assert redact(text) == text, "something secret-looking was sent"
        body = json.loads(call["body"])
        assert set(body) == {"id", "event", "created_at", "data"}
        assert call["headers"]["X-Tollgate-Delivery"] == body["id"]
        assert call["headers"]["X-Tollgate-Event"] == body["event"]


# --- Signing ---------------------------------------------------------------------------------------------

def test_signature_verifies_with_the_secret_and_fails_with_another(receiver, subscribed, django_capture_on_commit_callbacks):
    _, secret = subscribed
    with django_capture_on_commit_callbacks(execute=True):
        services.key_issue(name="ci", team=MembershipFactory().team, person=None, actor=None, actor_label="test")
    call = receiver.calls[0]
    header, body = call["headers"]["X-Tollgate-Signature"], call["body"]
    assert webhooks.signature_verify(secret=secret, header=header, body=body)
    assert not webhooks.signature_verify(secret=webhooks.secret_new(), header=header, body=body)
    assert not webhooks.signature_verify(secret=secret, header=header, body=body.replace(b"ci", b"cj"))
    assert not webhooks.signature_verify(secret=secret, header=header, body=body, now=time.time() + 3600)  # stale
    # The documented recipe, by hand: HMAC-SHA256 of "<t>.<raw body>" with the secret, hex.
    import hashlib
    import hmac
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, fields["v1"])


# --- Each event -----------------------------------------------------------------------------------------

@pytest.fixture
def member():
    return MembershipFactory(role=Membership.Role.MEMBER)


@pytest.fixture
def approver(member):
    return MembershipFactory(team=member.team, role=Membership.Role.APPROVER).person


def submit_pending(member):
    """A production-class request: policy sends it to an approver."""
    return services.request_submit(
        requester=member.person, team=member.team, aliases=[ModelAliasFactory(name="fast")],
        use_case="summarise support tickets", key_class="production", environment="production", project="tickets",
        duration_days=30, monthly_budget=Decimal("20")).request


def test_access_request_created_then_decided(receiver, subscribed, member, approver, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        request = submit_pending(member)
    with django_capture_on_commit_callbacks(execute=True):
        services.request_approve(access_request=request, actor=approver, reason="fine")
    assert receiver.events() == ["access_request.created", "access_request.decided"]
    created, decided = (body["data"] for body in receiver.bodies())
    assert created["access_request"] == request.pk and created["status"] == "pending"
    assert created["requester"]["username"] == member.person.username and created["team"]["slug"] == member.team.slug
    assert created["models"] == ["fast"] and Decimal(created["monthly_budget"]) == 20
    assert created["review_reasons"] and created["url"].startswith("http")
    assert decided["status"] == "approved" and decided["decided_by"]["username"] == approver.username
    assert decided["decision_reason"] == "fine"
    assert_signed_and_secret_free(receiver, subscribed[1])


def test_a_denial_is_sent_as_decided(receiver, subscribed, member, approver, django_capture_on_commit_callbacks):
    request = submit_pending(member)
    with django_capture_on_commit_callbacks(execute=True):
        services.request_deny(access_request=request, actor=approver, reason="use the shared key")
    [decided] = receiver.bodies("access_request.decided")
    assert decided["data"]["status"] == "denied" and decided["data"]["decision_reason"] == "use the shared key"


def test_key_issued_rotated_and_revoked_without_their_secrets(receiver, subscribed, member,
                                                                django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        issued = services.key_issue(name="batch", team=member.team, person=None, actor=None, actor_label="test",
                                    with_signing_secret=True)
    with django_capture_on_commit_callbacks(execute=True):
        rotated = services.key_rotate(key=issued.key, actor=None, grace_hours=2)
    with django_capture_on_commit_callbacks(execute=True):
        services.key_revoke(key=issued.key, actor=None, reason="project ended")
    assert receiver.events() == ["key.issued", "key.rotated", "key.revoked"]
    first, second, third = (body["data"] for body in receiver.bodies())
    assert first["key"] == issued.key.pk and first["prefix"] == issued.secret[:len(first["prefix"])]
    assert first["name"] == "batch" and first["team"]["slug"] == member.team.slug
    assert second["prefix"] == rotated.key.prefix != first["prefix"] and second["old_secret_valid_until"]
    assert third["status"] == "revoked" and third["reason"] == "project ended"
    key = VirtualKey.objects.get(pk=issued.key.pk)
    assert_signed_and_secret_free(receiver, subscribed[1], issued.secret, rotated.secret, issued.signing_secret,
                                  key.key_hash, key.signing_secret_encrypted)


def test_key_expiring_is_sent_with_the_notice(receiver, subscribed, django_capture_on_commit_callbacks):
    key = VirtualKeyFactory(expires_at=timezone.now() + timezone.timedelta(days=3))
    with django_capture_on_commit_callbacks(execute=True):
        assert services.keys_expire_sweep().notices == 1
    [body] = receiver.bodies()
    assert body["event"] == "key.expiring"
    assert body["data"]["key"] == key.pk and body["data"]["days_left"] == 7 and body["data"]["expires_at"]
    assert_signed_and_secret_free(receiver, subscribed[1], key.secret)


def test_budget_threshold_crossed(receiver, subscribed, django_capture_on_commit_callbacks):
    grant = GrantFactory(name="Support bots", limit_amount=Decimal("100"))
    since = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    with django_capture_on_commit_callbacks(execute=True):
        assert alerts.send(grant.pk, since.isoformat(), "80", "85.00") is True
        alerts.send(grant.pk, since.isoformat(), "forecast", "85.00")  # a forecast crosses nothing yet
    [body] = receiver.bodies()
    assert body["event"] == "budget.threshold_crossed"
    data = body["data"]
    assert data["grant"] == grant.pk and data["name"] == "Support bots" and data["threshold"] == "80"
    assert data["limit"] == "100.00" and data["spent"] == "85.00" and data["owner"]["username"] == grant.owner.username
    assert_signed_and_secret_free(receiver, subscribed[1])


def test_anomaly_raised(receiver, subscribed, django_capture_on_commit_callbacks):
    key = VirtualKeyFactory()
    finding = Finding(kind="rate", level="key", subject_id=key.pk,
                      evidence={"window_calls": 300, "window_minutes": 5, "times_usual": 30, "usual_calls_per_window": 10})
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        alert = alert_raise(finding=finding, window_start=now - timezone.timedelta(minutes=5), window_end=now,
                            policy=Policy.from_settings())
    [body] = receiver.bodies("anomaly.raised")
    assert body["data"]["alert"] == alert.pk and body["data"]["kind"] == "rate"
    assert body["data"]["subject"] == f"key:{key.pk}" and body["data"]["url"].startswith("http")
    assert_signed_and_secret_free(receiver, subscribed[1], key.secret)


def test_reconciliation_finished(receiver, subscribed, django_capture_on_commit_callbacks):
    provider = ProviderFactory(name="OpenAI")
    with django_capture_on_commit_callbacks(execute=True):
        result = reconcile(provider=provider, month=date(2026, 10, 1))
    [body] = receiver.bodies()
    assert body["event"] == "reconciliation.finished"
    assert body["data"]["reconciliation"] == result.pk and body["data"]["provider"]["name"] == "OpenAI"
    assert body["data"]["month"] == "2026-10" and body["data"]["status"] == result.status
    assert_signed_and_secret_free(receiver, subscribed[1])


# --- Who gets what ----------------------------------------------------------------------------------------

def test_unsubscribed_events_are_not_sent(receiver, member, django_capture_on_commit_callbacks):
    _, secret = endpoint_for(receiver.url, events=["key.revoked"])
    with django_capture_on_commit_callbacks(execute=True):
        issued = services.key_issue(name="x", team=member.team, person=None, actor=None, actor_label="test")
        services.key_revoke(key=issued.key, actor=None, reason="done")
    assert receiver.events() == ["key.revoked"]
    assert WebhookDelivery.objects.get().event == "key.revoked"


def test_inactive_endpoints_get_nothing(receiver, member, django_capture_on_commit_callbacks):
    endpoint_for(receiver.url, is_active=False)
    with django_capture_on_commit_callbacks(execute=True):
        services.key_issue(name="x", team=member.team, person=None, actor=None, actor_label="test")
    assert receiver.calls == [] and not WebhookDelivery.objects.exists()


def test_a_change_that_rolls_back_sends_nothing(receiver, subscribed, member, django_capture_on_commit_callbacks):
    from django.db import transaction

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            services.key_issue(name="x", team=member.team, person=None, actor=None, actor_label="test")
            raise RuntimeError("something later failed")
    assert receiver.calls == [] and not WebhookDelivery.objects.exists()


# --- Retries --------------------------------------------------------------------------------------------

@pytest.fixture
def retries_inline():
    """The task's own retries (autoretry_for, backoff) run at once, one after the other: Celery's eager mode
    re-runs a retried task inline unless errors propagate, which the suite otherwise wants."""
    from governance.celery import app

    app.conf.task_eager_propagates = False
    yield
    app.conf.task_eager_propagates = True


def emit_one(django_capture_on_commit_callbacks) -> WebhookDelivery:
    with django_capture_on_commit_callbacks(execute=True):
        webhooks.webhook_emit("key.revoked", {"key": 1, "prefix": "tg_l_abc", "reason": "test"})
    return WebhookDelivery.objects.get()


def test_a_receiver_answering_500_then_200_is_retried_and_ends_delivered(retries_inline, receiver, subscribed,
                                                                          django_capture_on_commit_callbacks):
    receiver.statuses = [500]
    delivery = emit_one(django_capture_on_commit_callbacks)  # the task's retry runs inline (eager)
    assert delivery.status == "delivered" and delivery.attempts == 2 and delivery.last_status_code == 200
    assert delivery.delivered_at is not None and delivery.last_error == ""
    first, second = receiver.calls
    assert first["body"] == second["body"]  # the same delivery, signed afresh
    assert first["headers"]["X-Tollgate-Delivery"] == second["headers"]["X-Tollgate-Delivery"] == str(delivery.uuid)


def test_each_attempt_is_recorded_and_a_retryable_failure_asks_the_task_to_retry(receiver, subscribed):
    receiver.statuses = [503]
    delivery = webhooks.webhook_emit("key.revoked", {"key": 1})[0]
    with pytest.raises(webhooks.DeliveryRetry):
        webhooks.delivery_attempt(delivery.pk, final=False)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, 503)
    assert "HTTP 503" in delivery.last_error
    assert webhooks.delivery_attempt(delivery.pk, final=False) == "delivered"
    assert webhooks.delivery_attempt(delivery.pk, final=False) == "skipped"  # never sent twice once delivered
    assert len(receiver.calls) == 2
    assert deliver_webhook.autoretry_for == (webhooks.DeliveryRetry,) and deliver_webhook.retry_backoff == 30


def test_a_receiver_always_failing_ends_failed_after_max_attempts(retries_inline, receiver, subscribed, settings,
                                                                   django_capture_on_commit_callbacks):
    receiver.default = 500
    delivery = emit_one(django_capture_on_commit_callbacks)
    assert settings.TOLLGATE_WEBHOOK_MAX_ATTEMPTS == deliver_webhook.max_retries + 1 == 8
    assert delivery.status == "failed" and delivery.attempts == 8 == len(receiver.calls)
    assert delivery.last_status_code == 500 and delivery.last_error == "HTTP 500: receiver says no"
    assert delivery.delivered_at is None


def test_a_4xx_is_not_retried(receiver, subscribed, django_capture_on_commit_callbacks):
    receiver.default = 410
    delivery = emit_one(django_capture_on_commit_callbacks)
    assert (delivery.status, delivery.attempts, len(receiver.calls)) == ("failed", 1, 1)


def test_an_unreachable_receiver_fails_with_a_scrubbed_error(retries_inline, receiver, django_capture_on_commit_callbacks):
    port = receiver.server.server_address[1]
    receiver.close()  # nothing listens there any more
    endpoint_for(f"http://127.0.0.1:{port}/hook?token=receivers-own-token-123")
    delivery = emit_one(django_capture_on_commit_callbacks)
    assert delivery.status == "failed" and delivery.attempts == 8 and delivery.last_status_code is None
    assert "ConnectionError" in delivery.last_error and "receivers-own-token-123" not in delivery.last_error


# --- Admin -------------------------------------------------------------------------------------------------

def test_creating_an_endpoint_shows_its_secret_once_and_stores_it_encrypted(admin_client):
    response = admin_client.post(reverse("admin:governance_webhookendpoint_add"), {
        "url": "https://tickets.example.com/hooks/tollgate", "description": "Jira",
        "events": ["access_request.created", "access_request.decided"], "is_active": "on"}, follow=True)
    assert response.status_code == 200
    [shown] = [str(m) for m in get_messages(response.wsgi_request) if "whsec_" in str(m)]
    secret = shown.rsplit(" ", 1)[1]
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.events == ["access_request.created", "access_request.decided"]
    assert endpoint.secret == secret and secret not in endpoint.secret_encrypted
    event = AuditEvent.objects.get(action="webhookendpoint.create")
    assert secret not in json.dumps(event.after) and "secret_encrypted" not in event.after
    page = admin_client.get(reverse("admin:governance_webhookendpoint_change", args=[endpoint.pk]))
    assert secret not in page.content.decode() and endpoint.secret_encrypted not in page.content.decode()

    admin_client.post(reverse("admin:governance_webhookendpoint_change", args=[endpoint.pk]), {
        "url": endpoint.url, "description": "Jira SM", "events": [], "is_active": "on"})
    endpoint.refresh_from_db()
    assert endpoint.secret == secret and endpoint.events == [] and endpoint.description == "Jira SM"
    assert AuditEvent.objects.filter(action="webhookendpoint.update").exists()


def test_rotating_the_secret_shows_the_new_one_once(admin_client, receiver):
    endpoint, old = endpoint_for(receiver.url)
    response = admin_client.post(reverse("admin:governance_webhookendpoint_changelist"),
                                 {"action": "rotate_secret", "_selected_action": [endpoint.pk]}, follow=True)
    [shown] = [str(m) for m in get_messages(response.wsgi_request) if "whsec_" in str(m)]
    endpoint.refresh_from_db()
    assert endpoint.secret != old and shown.endswith(endpoint.secret)
    event = AuditEvent.objects.get(action="webhookendpoint.rotate_secret")
    assert endpoint.secret not in json.dumps([event.before, event.after])


def test_replay_from_the_admin_sends_again(admin_client, receiver, subscribed, django_capture_on_commit_callbacks):
    receiver.default = 400
    delivery = emit_one(django_capture_on_commit_callbacks)
    assert delivery.status == "failed"
    receiver.default = 200
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:governance_webhookdelivery_changelist"),
                                     {"action": "replay", "_selected_action": [delivery.pk]})
    assert response.status_code == 302
    delivery.refresh_from_db()
    assert delivery.status == "delivered" and delivery.attempts == 2
    assert [c["headers"]["X-Tollgate-Delivery"] for c in receiver.calls] == [str(delivery.uuid)] * 2
    event = AuditEvent.objects.get(action="webhookdelivery.replay")
    assert event.before == {"status": "failed", "attempts": 1} and event.object_id == str(delivery.pk)


def test_only_it_may_replay(client, receiver, subscribed, django_capture_on_commit_callbacks):
    receiver.default = 400
    delivery = emit_one(django_capture_on_commit_callbacks)
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("admin:governance_webhookdelivery_changelist"),
                    {"action": "replay", "_selected_action": [delivery.pk]})
    assert len(receiver.calls) == 1 and not AuditEvent.objects.filter(action="webhookdelivery.replay").exists()


def test_delivery_log_lists_filters_and_searches(admin_client, receiver, subscribed, django_capture_on_commit_callbacks):
    delivery = emit_one(django_capture_on_commit_callbacks)
    changelist = reverse("admin:governance_webhookdelivery_changelist")
    for query in ({}, {"status": "delivered"}, {"event": "key.revoked"}, {"endpoint__id__exact": subscribed[0].pk},
                  {"q": str(delivery.uuid)}, {"q": "not-a-uuid"}):
        assert admin_client.get(changelist, query).status_code == 200, query
    assert "key.revoked" in admin_client.get(changelist, {"event": "key.revoked"}).content.decode()
    assert admin_client.get(reverse("admin:governance_webhookdelivery_change", args=[delivery.pk])).status_code == 200
    assert admin_client.get(reverse("admin:governance_webhookdelivery_add")).status_code == 403
    assert admin_client.get(reverse("admin:governance_webhookendpoint_changelist"), {"q": "127.0.0.1"}).status_code == 200


# --- The ticket system flow -------------------------------------------------------------------------------

def test_ticket_system_creates_a_request_through_the_api_and_receives_the_decision(
        client, receiver, member, approver, django_capture_on_commit_callbacks):
    """Jira Service Management automation: a service account (member of the team) creates the request with its
    API token; the approver decides it (here through the API too); Jira's incoming webhook hears both."""
    from governance.api.tokens import api_token_issue
    from keys.models import ApiToken

    _, secret = endpoint_for(receiver.url, events=["access_request.created", "access_request.decided"])
    bot = MembershipFactory(team=member.team, person=PersonFactory(username="jira-automation")).person
    it = PersonFactory(roles=[roles.IT_ADMIN])
    jira = api_token_issue(person=bot, name="Jira automation", scopes={"access-requests": "write"}, actor=it,
                           kind=ApiToken.Kind.SERVICE, days=None).secret
    decider = api_token_issue(person=approver, name="approver", scopes={"access-requests": "write"}, actor=approver).secret
    ModelAliasFactory(name="fast")
    with open("docs/integrations/jira-access-request.json") as example:
        body = json.load(example)
    with django_capture_on_commit_callbacks(execute=True):
        created = client.post("/api/v1/access-requests/", json.dumps({**body, "team": member.team.slug}),
                              content_type="application/json", headers={"Authorization": f"Bearer {jira}"})
    assert created.status_code == 201, created.content
    request_id = created.json()["request"]["id"]
    assert created.json()["request"]["status"] == "pending"
    with django_capture_on_commit_callbacks(execute=True):
        decided = client.post(f"/api/v1/access-requests/{request_id}/approve/", json.dumps({"reason": "JSM-4711 ok"}),
                              content_type="application/json", headers={"Authorization": f"Bearer {decider}"})
    assert decided.status_code == 200, decided.content
    assert receiver.events() == ["access_request.created", "access_request.decided"]
    sent = [b["data"] for b in receiver.bodies()]
    assert [d["access_request"] for d in sent] == [request_id, request_id]
    assert sent[0]["requester"]["username"] == "jira-automation" and sent[0]["use_case"] == body["use_case"]
    assert sent[1]["status"] == "approved" and sent[1]["decision_reason"] == "JSM-4711 ok"
    assert_signed_and_secret_free(receiver, secret, jira, decider)
