"""Reads of the ledger for other apps: spend from the daily rollups plus the entries not yet folded into
them, so a check over a month reads a few hundred rollup rows, not every call of the month."""
from datetime import datetime
from decimal import Decimal

from django.db import connection, transaction
from django.db.models import Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from ledger.models import DailyRollup, LedgerEntry, RollupState


def _scope(key_ids=None, grant_id: int | None = None) -> Q:
    if grant_id is not None:
        return Q(grant_path__contains=f",{grant_id},")
    return Q(key_id__in=key_ids)


def spend_since(*, since: datetime, key_ids=None, grant_id: int | None = None, unit: str = "cost",
                by_key: bool = False) -> dict | Decimal | int:
    """Spend (or tokens) since `since`, a local midnight (budget periods start at one), of a grant (every
    call its path charged) or of keys (`by_key`: per key). Rollups hold whole local days up to the fold's
    high-water mark; the entries above it are added from the ledger. Read from one snapshot, so an entry
    folded meanwhile counts once."""
    if timezone.localtime(since).time() != datetime.min.time():
        raise ValueError("spend_since reads whole days: `since` must be a local midnight")
    measure = Sum("cost") if unit == "cost" else Coalesce(Sum("input_tokens"), 0) + Coalesce(Sum("output_tokens"), 0)
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        state = RollupState.objects.filter(pk=1).first()
        folded_up_to = state.last_entry_id if state else 0
        scope = _scope(key_ids, grant_id)
        rollups = DailyRollup.objects.filter(scope, day__gte=timezone.localtime(since).date())
        tail = LedgerEntry.objects.filter(scope, pk__gt=folded_up_to, created_at__gte=since)
        if by_key:
            totals: dict = {}
            for rows in (rollups, tail):
                for key_id, total in rows.order_by().values_list("key_id").annotate(total=measure):
                    totals[key_id] = totals.get(key_id, 0) + (total or 0)
            return totals
        values = [rows.aggregate(total=measure)["total"] or 0 for rows in (rollups, tail)]
        return sum(values, Decimal(0) if unit == "cost" else 0)
