"""Exact budget enforcement on the relay's path.

Before a call is forwarded, its worst-case cost (and tokens, for grants with a token limit) is held on
every grant that covers it (its key's, its person's, its project's, its team's, its department's, the
org's, and every ancestor of those) and on the key's own monthly cap, in ONE Redis Lua script: all meters
are checked, then all are held, so concurrent calls on any number of processes can never take recorded
spend past a cap. After the call the hold is settled to the actual cost in one more script.

Each hold also sits in a per-meter sorted set scored by its expiry; the reserve script first reclaims
expired holds, so a worker that crashed between reserve and settle leaves nothing blocked for longer than
TOLLGATE_HOLD_SECONDS. Counters are named by period start (in the organisation's time zone), so periods
roll over at the boundary without a reset job; a missing counter is rebuilt from the ledger, which stays
the source of truth (`budgets.services.grant_counters_verify` reports and repairs any drift).
"""
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from django.conf import settings
from django.db.models import Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from budgets.models import Grant
from governance import stamps
from governance.redis import ScriptPart, get_redis, run_parts

log = logging.getLogger(__name__)
UNIT = Decimal("0.00000001")  # the ledger's precision; Redis counts integers of it
NO_LIMIT = -1

_RESERVE = """
-- KEYS: 4 per meter (spent, held, hold expiries zset, hold amounts hash)
-- ARGV: now_ms, hold_expiry_ms, hold_id, ttl_s, then per meter (limit, amount); limit -1 = track only
local now, expiry, hold, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = #KEYS / 4
for i = 0, n - 1 do
  if redis.call('EXISTS', KEYS[i * 4 + 1]) == 0 then return {-1, i + 1} end
end
for i = 0, n - 1 do
  local held, zset, amounts = KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', now)) do
    redis.call('DECRBY', held, tonumber(redis.call('HGET', amounts, dead) or '0'))
    redis.call('HDEL', amounts, dead)
    redis.call('ZREM', zset, dead)
  end
end
local spent = {}
for i = 0, n - 1 do
  local limit, amount = tonumber(ARGV[5 + i * 2]), tonumber(ARGV[6 + i * 2])
  spent[i + 1] = tonumber(redis.call('GET', KEYS[i * 4 + 1]) or '0')
  local held = tonumber(redis.call('GET', KEYS[i * 4 + 2]) or '0')
  if limit >= 0 and spent[i + 1] + held + amount > limit then return {0, i + 1, spent[i + 1], held} end
end
for i = 0, n - 1 do
  local amount = ARGV[6 + i * 2]
  redis.call('INCRBY', KEYS[i * 4 + 2], amount)
  redis.call('ZADD', KEYS[i * 4 + 3], expiry, hold)
  redis.call('HSET', KEYS[i * 4 + 4], hold, amount)
  for k = 2, 4 do redis.call('EXPIRE', KEYS[i * 4 + k], ttl) end
end
return {1, spent}
"""

_SETTLE = """
-- KEYS: 4 per meter; ARGV: hold_id, ttl_s, then per meter the actual amount. Returns spent after.
local hold, ttl = ARGV[1], tonumber(ARGV[2])
local n = #KEYS / 4
local spent = {}
for i = 0, n - 1 do
  local amount = redis.call('HGET', KEYS[i * 4 + 4], hold)
  if amount then
    redis.call('DECRBY', KEYS[i * 4 + 2], amount)
    redis.call('HDEL', KEYS[i * 4 + 4], hold)
    redis.call('ZREM', KEYS[i * 4 + 3], hold)
  end
  spent[i + 1] = redis.call('INCRBY', KEYS[i * 4 + 1], ARGV[3 + i])
  redis.call('EXPIRE', KEYS[i * 4 + 1], ttl)
end
return spent
"""


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

    @property
    def base(self) -> str:
        return f"budget:{self.name}:{self.since:%Y%m%d}"

    def redis_keys(self) -> list[str]:
        return [f"{self.base}:spent", f"{self.base}:held", f"{self.base}:holds", f"{self.base}:amounts"]

    def ledger_total(self) -> int:
        """What the ledger says this meter has spent this period, in units."""
        from ledger.models import LedgerEntry

        entries = LedgerEntry.objects.filter(created_at__gte=self.since)
        entries = entries.filter(key_id=self.key_id) if self.key_id else entries.filter(grant_path__contains=f",{self.grant.pk},")
        if self.unit == "tokens":
            total = entries.aggregate(t=Coalesce(Sum("input_tokens"), 0) + Coalesce(Sum("output_tokens"), 0))["t"]
            return int(total or 0)
        return to_units(entries.aggregate(s=Sum("cost"))["s"] or Decimal(0))


