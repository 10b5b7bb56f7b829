"""Reads of virtual keys: the relay's key cache, and what the self-service pages show about keys (models
and prices, budgets with holds in flight, recent calls, usage by day, history)."""
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db.models import DecimalField, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from governance import runtime, stamps
from keys import keyformat
from keys.models import AccessRequest, VirtualKey

if TYPE_CHECKING:
    from gateway.models import ModelAlias, ModelPrice


class _KeyCache:
    """Keys the relay has seen, in this process's memory, with their team, owner, cost center and model
    allowlists loaded, so an authenticated call needs no query. Entries are valid for the keys stamp they
    were loaded at (governance.stamps: every write to a key, team, person, cost center, membership or
    allowlist bumps it after commit, so a revocation reaches every process on its next call). In case a bump
    could not be published, every key held is read again each TOLLGATE_MEMORY_CACHE_SECONDS, all in one
    query: the cost of that safety net does not grow with the number of keys in use. At most
    TOLLGATE_KEY_CACHE_SIZE keys, least recently used out first. Unknown secrets are never cached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stamp: str | None = None
        self.refreshed_at = time.monotonic()
        # key digest -> key; ("actor", team id, e-mail) -> the person, or _NO_ONE
        self.entries: OrderedDict[str | tuple, object] = OrderedDict()

    def get(self, entry: str | tuple, stamp: str):
        with self.lock:
            if stamp != self.stamp:
                self._reset(stamp)
                return None
            value = self.entries.get(entry)
            if value is not None:
                self.entries.move_to_end(entry)
            return value

    def put(self, entry: str | tuple, stamp: str, value) -> None:
        with self.lock:
            if stamp != self.stamp:
                return  # the stamp moved while the key was loading: what was read may be stale already
            self.entries[entry] = value
            while len(self.entries) > settings.TOLLGATE_KEY_CACHE_SIZE:
                self.entries.popitem(last=False)

    def refresh_if_due(self, stamp: str) -> None:
        """Read every key held again (one query), once per TOLLGATE_MEMORY_CACHE_SECONDS."""
        with self.lock:
            if time.monotonic() - self.refreshed_at < settings.TOLLGATE_MEMORY_CACHE_SECONDS:
                return
            self.refreshed_at = time.monotonic()  # one call refreshes; the others go on meanwhile
            if stamp != self.stamp:
                self._reset(stamp)
                return
            digests = [entry for entry in self.entries if isinstance(entry, str)]
        loaded = _load_many(digests)
        with self.lock:
            if stamp != self.stamp:
                return
            self.entries = OrderedDict((digest, loaded[digest]) for digest in self.entries if digest in loaded)

    def _reset(self, stamp: str | None) -> None:
        self.entries.clear()
        self.stamp = stamp
        self.refreshed_at = time.monotonic()

    def clear(self) -> None:
        with self.lock:
            self._reset(None)


_cache = _KeyCache()
runtime.keeps(runtime.KEYS, _cache.clear)


def _keys():
    return (VirtualKey.objects.select_related("person", "team", "team__cost_center")
            .prefetch_related("allowed_models", "team__allowed_models")  # read by the relay's model check
            .order_by())  # skip the default ORDER BY


def _load(digest: str) -> VirtualKey | None:
    return next(iter(_keys().filter(Q(key_hash=digest) | Q(previous_key_hash=digest))[:1]), None)  # one at most


def _load_many(digests: list[str]) -> dict[str, VirtualKey]:
    found = {}
    for start in range(0, len(digests), 2000):  # under SQLite's limit on query parameters
        chunk = digests[start:start + 2000]
        for key in _keys().filter(Q(key_hash__in=chunk) | Q(previous_key_hash__in=chunk)):
            found[key.key_hash] = key
            if key.previous_key_hash:
                found[key.previous_key_hash] = key
    return found


def key_by_secret(secret: str) -> VirtualKey | None:
    """The key for a presented secret, or None. A malformed secret (bad shape or checksum) costs no query,
    a known one usually none either (see _KeyCache). A secret rotated out still matches during its grace
    period. The returned key is shared with other threads: read it, never change it."""
    if not keyformat.is_well_formed(secret):
        return None
    digest = keyformat.hash_key(secret)
    stamp = stamps.current(stamps.KEYS)  # read before loading, so a change during the load is not missed
    _cache.refresh_if_due(stamp)
    key = _cache.get(digest, stamp)
    if key is None:
        key = _load(digest)
        if key is None:
            return None
        _cache.put(digest, stamp, key)
    # The lookup is by hash already; the constant-time compare guards against any future lookup by prefix.
    if keyformat.matches(secret, key.key_hash):
        return key
    in_grace = key.previous_key_expires_at is not None and key.previous_key_expires_at > timezone.now()
    if key.previous_key_hash and in_grace and keyformat.matches(secret, key.previous_key_hash):
        return key
    return None


_NO_ONE = object()  # an actor known not to be an active member, cached too (a misconfigured app retries a lot)


def actor_member(team, email: str):
    """The active member of `team` that a service key's signed actor names, or None. Kept in memory with the
    keys (the same stamp: memberships and people bump it; dropped at each refresh), so a service key's call
    needs no query either."""
    stamp = stamps.current(stamps.KEYS)
    entry = ("actor", team.pk, email.lower())
    person = _cache.get(entry, stamp)
    if person is None:
        from governance.models import Person

        person = Person.objects.filter(email__iexact=email, is_active=True, memberships__team=team).first() or _NO_ONE
        _cache.put(entry, stamp, person)
    return None if person is _NO_ONE else person


def keys_for_person(person):
    """The keys a person may see, with this month's spend from the ledger."""
    from ledger.models import LedgerEntry

    month_start = timezone.localtime().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spend = (
        LedgerEntry.objects.filter(key=OuterRef("pk"), created_at__gte=month_start)
        .values("key").annotate(total=Sum("cost")).values("total")
    )
    return (
        VirtualKey.objects.visible_to(person)
        .select_related("team", "person")
        .prefetch_related("allowed_models")
        .annotate(spend_this_month=Coalesce(Subquery(spend), Value(Decimal(0)), output_field=DecimalField()))
    )


