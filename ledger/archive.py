"""Retention: raw ledger entries older than a cutoff go to a gzip'd JSON-lines file per month, then leave
the database (PostgreSQL: the month's partition is detached and dropped; elsewhere: deleted in batches).
The daily rollups stay, so reports over archived months still work. An archive can be restored."""
import gzip
import json
from dataclasses import dataclass
from datetime import date, datetime
from datetime import timezone as dt_timezone
from decimal import Decimal
from pathlib import Path

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

from governance.audit import audit_record
from ledger import partitions
from ledger.models import CallBody, LedgerEntry

FIELDS = [f.attname for f in LedgerEntry._meta.concrete_fields]
CHUNK = 5000


@dataclass(frozen=True)
class Archived:
    path: Path
    month: date
    entries: int


class _ArchiveEncoder(DjangoJSONEncoder):
    """DjangoJSONEncoder cuts datetimes to milliseconds; an archive keeps every microsecond (and the UTC offset)."""

    def default(self, o):
        if isinstance(o, datetime):
            return o.isoformat()
        return super().default(o)


def _utc_bounds(month: date) -> tuple[datetime, datetime]:
    """A month as PostgreSQL partitions it: [first day 00:00 UTC, next month's first day 00:00 UTC). Never the
    local date: east of UTC the month's last hours would be left out of its file and dropped with its partition."""
    end = partitions._next(month)
    return (datetime(month.year, month.month, 1, tzinfo=dt_timezone.utc),
            datetime(end.year, end.month, 1, tzinfo=dt_timezone.utc))


def _in_month(month: date):
    start, end = _utc_bounds(month)
    return LedgerEntry.objects.filter(created_at__gte=start, created_at__lt=end)


def _write(path: Path, rows) -> int:
    count = 0
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, cls=_ArchiveEncoder) + "\n")
            count += 1
    return count


def _month_rows(month: date):
    return _in_month(month).order_by("pk").values(*FIELDS).iterator(chunk_size=CHUNK)


def ledger_archive(*, before: date, directory: Path, actor_label: str = "ledger archive") -> list[Archived]:
    """Archive every whole (UTC) month before `before`'s month. Each month: written, checked, then removed."""
    directory.mkdir(parents=True, exist_ok=True)
    cutoff = before.replace(day=1)
    done = []
    if partitions.is_partitioned():
        months = [start for _, start in partitions.partitions_before(cutoff)]
    else:
        oldest = LedgerEntry.objects.order_by("created_at").values_list("created_at", flat=True).first()
        months, month = [], (oldest.astimezone(dt_timezone.utc).date().replace(day=1) if oldest else cutoff)
        while month < cutoff:
            months.append(month)
            month = partitions._next(month)
    for month in months:
        path = directory / f"ledger-{month:%Y-%m}.jsonl.gz"
        written = _write(path, _month_rows(month))
        if written != _in_month(month).count():
            raise RuntimeError(f"archive of {month:%Y-%m} is incomplete; nothing was removed")
        with transaction.atomic():
            CallBody.objects.filter(entry_id__in=_in_month(month).values("pk")).delete()
            if partitions.is_partitioned():
                partitions.drop_partition(partitions.partition_name(month))
            else:
                _delete_in_batches(month)
            audit_record(actor=None, actor_label=actor_label, action="ledger.archive",
                         after={"month": f"{month:%Y-%m}", "entries": written, "file": str(path)})
        done.append(Archived(path, month, written))
    return done


def _delete_in_batches(month: date, batch: int = CHUNK) -> None:
    """Without partitions (SQLite): remove in small batches, never one mass DELETE."""
    while True:
        ids = list(_in_month(month).values_list("pk", flat=True)[:batch])
        if not ids:
            return
        # The queryset refuses delete() (entries are immutable to the application); retention after a
        # verified archive is the one exception, so it goes below that guard on purpose.
        LedgerEntry.objects.filter(pk__in=ids)._raw_delete(LedgerEntry.objects.db)


def _entries(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            row["created_at"] = datetime.fromisoformat(row["created_at"])
            row["cost"] = Decimal(row["cost"])
            yield LedgerEntry(**row)


@transaction.atomic
def ledger_restore(*, path: Path, chunk_size: int = CHUNK) -> int:
    """Put an archived month back, reading the file in chunks (a month may not fit in memory); the partitions
    of the months in the file are recreated first. All or nothing: one transaction."""
    partitioned = partitions.is_partitioned()
    ensured_from, restored = None, 0
    for chunk in _chunks(_entries(path), chunk_size):
        if partitioned:
            first = min(entry.created_at for entry in chunk).astimezone(dt_timezone.utc).date().replace(day=1)
            if ensured_from is None or first < ensured_from:
                # From the chunk's first month up to this month: covers every month in the chunk.
                partitions.ensure_partitions(start=first, months_ahead=0)
                ensured_from = first
        LedgerEntry.objects.bulk_create(chunk, batch_size=chunk_size)
        restored += len(chunk)
    if restored:
        audit_record(actor=None, actor_label="ledger restore", action="ledger.restore", after={"file": str(path), "entries": restored})
    return restored


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