class BudgetRefused(Exception):
    def __init__(self, code: str, message: str, *, grant: Grant | None = None):
        super().__init__(message)
        self.code, self.message, self.grant = code, message, grant


@dataclass
class Reservation:
    hold_id: str = ""
    meters: list[Meter] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)  # most specific first
    unverified: bool = False  # admitted without a check because Redis could not be reached
    over_cap: list[Grant] = field(default_factory=list)  # production allow-and-page grants now past their limit

    @property
    def grant_path(self) -> str:
        return "," + ",".join(str(g.pk) for g in self.grants) + "," if self.grants else ""


_SPECIFICITY = [Grant.Scope.KEY, Grant.Scope.PERSON, Grant.Scope.PROJECT, Grant.Scope.ENVIRONMENT, Grant.Scope.TEAM,
                Grant.Scope.DEPARTMENT, Grant.Scope.ORG]


@dataclass
class _GrantIndex:
    """Every grant, in this process's memory, with parents linked and model allowlists, so a call resolves
    its grants without a query. Reloaded whenever the grants stamp (governance.stamps, bumped after each
    grant write commits) differs from the one it was built at, and after TOLLGATE_MEMORY_CACHE_SECONDS in
    any case (in case a bump could not be published)."""

    version: object = None
    built_at: float = 0.0
    grants: list[Grant] = field(default_factory=list)
    allowlists: dict[int, set[int]] = field(default_factory=dict)


_index = _GrantIndex()
_index_lock = threading.Lock()


def invalidate_index() -> None:
    global _index
    _index = _GrantIndex()


def _grant_index() -> _GrantIndex:
    global _index
    version = stamps.current(stamps.GRANTS)

    def fresh() -> bool:
        return _index.version == version and time.monotonic() - _index.built_at < settings.TOLLGATE_MEMORY_CACHE_SECONDS

    if fresh():
        return _index
    with _index_lock:
        if not fresh():
            grants = {g.pk: g for g in Grant.objects.select_related("owner", "downgrade_to")}
            for grant in grants.values():
                if grant.parent_id in grants:
                    grant.parent = grants[grant.parent_id]
            allowlists: dict[int, set[int]] = {}
            for grant_id, alias_id in Grant.allowed_models.through.objects.values_list("grant_id", "modelalias_id"):
                allowlists.setdefault(grant_id, set()).add(alias_id)
            _index = _GrantIndex(version, time.monotonic(), list(grants.values()), allowlists)
    return _index


def _matches(grant: Grant, *, key, person, team, tags: dict) -> bool:
    same_team = grant.team_id is None or grant.team_id == team.pk
    return {
        Grant.Scope.ORG: True,
        Grant.Scope.DEPARTMENT: team.department_id is not None and grant.department_id == team.department_id,
        Grant.Scope.TEAM: grant.team_id == team.pk,
        Grant.Scope.KEY: grant.key_id == key.pk,
        Grant.Scope.PERSON: person is not None and grant.person_id == person.pk and same_team,
        Grant.Scope.PROJECT: bool(tags.get("project")) and grant.project == tags.get("project") and same_team,
        Grant.Scope.ENVIRONMENT: bool(tags.get("environment")) and grant.environment == tags.get("environment") and same_team,
    }[grant.scope]


def covering_grants(*, key, person, team, tags: dict) -> list[Grant]:
    """Every grant a call is charged to: those whose scope matches the call, then all their ancestors.
    Most specific first."""
    index = _grant_index()
    direct = [g for g in index.grants if _matches(g, key=key, person=person, team=team, tags=tags)]
    seen, ordered = set(), []
    for grant in sorted(direct, key=lambda g: _SPECIFICITY.index(g.scope)):
        for node in [grant, *grant.ancestors()]:
            if node.pk not in seen:
                seen.add(node.pk)
                ordered.append(node)
    return ordered


