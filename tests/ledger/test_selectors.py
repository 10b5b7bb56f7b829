"""Spend read from the rollups plus the entries not yet folded (issue 14: counter checks read rollups)."""
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from budgets.enforcement import period_start
from ledger.selectors import spend_since
from ledger.services import ledger_rollup
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


def test_spend_counts_folded_and_unfolded_entries_once_each(settings):
    settings.TIME_ZONE = "Europe/Berlin"
    key = VirtualKeyFactory()
    since = period_start("monthly")
    LedgerEntryFactory(key=key, cost=Decimal("1.25"), grant_path=",7,", created_at=since + timedelta(minutes=1))
    LedgerEntryFactory(key=key, cost=Decimal("9"), grant_path=",7,", created_at=since - timedelta(minutes=1))  # last month
    ledger_rollup()
    LedgerEntryFactory(key=key, cost=Decimal("2.50"), grant_path=",3,7,", created_at=timezone.now())
    assert spend_since(since=since, grant_id=7) == Decimal("3.75")
    assert spend_since(since=since, grant_id=3) == Decimal("2.50")
    assert spend_since(since=since, key_ids=[key.pk], by_key=True) == {key.pk: Decimal("3.75")}
    ledger_rollup()
    with CaptureQueriesContext(connection) as queries:
        assert spend_since(since=since, grant_id=7, unit="tokens") == 300
    assert any("ledger_dailyrollup" in q["sql"] for q in queries.captured_queries)


def test_spend_refuses_a_start_that_is_not_a_midnight():
    with pytest.raises(ValueError, match="midnight"):
        spend_since(since=timezone.now().replace(hour=13), grant_id=1)