def requests_awaiting(person):
    """Pending requests this person may decide (AccessRequest.objects.decidable_by)."""
    return (AccessRequest.objects.decidable_by(person).filter(status=AccessRequest.Status.PENDING)
            .select_related("requester", "team", "key"))


# --- What the key page and the getting-started page show ---------------------------------------------


@dataclass(frozen=True)
class ModelOffer:
    alias: "ModelAlias"
    price: "ModelPrice | None"  # the price in force now of its first deployment; None: not priced yet


def key_aliases(key: VirtualKey) -> list["ModelAlias"]:
    """The models a key may call: its own allowlist, else its team's, else every active model."""
    from gateway.models import ModelAlias

    own = [a for a in key.allowed_models.all() if a.is_active]
    if own:
        return sorted(own, key=lambda a: a.name)
    return list(key.team.allowed_models.filter(is_active=True)) or list(ModelAlias.objects.filter(is_active=True))


def models_with_prices(aliases) -> list[ModelOffer]:
    """Each model with the latest price in force of the deployment the relay tries first."""
    from gateway.models import ModelPrice

    now = timezone.now()
    offers = []
    for alias in aliases:
        price = (ModelPrice.objects.filter(provider_model__deployments__alias=alias, effective_from__lte=now)
                 .order_by("provider_model__deployments__priority", "-effective_from").first())
        offers.append(ModelOffer(alias, price))
    return offers


