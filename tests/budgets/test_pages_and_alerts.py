"""Owner pages, the admin tree, webhooks, forecasts and the counter check."""
import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.utils import timezone

from budgets import alerts, enforcement
from budgets.models import Grant, GrantAlert
from budgets.services import grant_counters_verify
from governance.redis import get_redis
from tests.budgets.factories import GrantFactory
from tests.governance.factories import PersonFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(client):
    person = PersonFactory()
    client.force_login(person)
    return person


def test_owner_page_shows_usage_and_delegated_children(client, owner):
    parent = GrantFactory(name="Platform", owner=owner, limit_amount=Decimal("100"))
    GrantFactory(name="Search", owner=PersonFactory(), parent=parent, scope=Grant.Scope.PROJECT, project="search",
                 team=parent.team, limit_amount=Decimal("30"))
    page = client.get("/budgets/").content.decode()
    assert "Platform" in page and "Search" in page and "delegated to" in page and "0.00 USD spent of 100.00 USD per month" in page


def test_delegation_form_refuses_more_than_the_parent_with_a_field_error(client, owner):
    parent = GrantFactory(owner=owner, limit_amount=Decimal("100"))
    response = client.post(f"/budgets/{parent.pk}/delegate/", {"name": "Big", "scope": "project", "project": "big",
                                                               "limit_amount": "150"})
    assert response.status_code == 400 and "would promise 150" in response.content.decode()
    response = client.post(f"/budgets/{parent.pk}/delegate/", {"name": "Fits", "scope": "project", "project": "fits",
                                                               "limit_amount": "40"})
    assert response.status_code == 302 and parent.children.get().name == "Fits"


def test_only_the_owner_may_delegate_or_ask_for_more(client, owner):
    theirs = GrantFactory()
    assert client.get(f"/budgets/{theirs.pk}/delegate/").status_code == 403
    assert client.post(f"/budgets/{theirs.pk}/increase/", {"new_limit": "500", "reason": "x"}).status_code == 403


def test_renewal_due_shows_a_renew_button(client, owner):
    GrantFactory(owner=owner, renews_at=timezone.localdate() + timezone.timedelta(days=5))
    assert "Renew" in client.get("/budgets/").content.decode()


def test_admin_shows_the_hierarchy_with_usage(admin_client):
    org = GrantFactory(name="Org", scope=Grant.Scope.ORG, team=None, limit_amount=Decimal("1000"))
    GrantFactory(name="Team A", parent=org, limit_amount=Decimal("10"))
    page = admin_client.get("/admin/budgets/grant/tree/").content.decode()
    assert page.index("Org") < page.index("Team A") and "0.00 of 10" in page
    assert admin_client.get("/admin/budgets/grant/", {"usage": "80"}).status_code == 200
    assert admin_client.get("/admin/budgets/grant/", {"renewal": "14"}).status_code == 200


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alert_goes_to_a_slack_compatible_webhook_once(owner):
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        grant = GrantFactory(owner=owner, webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        since = enforcement.period_start(grant.period).isoformat()
        assert alerts.send(grant.pk, since, "80", "85.00") is True
        assert alerts.send(grant.pk, since, "80", "86.00") is False  # once per period
    finally:
        server.shutdown()
    assert len(_Hook.received) == 1 and "reached 80%" in _Hook.received[0]["text"]


@pytest.mark.redis
def test_forecast_alert_when_the_pace_passes_the_limit(owner):
    import time_machine

    grant = GrantFactory(owner=owner, limit_amount=Decimal("100"))
    start = enforcement.period_start(grant.period)
    meter = enforcement.meters_for([grant])[0]
    with time_machine.travel(start + timezone.timedelta(days=10)):
        get_redis().set(meter.redis_keys()[0], enforcement.to_units(Decimal("60")))
        assert alerts.forecast_alerts() == 1
    assert GrantAlert.objects.get().kind == "forecast"


@pytest.mark.redis
def test_counter_check_reports_and_repairs_drift(owner):
    grant = GrantFactory(owner=owner)
    meter = enforcement.meters_for([grant])[0]
    client = get_redis()
    client.delete(meter.redis_keys()[0])
    client.set(meter.redis_keys()[0], 12345)  # counts spend the ledger does not have
    report = grant_counters_verify()
    assert [(base, counted, ledger) for base, counted, ledger in report.drift] == [(meter.base, 12345, 0)]
    assert int(client.get(meter.redis_keys()[0])) == 0
    assert grant_counters_verify().drift == []
