"""Anomaly detection (budgets.anomalies): synthetic traffic written to the ledger, the beat task run at a fixed
moment, and what people and systems see: alerts, suspended keys, emails, the webhook's POST, the audit trail."""
import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import time_machine
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from budgets.anomalies import alert_acknowledge, network_of, open_alerts_for
from budgets.models import Alert
from budgets.tasks import detect_anomalies
from gateway.models import ModelAlias
from governance import roles
from governance.models import AuditEvent
from keys.models import VirtualKey
from ledger.models import LedgerEntry
from tests.gateway.factories import ModelAliasFactory
from tests.governance.factories import PersonFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db

# Mid-month, so the window and the day before it fall in the month's ledger partition whatever today is.
NOW = timezone.now().replace(day=15, hour=12, minute=0, second=0, microsecond=0)
WINDOW = timezone.timedelta(minutes=5)
DAY = timezone.timedelta(hours=24)
SECOND = timezone.timedelta(seconds=1)


@pytest.fixture(autouse=True)
def policy(settings):
    """The documented defaults, whatever the environment of the run says."""
    settings.TOLLGATE_ANOMALY_WINDOW_MINUTES = 5
    settings.TOLLGATE_ANOMALY_BASELINE_HOURS = 24
    settings.TOLLGATE_ANOMALY_RATE_FACTOR = Decimal("5")
    settings.TOLLGATE_ANOMALY_MIN_CALLS = 30
    settings.TOLLGATE_ANOMALY_MIN_SPEND = Decimal("1.00")
    settings.TOLLGATE_ANOMALY_CALL_COST = Decimal("5.00")
    settings.TOLLGATE_ANOMALY_PREMIUM_MIN_CALLS = 5
    settings.TOLLGATE_ANOMALY_SUSPEND = "experimentation"
    settings.TOLLGATE_ALERT_WEBHOOK_URL = ""
    return settings


@pytest.fixture
def webhook(settings):
    """A real HTTP receiver on a free port; what it was POSTed, as parsed JSON."""
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "raw": body.decode(), "json": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.TOLLGATE_ALERT_WEBHOOK_URL = f"http://127.0.0.1:{server.server_port}/tollgate-alerts"
    yield received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def it_admin(db):
    return PersonFactory(roles=[roles.IT_ADMIN])


def traffic(key, *, start, end, count, alias=None, ip="198.51.100.7", cost=Decimal("0.0001")):
    """`count` calls of `key` spread evenly over [start, end), written as the relay writes them (one row each)."""
    step = (end - start) / count
    LedgerEntry.objects.bulk_create([
        LedgerEntryFactory.build(key=key, created_at=start + step * i, alias=alias, client_ip=ip, cost=cost,
                                 model_requested=alias.name if alias else "fast")
        for i in range(count)
    ])


def steady_day(key, **kwargs):
    """10 calls every 5 minutes over the 24 hours before the window."""
    traffic(key, start=NOW - WINDOW - DAY, end=NOW - WINDOW, count=10 * 288, **kwargs)


def last_window(key, count, **kwargs):
    traffic(key, start=NOW - WINDOW + SECOND, end=NOW - SECOND, count=count, **kwargs)


def run_detection(capture):
    """The beat task at NOW; what it queues on commit (emails, the webhook) runs, as it would after commit."""
    with time_machine.travel(NOW, tick=False), capture(execute=True):
        return detect_anomalies()


