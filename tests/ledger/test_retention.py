"""Retention: archive old months to a file, remove them without a mass DELETE, keep the rollups, restore."""
import gzip
import json
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from ledger import partitions
from ledger.archive import ledger_archive, ledger_restore
from ledger.models import DailyRollup, LedgerEntry
from ledger.services import ledger_rollup
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


def _old_and_new():
    old_month = (timezone.localdate().replace(day=1) - timedelta(days=70)).replace(day=1)
    if partitions.is_partitioned():
        partitions.ensure_partitions(start=old_month)
    old = timezone.make_aware(datetime(old_month.year, old_month.month, 15, 12))
    for cost in ("1.00", "2.00"):
        LedgerEntryFactory(created_at=old, cost=Decimal(cost))
    LedgerEntryFactory(cost=Decimal("5.00"))
    ledger_rollup()
    return old_month


@pytest.mark.postgres
def test_the_ledger_is_partitioned_by_month_on_postgres():
    assert partitions.is_partitioned()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'ledger_ledgerentry'")
        assert cursor.fetchone()[0] >= 4  # default + this month + two ahead


def test_archive_moves_old_months_to_a_file_and_keeps_the_rollups(tmp_path):
    old_month = _old_and_new()
    rollup_total = sum(r.cost for r in DailyRollup.objects.all())
    archived = ledger_archive(before=timezone.localdate(), directory=tmp_path)
    old = [a for a in archived if a.month == old_month][0]
    assert old.entries == 2
    rows = [json.loads(line) for line in gzip.open(old.path, "rt")]
    assert sorted(r["cost"] for r in rows) == ["1.00000000", "2.00000000"]
    assert list(LedgerEntry.objects.values_list("cost", flat=True)) == [Decimal("5")]
    assert sum(r.cost for r in DailyRollup.objects.all()) == rollup_total
    if partitions.is_partitioned():
        assert partitions.partition_name(old_month) not in [name for name, _ in partitions.partitions_before(timezone.localdate())]


def test_restore_puts_an_archived_month_back(tmp_path):
    old_month = _old_and_new()
    path = [a for a in ledger_archive(before=timezone.localdate(), directory=tmp_path) if a.month == old_month][0].path
    assert ledger_restore(path=path) == 2
    assert LedgerEntry.objects.count() == 3


def test_archive_command_reports_each_month(tmp_path, capsys):
    _old_and_new()
    call_command("archive_ledger", "--before", timezone.localdate().isoformat(), "--dir", str(tmp_path))
    assert "2 entries" in capsys.readouterr().out
