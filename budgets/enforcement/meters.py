"""Meters: what a budget counts (a grant's spend or tokens in one period, or a key's own monthly cap), its
counters' names in Redis, and what the ledger says it has spent."""
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from functools import cached_property

from django.db import connection, transaction
from django.db.models import Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from budgets.models import Grant

UNIT = Decimal("0.00000001")  # the ledger's precision; Redis counts integers of it
NO_LIMIT = -1


def to_units(amount: Decimal) -> int:
    return int((amount / UNIT).to_integral_value(rounding=ROUND_CEILING))


def period_start(period: str, *, term_start=None, now: datetime | None = None) -> datetime:
    """Start of the period containing `now`, in the organisation's time zone."""
    now = timezone.localtime(now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Grant.Period.DAILY:
        return midnight
    if period == Grant.Period.WEEKLY:
        return midnight - timedelta(days=midnight.weekday())
    if period == Grant.Period.TOTAL:
        start = term_start or now.date()
        return timezone.make_aware(datetime(start.year, start.month, start.day))
    return midnight.replace(day=1)


@dataclass(frozen=True)
class Meter:
    """One counter pair: a grant's spend (or tokens) in one period, or a key's own monthly cap."""

    name: str  # e.g. "grant:12:cost" or "key:7:cost"
    since: datetime
    limit: int  # units; NO_LIMIT tracks without checking
    grant: Grant | None = None
    key_id: int | None = None
    unit: str = "cost"  # or "tokens"

    @cached_property  # read several times per call per meter
    def base(self) -> str:
        return f"budget:{self.name}:{self.since:%Y%m%d}"

    def redis_keys(self) -> list[str]:
        return [f"{self.base}:spent", f"{self.base}:held", f"{self.base}:holds", f"{self.base}:amounts"]

    @property
    def late_key(self) -> str:
        """Amounts settled while the counter was missing, by hold: "<row committed 1|0>:<amount>"."""
        return f"{self.base}:late"

    @property
    def counted_key(self) -> str:
        """Open holds whose calls' rows the last rebuild already counted (their settle adds nothing)."""
        return f"{self.base}:counted"

    def _entries(self):
        from ledger.models import LedgerEntry

        entries = LedgerEntry.objects.filter(created_at__gte=self.since)
        return entries.filter(key_id=self.key_id) if self.key_id else entries.filter(grant_path__contains=f",{self.grant.pk},")

    def _total(self, entries) -> int:
        if self.unit == "tokens":
            total = entries.aggregate(t=Coalesce(Sum("input_tokens"), 0) + Coalesce(Sum("output_tokens"), 0))["t"]
            return int(total or 0)
        return to_units(entries.aggregate(s=Sum("cost"))["s"] or Decimal(0))

    def ledger_total(self) -> int:
        """What the ledger says this meter has spent this period, in units."""
        return self._total(self._entries())

    def ledger_read(self, holds: list[str]) -> tuple[int, list[str]]:
        """The ledger total, and which of these holds' calls it has a row for, from one snapshot (REPEATABLE
        READ on PostgreSQL), so a row committed meanwhile is in both answers or in neither."""
        calls = {call: hold for hold in holds if (call := call_of(hold)) is not None}
        outermost = not connection.in_atomic_block
        with transaction.atomic():
            if outermost and connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            entries = self._entries()
            # The lookup first: should the snapshot not be shared (inside a caller's transaction), a row
            # committed between the two reads is then in the total only, and counted twice, never zero times.
            rows = (entries.filter(request_id__in={request_id for request_id, _ in calls}).order_by()
                    .values_list("request_id", "created_at") if calls else [])
            found = [calls[row] for row in rows if row in calls]
            return self._total(entries), found


def call_of(hold_id: str) -> tuple[str, datetime] | None:
    """The (request_id, created_at) of the ledger row of the call a hold is for, when the hold carries it."""
    _, sep, rest = hold_id.partition("|")
    if not sep:
        return None
    request_id, _, created_at = rest.rpartition("|")
    return request_id, datetime.fromisoformat(created_at)


def meters_for(grants: list[Grant], key=None) -> list[Meter]:
    meters, now = [], timezone.localtime()
    for grant in grants:
        since = period_start(grant.period, term_start=grant.term_start, now=now)
        blocks = grant.grant_class == Grant.GrantClass.EXPERIMENTATION or grant.on_cap != Grant.OnCap.ALLOW_AND_PAGE
        meters.append(Meter(f"grant:{grant.pk}:cost", since, to_units(grant.limit_amount) if blocks else NO_LIMIT, grant=grant))
        if grant.limit_tokens is not None:
            meters.append(Meter(f"grant:{grant.pk}:tokens", since, grant.limit_tokens if blocks else NO_LIMIT,
                                grant=grant, unit="tokens"))
    if key is not None and key.monthly_budget is not None:
        meters.append(Meter(f"key:{key.pk}:cost", period_start(Grant.Period.MONTHLY, now=now), to_units(key.monthly_budget),
                            key_id=key.pk))
    return meters


def _ttl(meter: Meter) -> int:
    return 400 * 86400 if meter.grant is not None and meter.grant.period == Grant.Period.TOTAL else 40 * 86400