def test_runaway_loop_fires_within_one_window_suspends_the_key_and_tells_owner_it_and_webhook(
        django_capture_on_commit_callbacks, mailoutbox, webhook, it_admin):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.EXPERIMENTATION)
    steady_day(key)
    last_window(key, 60)  # the agent loop: 6x its usual 10 calls per 5 minutes

    assert run_detection(django_capture_on_commit_callbacks) == 1

    alert = Alert.objects.get()
    assert (alert.kind, alert.subject, alert.key, alert.team, alert.status) == (
        Alert.Kind.RATE, f"key:{key.pk}", key, key.team, Alert.Status.OPEN)
    assert alert.evidence["window_calls"] == 60 and alert.evidence["baseline_calls"] == 2880
    assert alert.evidence["usual_calls_per_window"] == "10.00" and alert.evidence["times_usual"] == "6.0"
    assert (alert.window_start, alert.window_end) == (NOW - WINDOW, NOW)
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.SUSPENDED
    assert "suspended" in alert.action_taken
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"alert.raise", "key.suspend"} <= actions
    suspension = AuditEvent.objects.get(action="key.suspend")
    assert f"#{alert.pk}" in suspension.after["reason"]

    assert len(mailoutbox) == 1
    assert set(mailoutbox[0].to) == {key.person.email, key.team.owner.email, it_admin.email}
    assert "Anomaly" in mailoutbox[0].subject and "60 calls in 5 min" in mailoutbox[0].body

    assert len(webhook) == 1
    posted = webhook[0]
    assert posted["path"] == "/tollgate-alerts"
    assert posted["json"]["alert"] == alert.pk and posted["json"]["kind"] == "rate"
    assert posted["json"]["subject"] == f"key:{key.pk}" and posted["json"]["evidence"]["window_calls"] == 60
    assert posted["json"]["url"].endswith(reverse("admin:budgets_alert_change", args=[alert.pk]))
    assert key.secret not in posted["raw"] and key.key_hash not in posted["raw"]


def test_loop_does_not_suspend_when_the_policy_says_off(policy, django_capture_on_commit_callbacks, mailoutbox):
    policy.TOLLGATE_ANOMALY_SUSPEND = "off"
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.EXPERIMENTATION)
    steady_day(key)
    last_window(key, 60)

    run_detection(django_capture_on_commit_callbacks)

    assert Alert.objects.get().kind == Alert.Kind.RATE
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.ACTIVE
    assert not AuditEvent.objects.filter(action="key.suspend").exists()
    assert len(mailoutbox) == 1


def test_production_key_is_alerted_but_never_suspended(django_capture_on_commit_callbacks):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.PRODUCTION)
    steady_day(key)
    last_window(key, 60)

    run_detection(django_capture_on_commit_callbacks)

    assert Alert.objects.get().action_taken == ""
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.ACTIVE


def test_steady_key_raises_nothing(django_capture_on_commit_callbacks, mailoutbox, webhook):
    key = VirtualKeyFactory()
    steady_day(key)
    last_window(key, 10)

    assert run_detection(django_capture_on_commit_callbacks) == 0

    assert not Alert.objects.exists() and mailoutbox == [] and webhook == []
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.ACTIVE


def test_a_few_calls_more_than_usual_is_not_an_alert(django_capture_on_commit_callbacks):
    key = VirtualKeyFactory()
    traffic(key, start=NOW - WINDOW - DAY, end=NOW - WINDOW, count=24)  # one call an hour
    last_window(key, 5)  # 60x the usual, but five calls

    assert run_detection(django_capture_on_commit_callbacks) == 0
    assert not Alert.objects.exists()


def test_second_run_does_not_duplicate_the_open_alert(django_capture_on_commit_callbacks, mailoutbox, it_admin):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.PRODUCTION)
    steady_day(key)
    last_window(key, 60)
    run_detection(django_capture_on_commit_callbacks)
    alert = Alert.objects.get()

    assert run_detection(django_capture_on_commit_callbacks) == 0
    alert_acknowledge(alert=alert, actor=it_admin)
    assert run_detection(django_capture_on_commit_callbacks) == 0  # acknowledged is still not resolved

    assert Alert.objects.count() == 1 and len(mailoutbox) == 1
    with pytest.raises(IntegrityError), transaction.atomic():  # and two racing runs cannot both insert one
        Alert.objects.create(kind=alert.kind, subject=alert.subject, key=key, window_start=NOW - WINDOW, window_end=NOW)


