"""Usage (ledger entries) with filters and a cursor, and chargeback as JSON and CSV."""
import csv
import io
from decimal import Decimal

import pytest
from django.utils import timezone

from ledger.models import LedgerEntry
from ledger.services import ledger_rollup
from tests.api.conftest import token_client
from tests.gateway.factories import ModelAliasFactory, ProviderModelFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def calls(org):
    own = VirtualKeyFactory(person=org.employee, team=org.team_a, default_tags={"project": "notes"})
    other = VirtualKeyFactory(person=org.stranger, team=org.team_b)
    now = timezone.now()
    entries = [LedgerEntryFactory(key=own, tags={"project": "notes"}, model_requested="fast", created_at=now - timezone.timedelta(minutes=n))
               for n in range(5)]
    entries.append(LedgerEntryFactory(key=own, model_requested="smart", outcome=LedgerEntry.Outcome.REFUSED,
                                      http_status=429, created_at=now - timezone.timedelta(days=3)))
    entries.append(LedgerEntryFactory(key=other, model_requested="fast", created_at=now))
    return own, other, entries


def _all_pages(client, url, params):
    seen, response = [], client.get(url, params)
    while True:
        body = response.json()
        seen += [row["id"] for row in body["results"]]
        if not body["next"]:
            return seen
        response = client.get(body["next"])


def test_usage_is_scoped_to_what_the_person_may_see_and_filters_apply(org, calls):
    own, other, entries = calls
    employee = token_client(org.employee, {"usage": "read"})
    ids = [row["id"] for row in employee.get("/api/v1/usage/").json()["results"]]
    assert other.pk not in {e.key_id for e in LedgerEntry.objects.filter(pk__in=ids)} and len(ids) == 6
    assert ids == sorted(ids, reverse=True)
    assert len(employee.get("/api/v1/usage/", {"outcome": "refused"}).json()["results"]) == 1
    assert len(employee.get("/api/v1/usage/", {"model": "smart"}).json()["results"]) == 1
    assert len(employee.get("/api/v1/usage/", {"tag": "notes"}).json()["results"]) == 5
    since = (timezone.now() - timezone.timedelta(days=1)).isoformat()
    assert len(employee.get("/api/v1/usage/", {"start": since}).json()["results"]) == 5
    assert len(employee.get("/api/v1/usage/", {"key": other.pk}).json()["results"]) == 0
    finance = token_client(org.finance, {"usage": "read"})
    assert len(finance.get("/api/v1/usage/", {"team": "team-b"}).json()["results"]) == 1
    assert len(finance.get("/api/v1/usage/", {"person": org.employee.username}).json()["results"]) == 6


def test_usage_pages_with_a_cursor_and_no_count(org, calls):
    finance = token_client(org.finance, {"usage": "read"})
    first = finance.get("/api/v1/usage/", {"page_size": 2}).json()
    assert "count" not in first and "cursor=" in first["next"]
    seen = _all_pages(finance, "/api/v1/usage/", {"page_size": 2})
    assert seen == sorted((e.pk for e in calls[2]), reverse=True)


def test_audit_events_page_with_a_cursor_for_auditors_only(org, calls):
    token_client(org.it).post(f"/api/v1/keys/{calls[1].pk}/revoke/", {"reason": "x"}, format="json")
    assert token_client(org.employee).get("/api/v1/audit-events/").status_code == 403
    events = token_client(org.finance).get("/api/v1/audit-events/", {"action": "key.revoke"}).json()
    assert [e["action"] for e in events["results"]] == ["key.revoke"]
    assert "next" in events and "count" not in events  # a cursor page


def _rolled_up(org):
    alias, model = ModelAliasFactory(name="fast"), ProviderModelFactory(name="gpt-x")
    for team, cost in ((org.team_a, "1.005"), (org.team_b, "2.50")):
        key = VirtualKeyFactory(person=None, team=team)
        LedgerEntryFactory(key=key, person=None, cost=Decimal(cost), alias=alias, provider_model=model)
    ledger_rollup()


def test_chargeback_json_groups_by_team_and_model_and_adds_up(org):
    _rolled_up(org)
    today = timezone.localdate().isoformat()
    response = token_client(org.finance, {"chargeback": "read"}).get(
        "/api/v1/chargeback/", {"start": today, "end": today, "group_by": "team,model"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["total"] == "3.51" and body["group_by"] == ["team", "model"]
    assert {(line["groups"]["team"], line["groups"]["model"]) for line in body["lines"]} == {("team-a", "gpt-x"), ("team-b", "gpt-x")}
    assert sum(Decimal(line["amount"]) for line in body["lines"]) == Decimal(body["total"])


def test_chargeback_csv_is_finance_s_export(org):
    _rolled_up(org)
    today = timezone.localdate().isoformat()
    response = token_client(org.finance, {"chargeback": "read"}).get(
        "/api/v1/chargeback/", {"start": today, "end": today, "group_by": "team", "format": "csv"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert ["Team", "Calls"] == rows[8][:2] and rows[-1][0] == "Total" and rows[-1][4] == "3.51"


def test_chargeback_refuses_bad_input_with_400_and_employees_with_403(org):
    finance = token_client(org.finance)
    response = finance.get("/api/v1/chargeback/", {"start": "2026-02-01", "end": "2026-01-01", "group_by": "nope"})
    assert response.status_code == 400 and "group_by" in response.json()
    assert token_client(org.employee).get("/api/v1/chargeback/", {"start": "2026-01-01", "end": "2026-01-31"}).status_code == 403
