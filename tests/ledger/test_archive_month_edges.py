"""Retention by UTC month (the partitions' months), whatever TIME_ZONE says, and a restore that streams."""
import gzip
import json
from datetime import date, datetime
from datetime import timezone as dt_timezone

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ledger import partitions
from ledger.archive import ledger_archive, ledger_restore
from ledger.models import LedgerEntry
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
EDGES = [  # (when, UTC month it belongs to)
    (datetime(2026, 9, 1, 0, 30, tzinfo=UTC), "2026-09"),
    (datetime(2026, 9, 30, 23, 30, tzinfo=UTC), "2026-09"),
    (datetime(2026, 10, 1, 0, 30, tzinfo=UTC), "2026-10"),
    (datetime(2026, 10, 15, 12, 0, 0, 123456, tzinfo=UTC), "2026-10"),
    (datetime(2026, 10, 31, 23, 30, tzinfo=UTC), "2026-10"),
]
KEPT = datetime(2026, 11, 1, 0, 30, tzinfo=UTC)  # November: after the cutoff, stays in the database


@pytest.fixture
def edge_entries():
    if partitions.is_partitioned():
        partitions.ensure_partitions(start=date(2026, 9, 1))
    entries = {LedgerEntryFactory(created_at=when).request_id: (when, month) for when, month in EDGES}
    kept = LedgerEntryFactory(created_at=KEPT).request_id
    return entries, kept


def _archived_rows(archived):
    return {f"{a.month:%Y-%m}": [json.loads(line) for line in gzip.open(a.path, "rt")] for a in archived}


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "Europe/Berlin", "America/New_York"])
def test_entries_near_month_edges_are_archived_in_their_utc_month_and_restored(zone, settings, edge_entries, tmp_path):
    settings.TIME_ZONE = zone
    entries, kept = edge_entries
    with timezone.override(zone):
        archived = ledger_archive(before=date(2026, 11, 1), directory=tmp_path)
        files = _archived_rows(archived)

        # Every entry in exactly one file, its UTC month's; the November entry in none and still in the table.
        found = {row["request_id"]: month for month, rows in files.items() for row in rows}
        assert found == {request_id: month for request_id, (_, month) in entries.items()}
        assert sum(len(rows) for rows in files.values()) == len(entries)
        assert list(LedgerEntry.objects.values_list("request_id", flat=True)) == [kept]

        for a in archived:
            ledger_restore(path=a.path)
    restored = dict(LedgerEntry.objects.values_list("request_id", "created_at"))
    assert restored == {**{request_id: when for request_id, (when, _) in entries.items()}, kept: KEPT}


@pytest.mark.postgres
def test_archived_months_leave_no_partition_and_nothing_in_the_default_partition(settings, edge_entries, tmp_path):
    settings.TIME_ZONE = "Asia/Tokyo"
    with timezone.override("Asia/Tokyo"):
        ledger_archive(before=date(2026, 11, 1), directory=tmp_path)
    assert [name for name, _ in partitions.partitions_before(date(2026, 11, 1))
            if name in (partitions.partition_name(date(2026, 9, 1)), partitions.partition_name(date(2026, 10, 1)))] == []
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT count(*) FROM "{partitions.TABLE}_default"')
        assert cursor.fetchone()[0] == 0


def test_restore_reads_and_inserts_in_chunks(edge_entries, tmp_path):
    archived = {f"{a.month:%Y-%m}": a for a in ledger_archive(before=date(2026, 11, 1), directory=tmp_path)}
    october = archived["2026-10"]
    assert october.entries == 3
    with CaptureQueriesContext(connection) as queries:
        assert ledger_restore(path=october.path, chunk_size=2) == 3
    inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('INSERT INTO "ledger_ledgerentry"')]
    assert len(inserts) == 2  # 2 + 1 rows: one INSERT per chunk, never the whole month at once
    assert LedgerEntry.objects.filter(created_at__gte=datetime(2026, 10, 1, tzinfo=UTC),
                                      created_at__lt=datetime(2026, 11, 1, tzinfo=UTC)).count() == 3
