"""Changelists of the big tables (ledger entries, audit events) never count the whole table nor use DISTINCT,
and still list, search and filter."""
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from governance.audit import audit_record
from governance.bigtables import estimated_count
from ledger.models import LedgerEntry
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


def _assert_no_full_count_or_distinct(queries, table):
    sqls = [query["sql"].upper() for query in queries.captured_queries]
    distinct = [sql for sql in sqls if "DISTINCT" in sql]
    full_counts = [sql for sql in sqls if "COUNT(" in sql and table.upper() in sql and "LIMIT" not in sql]
    assert (distinct, full_counts) == ([], [])


def _changelist(client, url, params, table):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, params)
    assert response.status_code == 200
    _assert_no_full_count_or_distinct(queries, table)
    return response


@pytest.mark.parametrize("params", [{}, {"outcome": "refused"}, {"error_code": "over_budget"}, {"q": "needle"},
                                    {"q": "needle", "outcome": "refused", "streamed__exact": "0"}])
def test_ledger_entries_changelist_neither_counts_the_table_nor_uses_distinct(admin_client, params):
    LedgerEntryFactory(request_id="haystack-1")
    LedgerEntryFactory(request_id="needle", outcome=LedgerEntry.Outcome.REFUSED, http_status=402, error_code="over_budget")
    response = _changelist(admin_client, reverse("admin:ledger_ledgerentry_changelist"), params, "ledger_ledgerentry")
    rows = [entry.request_id for entry in response.context["cl"].result_list]
    assert rows == (["needle", "haystack-1"] if not params else ["needle"])


def test_ledger_entries_search_by_key_prefix_finds_its_rows(admin_client):
    wanted = LedgerEntryFactory()
    LedgerEntryFactory()
    response = _changelist(admin_client, reverse("admin:ledger_ledgerentry_changelist"), {"q": wanted.key.prefix},
                           "ledger_ledgerentry")
    assert [entry.pk for entry in response.context["cl"].result_list] == [wanted.pk]


@pytest.mark.parametrize("params", [{}, {"action": "needle.done"}, {"q": "needle"}, {"q": "needle", "action": "needle.done"}])
def test_audit_events_changelist_neither_counts_the_table_nor_uses_distinct(admin_client, params):
    audit_record(actor=None, actor_label="system", action="haystack.done", after={"n": 1})
    audit_record(actor=None, actor_label="system", action="needle.done", after={"n": 2})
    response = _changelist(admin_client, reverse("admin:governance_auditevent_changelist"), params, "governance_auditevent")
    actions = [event.action for event in response.context["cl"].result_list]
    assert "needle.done" in actions
    if params:
        assert set(actions) == {"needle.done"}
    else:
        assert "haystack.done" in actions
    assert b"needle.done" in response.content


def test_the_filter_offers_values_of_recent_rows(admin_client):
    LedgerEntryFactory(outcome=LedgerEntry.Outcome.REFUSED, http_status=402, error_code="over_budget")
    response = admin_client.get(reverse("admin:ledger_ledgerentry_changelist"))
    assert b"?error_code=over_budget" in response.content


def test_pages_of_a_list_longer_than_one_page_still_open(admin_client):
    for _ in range(3):
        LedgerEntryFactory()
    url = reverse("admin:ledger_ledgerentry_changelist")
    from ledger.admin import LedgerEntryAdmin

    original = LedgerEntryAdmin.list_per_page
    LedgerEntryAdmin.list_per_page = 2
    try:
        first = _changelist(admin_client, url, {}, "ledger_ledgerentry")
        second = _changelist(admin_client, url, {"p": "2"}, "ledger_ledgerentry")
    finally:
        LedgerEntryAdmin.list_per_page = original
    assert len(first.context["cl"].result_list) == 2
    assert len(second.context["cl"].result_list) == 1


@pytest.mark.postgres
def test_above_the_cap_the_count_is_the_planner_estimate():
    for _ in range(30):
        LedgerEntryFactory()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE ledger_ledgerentry")
    with CaptureQueriesContext(connection) as queries:
        count, exact = estimated_count(LedgerEntry.objects.all(), cap=10)
    assert not exact and count > 10
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    with CaptureQueriesContext(connection) as queries:
        count, exact = estimated_count(LedgerEntry.objects.filter(outcome="ok"), cap=10)
    assert not exact and count > 10
    assert any(q["sql"].startswith("EXPLAIN") for q in queries.captured_queries)
    assert estimated_count(LedgerEntry.objects.filter(outcome="refused"), cap=10) == (0, True)