def check_grants(grants: list[Grant], alias) -> None:
    """Expired or suspended grants refuse the call; so does a grant whose model allowlist excludes it."""
    today = timezone.localdate()
    for grant in grants:
        if grant.status == Grant.Status.EXPIRED or (grant.renews_at is not None and grant.renews_at < today):
            raise BudgetRefused("grant_expired", f"grant '{grant.name}' (owner {grant.owner}) expired on "
                                f"{grant.renews_at or 'its renewal date'} and was not renewed", grant=grant)
        if grant.status == Grant.Status.SUSPENDED:
            raise BudgetRefused("grant_suspended", f"grant '{grant.name}' (owner {grant.owner}) is suspended", grant=grant)
    allowlists = _grant_index().allowlists
    for grant in grants:
        if grant.pk in allowlists and alias.pk not in allowlists[grant.pk]:
            raise BudgetRefused("model_not_allowed", f"grant '{grant.name}' does not cover the model '{alias.name}'", grant=grant)


def meters_for(grants: list[Grant], key=None) -> list[Meter]:
    meters = []
    for grant in grants:
        since = period_start(grant.period, term_start=grant.term_start)
        blocks = grant.grant_class == Grant.GrantClass.EXPERIMENTATION or grant.on_cap != Grant.OnCap.ALLOW_AND_PAGE
        meters.append(Meter(f"grant:{grant.pk}:cost", since, to_units(grant.limit_amount) if blocks else NO_LIMIT, grant=grant))
        if grant.limit_tokens is not None:
            meters.append(Meter(f"grant:{grant.pk}:tokens", since, grant.limit_tokens if blocks else NO_LIMIT,
                                grant=grant, unit="tokens"))
    if key is not None and key.monthly_budget is not None:
        meters.append(Meter(f"key:{key.pk}:cost", period_start(Grant.Period.MONTHLY), to_units(key.monthly_budget), key_id=key.pk))
    return meters


def _ttl(meter: Meter) -> int:
    return 400 * 86400 if meter.grant is not None and meter.grant.period == Grant.Period.TOTAL else 40 * 86400


def reserve(*, grants: list[Grant], key, cost: Decimal, tokens: int) -> Reservation:
    """Hold the call's worst case on every meter at once, or raise BudgetRefused naming the grant at its cap."""
    plan = reserve_plan(grants=grants, key=key, cost=cost, tokens=tokens)
    if not plan.reservation.meters:
        return plan.reservation
    client = get_redis()
    try:
        if client is None:
            raise ConnectionError("REDIS_URL is not set")
        result = _run_reserve(client, plan)
    except Exception as exc:  # Redis down or unreachable: each grant says whether to admit or refuse
        return _unverified(plan, key, exc)
    return reservation_from(plan, result)


@dataclass
class ReservePlan:
    """A reservation not yet made: its meters and the amount to hold on each."""

    reservation: Reservation
    amounts: list[int]
    key: object = None

    def part(self) -> ScriptPart:
        """The reserve script for this plan, to run alone or after other parts in one round trip."""
        meters = self.reservation.meters
        now_ms = int(time.time() * 1000)
        expiry_ms = now_ms + settings.TOLLGATE_HOLD_SECONDS * 1000
        args = [now_ms, expiry_ms, self.reservation.hold_id, max(_ttl(m) for m in meters)]
        for meter, amount in zip(meters, self.amounts):
            args += [meter.limit, amount]
        return ScriptPart(_RESERVE, [k for m in meters for k in m.redis_keys()], args)


def reserve_plan(*, grants: list[Grant], key, cost: Decimal, tokens: int) -> ReservePlan:
    meters = meters_for(grants, key)
    amounts = [tokens if m.unit == "tokens" else to_units(cost) for m in meters]
    return ReservePlan(Reservation(hold_id=uuid.uuid4().hex, meters=meters, grants=grants), amounts, key)


def reservation_from(plan: ReservePlan, result: list) -> Reservation:
    """The reserve script's answer: the reservation, or BudgetRefused. A result saying a counter is missing
    is not an answer: the caller runs `reserve`, which rebuilds it from the ledger."""
    if result[0] == -1:
        raise CounterMissing()
    reservation, meters = plan.reservation, plan.reservation.meters
    if result[0] == 0:
        meter = meters[result[1] - 1]
        raise _refusal(meter, spent=int(result[2]), held=int(result[3]), amount=plan.amounts[result[1] - 1])
    for meter, spent, amount in zip(meters, result[1], plan.amounts):
        if meter.limit == NO_LIMIT and meter.unit == "cost" and int(spent) + amount > to_units(meter.grant.limit_amount):
            reservation.over_cap.append(meter.grant)
    return reservation


class CounterMissing(Exception):
    """A meter's counter does not exist yet in Redis (new period, or Redis lost its data)."""