def snippet_models(aliases) -> tuple[str | None, str | None]:
    """The model a chat snippet should name and the one an embeddings snippet should: the relay refuses an
    embedding model on chat/completions and a chat model on embeddings. Standard tier before premium."""
    from gateway.models import ModelAlias

    def first(kind: str) -> str | None:
        fitting = sorted((a for a in aliases if a.kind == kind), key=lambda a: (a.tier != ModelAlias.Tier.STANDARD, a.name))
        return fitting[0].name if fitting else None

    return first(ModelAlias.Kind.CHAT), first(ModelAlias.Kind.EMBEDDING)


def keys_held_by(person) -> list[VirtualKey]:
    """The person's own keys that still work or may again (not revoked), newest first."""
    return list(VirtualKey.objects.filter(person=person).exclude(status=VirtualKey.Status.REVOKED)
                .select_related("team").prefetch_related("allowed_models", "team__allowed_models").order_by("-created_at"))


def aliases_for_person(person, keys: list[VirtualKey]) -> list["ModelAlias"]:
    """The models a person can call with their keys; with no key yet, the models their teams may use."""
    from gateway.models import ModelAlias
    from governance.models import Team

    found: dict[int, ModelAlias] = {}
    if keys:
        for key in keys:
            found.update((a.pk, a) for a in key_aliases(key))
        return sorted(found.values(), key=lambda a: a.name)
    for team in Team.objects.filter(memberships__person=person, is_active=True).prefetch_related("allowed_models"):
        allowed = [a for a in team.allowed_models.all() if a.is_active]
        if not allowed:  # a team without an allowlist may use every model
            return list(ModelAlias.objects.filter(is_active=True))
        found.update((a.pk, a) for a in allowed)
    return sorted(found.values(), key=lambda a: a.name)


@dataclass(frozen=True)
class BudgetLine:
    """One cap a key's calls count against this period: the key's own monthly budget or a grant covering it."""

    name: str
    limit: Decimal | None  # None: counted, not capped
    spent: Decimal
    held: Decimal  # held by calls in flight (their worst case), released or settled when they finish
    resets_on: date | None  # the first day of the next period; None for a total grant without a renewal date
    blocking: bool = True  # False: a production grant that lets calls through and pages its owner

    @property
    def left(self) -> Decimal | None:
        return None if self.limit is None else max(self.limit - self.spent - self.held, Decimal(0))

    @property
    def spent_percent(self) -> int:
        """Spent, as a percentage of the limit (at most 100, for drawing)."""
        return int(min(self.spent / self.limit * 100, 100)) if self.limit else 0

    @property
    def held_percent(self) -> int:
        """Held by calls in flight, as a percentage of the limit (what is left of 100 at most)."""
        return int(min(self.held / self.limit * 100, 100 - self.spent_percent)) if self.limit else 0


def _next_period(since: datetime, period: str, renews_at: date | None) -> date | None:
    from budgets.models import Grant

    day = timezone.localtime(since).date()
    if period == Grant.Period.DAILY:
        return day + timedelta(days=1)
    if period == Grant.Period.WEEKLY:
        return day + timedelta(days=7)
    if period == Grant.Period.TOTAL:
        return renews_at + timedelta(days=1) if renews_at else None
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


