"""Retention: raw ledger entries older than a cutoff go to a gzip'd JSON-lines file per month, then leave
the database (PostgreSQL: the month's partition is detached and dropped; elsewhere: deleted in batches).
The daily rollups stay, so reports over archived months still work. An archive can be restored."""
import gzip
import json
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction

from governance.audit import audit_record
from ledger import partitions
from ledger.models import CallBody, LedgerEntry

FIELDS = [f.attname for f in LedgerEntry._meta.concrete_fields]


@dataclass(frozen=True)
class Archived:
    path: Path
    month: date
    entries: int


def _write(path: Path, rows) -> int:
    count = 0
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, cls=DjangoJSONEncoder) + "\n")
            count += 1
    return count


def _month_rows(start: date, end: date):
    return LedgerEntry.objects.filter(created_at__date__gte=start, created_at__date__lt=end).order_by("pk").values(*FIELDS).iterator(chunk_size=5000)


def ledger_archive(*, before: date, directory: Path, actor_label: str = "ledger archive") -> list[Archived]:
    """Archive every whole month before `before`'s month. Each month: written, checked, then removed."""
    directory.mkdir(parents=True, exist_ok=True)
    cutoff = before.replace(day=1)
    done = []
    if partitions.is_partitioned():
        months = [start for _, start in partitions.partitions_before(cutoff)]
    else:
        oldest = LedgerEntry.objects.order_by("created_at").values_list("created_at", flat=True).first()
        months, month = [], (oldest.date().replace(day=1) if oldest else cutoff)
        while month < cutoff:
            months.append(month)
            month = partitions._next(month)
    for month in months:
        end = partitions._next(month)
        path = directory / f"ledger-{month:%Y-%m}.jsonl.gz"
        written = _write(path, _month_rows(month, end))
        if written != LedgerEntry.objects.filter(created_at__date__gte=month, created_at__date__lt=end).count():
            raise RuntimeError(f"archive of {month:%Y-%m} is incomplete; nothing was removed")
        with transaction.atomic():
            ids = LedgerEntry.objects.filter(created_at__date__gte=month, created_at__date__lt=end).values("pk")
            CallBody.objects.filter(entry_id__in=ids).delete()
            if partitions.is_partitioned():
                partitions.drop_partition(partitions.partition_name(month))
            else:
                _delete_in_batches(month, end)
            audit_record(actor=None, actor_label=actor_label, action="ledger.archive",
                         after={"month": f"{month:%Y-%m}", "entries": written, "file": str(path)})
        done.append(Archived(path, month, written))
    return done


def _delete_in_batches(start: date, end: date, batch: int = 5000) -> None:
    """Without partitions (SQLite): remove in small batches, never one mass DELETE."""
    while True:
        ids = list(LedgerEntry.objects.filter(created_at__date__gte=start, created_at__date__lt=end).values_list("pk", flat=True)[:batch])
        if not ids:
            return
        # The queryset refuses delete() (entries are immutable to the application); retention after a
        # verified archive is the one exception, so it goes below that guard on purpose.
        LedgerEntry.objects.filter(pk__in=ids)._raw_delete(LedgerEntry.objects.db)


@transaction.atomic
def ledger_restore(*, path: Path) -> int:
    """Put an archived month back (its partition is recreated first)."""
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    if not rows:
        return 0
    entries = []
    for row in rows:
        row["created_at"] = datetime.fromisoformat(row["created_at"])
        row["cost"] = Decimal(row["cost"])
        entries.append(LedgerEntry(**row))
    if connection.vendor == "postgresql" and partitions.is_partitioned():
        partitions.ensure_partitions(start=min(e.created_at for e in entries).date(), months_ahead=0)
    LedgerEntry.objects.bulk_create(entries, batch_size=5000)
    audit_record(actor=None, actor_label="ledger restore", action="ledger.restore", after={"file": str(path), "entries": len(entries)})
    return len(entries)