def test_single_expensive_call_fires(django_capture_on_commit_callbacks):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.EXPERIMENTATION)
    steady_day(key, cost=Decimal("0.50"))  # 5.00 per window, as usual
    last_window(key, 9, cost=Decimal("0.50"))
    LedgerEntryFactory(key=key, created_at=NOW - timezone.timedelta(minutes=2), cost=Decimal("7.50"),
                       request_id="the-dear-one", model_requested="smart")

    assert run_detection(django_capture_on_commit_callbacks) == 1

    alert = Alert.objects.get()
    assert (alert.kind, alert.subject) == (Alert.Kind.EXPENSIVE_CALL, f"key:{key.pk}")
    assert alert.evidence["calls"][0] == {"request_id": "the-dear-one", "cost": "7.5000", "model": "smart",
                                          "at": (NOW - timezone.timedelta(minutes=2)).isoformat()}
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.ACTIVE  # one dear call is news, not a runaway


def test_switch_to_premium_models_fires_for_a_key_that_never_used_them(django_capture_on_commit_callbacks):
    standard = ModelAliasFactory(name="fast")
    premium = ModelAliasFactory(name="opus", tier=ModelAlias.Tier.PREMIUM)
    switcher, always_premium = VirtualKeyFactory(), VirtualKeyFactory()
    steady_day(switcher, alias=standard)
    last_window(switcher, 8, alias=premium)
    last_window(switcher, 2, alias=standard)
    steady_day(always_premium, alias=premium)
    last_window(always_premium, 10, alias=premium)

    assert run_detection(django_capture_on_commit_callbacks) == 1

    alert = Alert.objects.get()
    assert (alert.kind, alert.subject) == (Alert.Kind.PREMIUM_SWITCH, f"key:{switcher.pk}")
    assert alert.evidence["premium_calls"] == 8 and alert.evidence["premium_models"] == ["opus"]


def test_new_source_network_fires_and_a_known_one_does_not(django_capture_on_commit_callbacks):
    moved, stayed = VirtualKeyFactory(), VirtualKeyFactory()
    for key in (moved, stayed):
        steady_day(key, ip="198.51.100.7")
    last_window(stayed, 10, ip="198.51.100.200")  # another address of the same /24
    last_window(moved, 10, ip="203.0.113.9")

    assert run_detection(django_capture_on_commit_callbacks) == 1

    alert = Alert.objects.get()
    assert (alert.kind, alert.subject) == (Alert.Kind.NEW_NETWORK, f"key:{moved.pk}")
    assert alert.evidence["new_networks"] == ["203.0.113.0/24"]
    assert alert.evidence["known_networks"] == ["198.51.100.0/24"]


def test_source_networks_are_the_ipv4_24_and_the_ipv6_48():
    assert network_of("198.51.100.77") == "198.51.100.0/24"
    assert network_of("2001:db8:abcd:12::1") == "2001:db8:abcd::/48"
    assert network_of("::ffff:203.0.113.9") == "203.0.113.0/24"


def test_reinstating_from_the_alert_reactivates_the_key_and_audits_it(client, django_capture_on_commit_callbacks, it_admin):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.EXPERIMENTATION)
    steady_day(key)
    last_window(key, 60)
    run_detection(django_capture_on_commit_callbacks)
    alert = Alert.objects.get()
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.SUSPENDED

    client.force_login(it_admin)
    with time_machine.travel(NOW + timezone.timedelta(minutes=1), tick=False):
        response = client.post(reverse("admin:budgets_alert_changelist"), {
            "action": "resolve_and_reinstate", "_selected_action": [alert.pk], "apply": "1",
            "reason": "the loop is fixed", "select_across": "0"}, follow=True)

    assert "1 anomaly alert resolved, their keys reinstated." in response.content.decode()
    key.refresh_from_db()
    alert.refresh_from_db()
    assert key.status == VirtualKey.Status.ACTIVE
    assert (alert.status, alert.resolved_by) == (Alert.Status.RESOLVED, it_admin)
    assert "reinstated" in alert.action_taken
    reactivation = AuditEvent.objects.get(action="key.reactivate")
    assert (reactivation.actor, reactivation.object_id, reactivation.after["reason"]) == (it_admin, str(key.pk), "the loop is fixed")
    assert AuditEvent.objects.filter(action="alert.resolve", actor=it_admin, object_id=str(alert.pk)).exists()
    # The next run still sees the loop's calls in its window, which whoever resolved the alert has seen.
    with time_machine.travel(NOW + timezone.timedelta(minutes=2), tick=False), django_capture_on_commit_callbacks(execute=True):
        assert detect_anomalies() == 0
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.ACTIVE