def key_budget_lines(key: VirtualKey) -> list[BudgetLine]:
    """Every spend cap the relay checks for this key's calls (the same meters: budgets.enforcement), with
    this period's spend and what calls in flight hold, as the counters in Redis have them. A counter not in
    Redis (no call yet this period, or Redis away) is read from the ledger, with nothing held."""
    from budgets.enforcement import NO_LIMIT, UNIT, covering_grants, meters_for
    from budgets.models import Grant
    from governance.redis import get_redis
    from ledger.selectors import spend_since

    grants = covering_grants(key=key, person=key.person, team=key.team, tags=key.default_tags or {})
    meters = [m for m in meters_for(grants, key) if m.unit == "cost"]
    client = get_redis()
    try:
        values = client.mget([name for m in meters for name in m.redis_keys()[:2]]) if client is not None and meters else []
    except Exception:  # the page still shows the ledger's figures when Redis is away
        values = []
    lines = []
    for at, meter in enumerate(meters):
        spent_units, held_units = (values[at * 2], values[at * 2 + 1]) if values else (None, None)
        if spent_units is not None:
            spent = int(spent_units) * UNIT
        elif meter.grant is not None:
            spent = spend_since(since=meter.since, grant_id=meter.grant.pk)
        else:
            spent = spend_since(since=meter.since, key_ids=[key.pk])
        held = max(int(held_units or 0), 0) * UNIT
        if meter.grant is None:
            lines.append(BudgetLine("This key's monthly budget", key.monthly_budget, spent, held,
                                    _next_period(meter.since, Grant.Period.MONTHLY, None)))
        else:
            grant = meter.grant
            lines.append(BudgetLine(
                f"{grant.name} ({grant.get_scope_display().lower()} grant, {grant.get_period_display().lower()})",
                grant.limit_amount, spent, held, _next_period(meter.since, grant.period, grant.renews_at),
                blocking=meter.limit != NO_LIMIT))
    return lines


def key_recent_calls(key: VirtualKey, *, limit: int = 50, days: int = 30):
    """The key's last calls (at most `limit`, of the last `days`: the ledger's recent partitions only)."""
    from ledger.models import LedgerEntry

    return (LedgerEntry.objects.filter(key=key, created_at__gte=timezone.now() - timedelta(days=days))
            .select_related("alias").order_by("-id")[:limit])


@dataclass(frozen=True)
class DayUsage:
    day: date
    cost: Decimal
    tokens: int
    calls: int


def key_usage_by_day(key: VirtualKey, *, days: int = 30) -> list[DayUsage]:
    """Spend, tokens and calls per local day over the last `days` days (every day, zero when idle), from the
    daily rollups plus the calls not folded into them yet."""
    from django.db.models import Count
    from django.db.models.functions import TruncDate

    from ledger.models import DailyRollup, LedgerEntry, RollupState

    today = timezone.localdate()
    first = today - timedelta(days=days - 1)
    totals = {first + timedelta(days=n): [Decimal(0), 0, 0] for n in range(days)}
    state = RollupState.objects.filter(pk=1).first()
    rollups = (DailyRollup.objects.filter(key=key, day__gte=first).order_by().values("day")
               .annotate(c=Sum("cost"), i=Sum("input_tokens"), o=Sum("output_tokens"), n=Sum("calls")))
    start = timezone.make_aware(datetime.combine(first, datetime.min.time()))
    tail = (LedgerEntry.objects.filter(key=key, pk__gt=state.last_entry_id if state else 0, created_at__gte=start)
            .annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone())).order_by().values("day")
            .annotate(c=Sum("cost"), i=Sum("input_tokens"), o=Sum("output_tokens"), n=Count("id")))
    for row in [*rollups, *tail]:
        if row["day"] in totals:
            total = totals[row["day"]]
            total[0] += row["c"] or 0
            total[1] += (row["i"] or 0) + (row["o"] or 0)
            total[2] += row["n"] or 0
    return [DayUsage(day, cost, tokens, calls) for day, (cost, tokens, calls) in sorted(totals.items())]


def key_approval(key: VirtualKey) -> AccessRequest | None:
    """The request the key was issued on, with who decided it and when (None: issued by IT or a command)."""
    return key.requests.filter(kind=AccessRequest.Kind.NEW_KEY).select_related("decided_by", "requester").first()


def key_history(key: VirtualKey, *, limit: int = 50):
    """The key's audit events and those of its requests (submitted, approved by whom, extensions, budget)."""
    from governance.models import AuditEvent

    request_ids = [str(pk) for pk in key.requests.values_list("pk", flat=True)]
    return (AuditEvent.objects.filter(Q(object_type="keys.virtualkey", object_id=str(key.pk))
                                      | Q(object_type="keys.accessrequest", object_id__in=request_ids))
            .order_by("-id")[:limit])