def _unverified(plan: ReservePlan, key, exc: Exception) -> Reservation:
    grants, reservation = plan.reservation.grants, plan.reservation
    closed = [g for g in grants if not g.fails_open] + ([] if not key.monthly_budget else [None])
    if closed:
        who = f"grant '{closed[0].name}'" if closed[0] else f"key {key.prefix}'s monthly budget"
        raise BudgetRefused("budget_unverifiable", f"{who} cannot be checked right now ({type(exc).__name__})",
                            grant=closed[0]) from None
    log.error("budget counters unreachable (%s): admitting a call on production grants unchecked", type(exc).__name__)
    reservation.unverified = True
    return reservation


def _run_reserve(client, plan: ReservePlan) -> list:
    meters = plan.reservation.meters
    for _ in range(len(meters) + 1):
        result = run_parts(client, [plan.part()])[0]
        if result[0] != -1:
            return result
        # A counter is missing (new period, or Redis lost its data): rebuild it from the ledger, then retry.
        meter = meters[result[1] - 1]
        client.set(meter.redis_keys()[0], meter.ledger_total(), nx=True, ex=_ttl(meter))
    raise RuntimeError("budget counters could not be initialised")


def _refusal(meter: Meter, *, spent: int, held: int, amount: int) -> BudgetRefused:
    if meter.grant is None:
        return BudgetRefused("budget_exceeded", f"the key's monthly budget would be exceeded "
                             f"({(spent + held) * UNIT:.2f} of {meter.limit * UNIT:.2f} spent or held)")
    grant = meter.grant
    if meter.unit == "tokens":
        used = f"{spent + held} of {meter.limit} tokens spent or held"
    else:
        used = f"{(spent + held) * UNIT:.2f} of {grant.limit_amount} {settings.TOLLGATE_CURRENCY} spent or held"
    return BudgetRefused("budget_exceeded", f"grant '{grant.name}' (owner {grant.owner}) would be exceeded: {used}; "
                         f"this call may cost up to {amount * UNIT:.4f}", grant=grant)


@dataclass(frozen=True)
class Settled:
    grant: Grant
    since: datetime
    before: Decimal
    after: Decimal


def settle(reservation: Reservation, *, cost: Decimal, tokens: int) -> list[Settled]:
    """Release the hold and count what the call really cost. Returns each grant's spend before and after,
    for threshold alerts."""
    part = settle_part(reservation, cost=cost, tokens=tokens)
    if part is None:
        return []
    try:
        result = run_parts(get_redis(), [part])[0]
    except Exception:  # the ledger row is the truth: the counter is rebuilt from it by the drift check
        log.exception("could not settle budget hold %s", reservation.hold_id)
        return []
    return settled_from(part, reservation, result)


def settle_part(reservation: Reservation, *, cost: Decimal, tokens: int) -> ScriptPart | None:
    """The settle script for this reservation, to run alone (`settle`) or with others in one round trip;
    None when there is nothing to settle in Redis."""
    if not reservation.meters or reservation.unverified:
        return None
    meters = reservation.meters
    amounts = [tokens if m.unit == "tokens" else to_units(cost) for m in meters]
    return ScriptPart(_SETTLE, [k for m in meters for k in m.redis_keys()],
                      [reservation.hold_id, max(_ttl(m) for m in meters), *amounts])


def settled_from(part: ScriptPart, reservation: Reservation, spent: list) -> list[Settled]:
    """The settle script's answer: each grant's spend before and after the call."""
    amounts = part.args[2:]
    return [
        Settled(m.grant, m.since, (int(after) - amount) * UNIT, int(after) * UNIT)
        for m, after, amount in zip(reservation.meters, spent, amounts)
        if m.grant is not None and m.unit == "cost"
    ]


def release(reservation: Reservation) -> None:
    """The call never reached a provider: drop the hold, charge nothing."""
    settle(reservation, cost=Decimal(0), tokens=0)


def spent_now(grant: Grant) -> Decimal:
    """This period's spend of a grant, from its counter (or the ledger when there is none yet)."""
    meter = Meter(f"grant:{grant.pk}:cost", period_start(grant.period, term_start=grant.term_start), NO_LIMIT, grant=grant)
    client = get_redis()
    try:
        value = client.get(meter.redis_keys()[0]) if client is not None else None
    except Exception:
        value = None
    return (int(value) if value is not None else meter.ledger_total()) * UNIT