def test_acknowledge_and_resolve_are_it_only(client, django_capture_on_commit_callbacks, it_admin):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.PRODUCTION)
    steady_day(key)
    last_window(key, 60)
    run_detection(django_capture_on_commit_callbacks)
    alert = Alert.objects.get()
    changelist = reverse("admin:budgets_alert_changelist")
    form = {"_selected_action": [alert.pk], "apply": "1", "reason": "", "select_across": "0"}

    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    client.post(changelist, {**form, "action": "acknowledge"})
    alert.refresh_from_db()
    assert alert.status == Alert.Status.OPEN

    client.force_login(it_admin)
    client.post(changelist, {**form, "action": "acknowledge"})
    alert.refresh_from_db()
    assert (alert.status, alert.acknowledged_by) == (Alert.Status.ACKNOWLEDGED, it_admin)
    client.post(changelist, {**form, "action": "resolve"})
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED
    assert [e.action for e in AuditEvent.objects.filter(object_type="budgets.alert").order_by("id")] == [
        "alert.raise", "alert.acknowledge", "alert.resolve"]


def test_open_alerts_are_scoped_like_budgets(django_capture_on_commit_callbacks, it_admin):
    mine, theirs = VirtualKeyFactory(key_class=VirtualKey.KeyClass.PRODUCTION), VirtualKeyFactory()
    for key in (mine, theirs):
        steady_day(key)
        last_window(key, 60)
    run_detection(django_capture_on_commit_callbacks)
    assert Alert.objects.count() == 2

    assert set(open_alerts_for(it_admin).values_list("key", flat=True)) == {mine.pk, theirs.pk}
    assert set(open_alerts_for(PersonFactory(roles=[roles.SECURITY_AUDITOR])).values_list("key", flat=True)) == {mine.pk, theirs.pk}
    assert list(open_alerts_for(mine.person).values_list("key", flat=True)) == [mine.pk]
    assert list(open_alerts_for(mine.team.owner).values_list("key", flat=True)) == [mine.pk]
    assert not open_alerts_for(PersonFactory()).exists()


def test_admin_lists_and_shows_alerts_read_only(client, django_capture_on_commit_callbacks, it_admin):
    key = VirtualKeyFactory(key_class=VirtualKey.KeyClass.PRODUCTION)
    steady_day(key)
    last_window(key, 60)
    run_detection(django_capture_on_commit_callbacks)
    alert = Alert.objects.get()
    client.force_login(it_admin)

    listing = client.get(reverse("admin:budgets_alert_changelist"), {"kind__exact": "rate", "status__exact": "open"})
    assert listing.status_code == 200 and key.prefix in listing.content.decode()
    assert client.get(reverse("admin:budgets_alert_changelist"), {"q": key.prefix}).status_code == 200
    page = client.get(reverse("admin:budgets_alert_change", args=[alert.pk])).content.decode()
    assert "&quot;window_calls&quot;: 60" in page and 'name="_save"' not in page
    assert client.get(reverse("admin:budgets_alert_add")).status_code == 403
    for role in (roles.FINANCE, roles.SECURITY_AUDITOR):  # they read alerts and act on none
        client.force_login(PersonFactory(roles=[role]))
        page = client.get(reverse("admin:budgets_alert_change", args=[alert.pk])).content.decode()
        assert "window_calls" in page and "resolve_and_reinstate" not in client.get(
            reverse("admin:budgets_alert_changelist")).content.decode()
