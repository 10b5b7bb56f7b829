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

When Redis loses its data (a restart without persistence, a failover to an empty replica) the counters
and the holds of calls in flight go with it. These rules keep the caps exact through that:
- settle never creates a spent counter: on a missing one it notes the call's amount in the meter's "late"
  hash instead, and the counter is rebuilt from the ledger (`rebuild`) plus the late amounts its ledger
  read does not include. A call settles after its ledger row is committed, and its hold carries the row's
  identity (request_id, created_at), so the rebuild knows which calls in flight or just settled its read
  already counts, and no call is counted twice or not at all;
- every process keeps its own open reservations in memory (`_open`) and puts their holds back
  (idempotently) when it sees the data was lost: the `budget:epoch` key vanished or changed, or a counter
  it needed was missing;
- a new epoch comes with a short fence (EPOCH_FENCE_SECONDS) during which the reserve script admits
  nothing, so every process's watcher thread (`_watch_epoch`, polling every REREGISTER_EVERY_SECONDS while
  the process has holds open) has put its holds back before the first call is admitted against a rebuilt
  counter. Redis must not evict keys (maxmemory-policy noeviction) for these rules to be the only case.
The normal case stays one round trip each for reserve and settle; only the recovery costs more.
"""
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from budgets.models import Grant
from governance import stamps
from governance.redis import ScriptPart, get_redis, run_parts

log = logging.getLogger(__name__)
UNIT = Decimal("0.00000001")  # the ledger's precision; Redis counts integers of it
NO_LIMIT = -1
RESERVED, REFUSED, MISSING, FENCED = 1, 0, -1, -2  # the reserve script's answers
EPOCH_KEY, FENCE_KEY = "budget:epoch", "budget:epoch:fence"
# A process polls the epoch this often while it has holds open; the fence must outlast a poll with room
# to spare for a busy event loop, so it is three polls long. Every reserve after a data loss waits it out.
REREGISTER_EVERY_SECONDS = 0.2
EPOCH_FENCE_SECONDS = 0.6
REBUILD_LOCK_SECONDS = 10  # one process reads the ledger for a meter at a time; others wait for its counter

_RESERVE = """
-- KEYS: 4 per meter (spent, held, hold expiries zset, hold amounts hash), then the epoch and its fence
-- ARGV: now_ms, hold_expiry_ms, hold_id, ttl_s, then per meter (limit, amount); limit -1 = track only
-- Returns {1, spent per meter}, {0, meter, spent, held} (refused), {-1, meter} (a counter is missing), or
-- {-2} (Redis lost its data, or just did: the processes' holds are being put back; admit nothing yet).
local now, expiry, hold, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = (#KEYS - 2) / 4
if redis.call('EXISTS', KEYS[#KEYS - 1]) == 0 or redis.call('EXISTS', KEYS[#KEYS]) == 1 then return {-2} end
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
-- KEYS: 6 per meter (spent, held, hold expiries, hold amounts, late amounts, holds already counted)
-- ARGV: hold_id, ttl_s, row_committed (1 or 0), then per meter the actual amount.
-- Returns {spent after per meter, 1 per meter whose counter is missing}. A missing counter stays missing:
-- counting this call from 0 would hide all the spend before it. The amount is noted as late instead, for
-- the rebuild from the ledger to add unless the ledger read already had the call's row. A hold the last
-- rebuild found in the ledger is released without being counted again.
local hold, ttl, committed = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = #KEYS / 6
local spent, missing = {}, {}
for i = 0, n - 1 do
  local at = i * 6
  local amount = redis.call('HGET', KEYS[at + 4], hold)
  if amount then
    redis.call('DECRBY', KEYS[at + 2], amount)
    redis.call('HDEL', KEYS[at + 4], hold)
    redis.call('ZREM', KEYS[at + 3], hold)
  end
  if redis.call('EXISTS', KEYS[at + 1]) == 0 then
    redis.call('HSET', KEYS[at + 5], hold, committed .. ':' .. ARGV[4 + i])
    redis.call('EXPIRE', KEYS[at + 5], ttl)
    spent[i + 1] = 0
    missing[i + 1] = 1
  else
    if redis.call('SREM', KEYS[at + 6], hold) == 1 then
      spent[i + 1] = tonumber(redis.call('GET', KEYS[at + 1]))
    else
      spent[i + 1] = redis.call('INCRBY', KEYS[at + 1], ARGV[4 + i])
      redis.call('EXPIRE', KEYS[at + 1], ttl)
    end
    missing[i + 1] = 0
  end
end
return {spent, missing}
"""

_BEFORE_READ = """
-- KEYS: spent, late, hold amounts. The counter if it exists now, else the late and the open holds.
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, redis.call('GET', KEYS[1])} end
return {0, redis.call('HKEYS', KEYS[2]), redis.call('HKEYS', KEYS[3])}
"""

_REBUILD = """
-- KEYS: spent, late, hold amounts, holds counted
-- ARGV: ledger total, ttl_s, last attempt (1 or 0), then three lists, each its length first: the late
-- holds and the open holds seen before the ledger was read, and the holds whose rows the read had.
-- A hold that carries its call's identity (hold_id "<uuid>|<request id>|<created at>") was looked up in the
-- same read: its late amount is added unless the read had its row, and an open one the read had is marked
-- counted, so its settle does not count it again. Without the identity only order tells: a late amount
-- noted before the read, of a row committed before it settled, is in the read; one noted since may not be.
-- Whatever appeared since the lookup is unknown: unless this is the last attempt, the caller reads again
-- ({0}); on the last it is counted (too much, never too little).
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, redis.call('GET', KEYS[1])} end
local lists, at = {}, 4
for l = 1, 3 do
  lists[l] = {}
  local n = tonumber(ARGV[at])
  for i = at + 1, at + n do lists[l][ARGV[i]] = true end
  at = at + n + 1
end
local late_before, open_before, found = lists[1], lists[2], lists[3]
local last = ARGV[3] == '1'
local add, counted = {}, {}
local late = redis.call('HGETALL', KEYS[2])
for j = 1, #late, 2 do
  local hold = late[j]
  local committed, amount = string.match(late[j + 1], '^(%d):(.*)$')
  if found[hold] then
    -- in the read
  elseif string.find(hold, '|', 1, true) then
    if late_before[hold] or open_before[hold] or last then add[#add + 1] = amount else return {0} end
  elseif committed == '1' and late_before[hold] then
    -- in the read: its row was committed before it settled, before the read
  elseif committed == '1' and not last then
    return {0}
  else
    add[#add + 1] = amount
  end
end
for _, hold in ipairs(redis.call('HKEYS', KEYS[3])) do
  if found[hold] then
    counted[#counted + 1] = hold
  elseif string.find(hold, '|', 1, true) and not open_before[hold] and not last then
    return {0}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
for _, amount in ipairs(add) do redis.call('INCRBY', KEYS[1], amount) end
redis.call('DEL', KEYS[2])
if #counted > 0 then
  redis.call('SADD', KEYS[4], unpack(counted))
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return {1, redis.call('GET', KEYS[1])}
"""

_ENSURE_EPOCH = """
-- KEYS: epoch, fence; ARGV: a new epoch id, fence_ms. Returns {epoch, fence ms left}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[2])}
"""

_REREGISTER = """
-- KEYS: 4 per meter of each hold, hold after hold
-- ARGV: now_ms, then per hold: hold_id, expiry_ms, ttl_s, its meter count, then that many amounts.
-- A hold already there is left alone (HSETNX), so running this twice, or for a hold Redis kept, is harmless.
local now = tonumber(ARGV[1])
local a, k, added = 2, 0, 0
while a <= #ARGV do
  local hold, expiry, ttl, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  for i = 0, n - 1 do
    local amount, at = ARGV[a + 4 + i], k + i * 4
    if tonumber(expiry) > now and redis.call('HSETNX', KEYS[at + 4], hold, amount) == 1 then
      redis.call('INCRBY', KEYS[at + 2], amount)
      redis.call('ZADD', KEYS[at + 3], expiry, hold)
      for j = 2, 4 do redis.call('EXPIRE', KEYS[at + j], ttl) end
      added = added + 1
    end
  end
  a, k = a + 4 + n, k + n * 4
end
return added
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
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
    amounts: list[int] = field(default_factory=list)  # held on each meter, in its unit
    expires_ms: int = 0  # when the hold lapses if never settled (epoch ms)

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


def reserve(*, grants: list[Grant], key, cost: Decimal, tokens: int, call: tuple[str, datetime] | None = None) -> Reservation:
    """Hold the call's worst case on every meter at once, or raise BudgetRefused naming the grant at its cap.
    `call` is the identity of the call's ledger row (request_id, created_at): see `reserve_plan`."""
    return hold(reserve_plan(grants=grants, key=key, cost=cost, tokens=tokens, call=call))


def hold(plan: "ReservePlan") -> Reservation:
    """Make a planned hold on its own: the path of a hold whose counter must first be rebuilt from the ledger,
    and of a second try on a cheaper model. The relay's normal case runs `plan.part()` in its admission
    script instead (gateway.admission). Redis unreachable: each grant decides (`unverified`). A ledger that
    cannot be read for a rebuild (no database connection in time) raises DatabaseError: the call is refused
    as overloaded, not as unverifiable."""
    if not plan.reservation.meters:
        return plan.reservation
    client = get_redis()
    try:
        if client is None:
            raise ConnectionError("REDIS_URL is not set")
        result = _run_reserve(client, plan)
    except DatabaseError:
        raise
    except Exception as exc:  # Redis down or unreachable: each grant says whether to admit or refuse
        return unverified(plan, exc)
    return reservation_from(plan, result)


@dataclass
class ReservePlan:
    """A reservation not yet made: its meters and the amount to hold on each."""

    reservation: Reservation
    amounts: list[int]
    key: object = None

    def part(self) -> ScriptPart:
        """The reserve script for this plan, to run alone or after other parts in one round trip."""
        reservation = self.reservation
        now_ms = int(time.time() * 1000)
        reservation.expires_ms = now_ms + settings.TOLLGATE_HOLD_SECONDS * 1000
        args = [now_ms, reservation.expires_ms, reservation.hold_id, max(_ttl(m) for m in reservation.meters)]
        for meter, amount in zip(reservation.meters, self.amounts):
            args += [meter.limit, amount]
        keys = [k for m in reservation.meters for k in m.redis_keys()]
        return ScriptPart(_RESERVE, [*keys, EPOCH_KEY, FENCE_KEY], args)


def reserve_plan(*, grants: list[Grant], key, cost: Decimal, tokens: int,
                 call: tuple[str, datetime] | None = None) -> ReservePlan:
    """The hold to make. Give `call`, the identity of the call's ledger row (its request_id and created_at,
    unique together): the hold carries it, so a counter rebuilt from the ledger while the call is in flight
    knows whether it already counts the call's row, and never counts it twice."""
    meters = meters_for(grants, key)
    amounts = [tokens if m.unit == "tokens" else to_units(cost) for m in meters]
    hold_id = uuid.uuid4().hex + (f"|{call[0]}|{call[1].isoformat()}" if call else "")
    return ReservePlan(Reservation(hold_id=hold_id, meters=meters, grants=grants, amounts=amounts), amounts, key)


def call_of(hold_id: str) -> tuple[str, datetime] | None:
    """The (request_id, created_at) of the ledger row of the call a hold is for, when the hold carries it."""
    _, sep, rest = hold_id.partition("|")
    if not sep:
        return None
    request_id, _, created_at = rest.rpartition("|")
    return request_id, datetime.fromisoformat(created_at)


def reservation_from(plan: ReservePlan, result: list) -> Reservation:
    """The reserve script's answer: the reservation, or BudgetRefused. A result saying a counter is missing
    (or that Redis lost its data) is not an answer: the caller runs `reserve`, which rebuilds the counter
    from the ledger once the holds are back."""
    if result[0] in (MISSING, FENCED):
        raise CounterMissing()
    reservation, meters = plan.reservation, plan.reservation.meters
    if result[0] == REFUSED:
        meter = meters[result[1] - 1]
        raise _refusal(meter, spent=int(result[2]), held=int(result[3]), amount=plan.amounts[result[1] - 1])
    _hold_opened(reservation)
    for meter, spent, amount in zip(meters, result[1], plan.amounts):
        if meter.limit == NO_LIMIT and meter.unit == "cost" and int(spent) + amount > to_units(meter.grant.limit_amount):
            reservation.over_cap.append(meter.grant)
    return reservation


class CounterMissing(Exception):
    """A meter's counter does not exist yet in Redis (new period, or Redis lost its data)."""


def unverified(plan: ReservePlan, exc: Exception) -> Reservation:
    """Redis cannot be reached: a grant that fails closed (experimentation, or a key's own cap) refuses the
    call; production grants admit it unchecked (the caller pages IT)."""
    grants, reservation, key = plan.reservation.grants, plan.reservation, plan.key
    closed = [g for g in grants if not g.fails_open] + ([] if not key.monthly_budget else [None])
    if closed:
        who = f"grant '{closed[0].name}'" if closed[0] else f"key {key.prefix}'s monthly budget"
        raise BudgetRefused("budget_unverifiable", f"{who} cannot be checked right now ({type(exc).__name__})",
                            grant=closed[0]) from None
    log.error("budget counters unreachable (%s): admitting a call on production grants unchecked", type(exc).__name__)
    reservation.unverified = True
    return reservation


def _run_reserve(client, plan: ReservePlan) -> list:
    """The normal case is one round trip. After a data loss: wait out the epoch's fence (this process's
    holds are put back meanwhile, every other process's by its watcher), then rebuild each missing counter
    from the ledger, then hold."""
    meters = plan.reservation.meters
    for _ in range(len(meters) + 3):
        result = run_parts(client, [plan.part()])[0]
        if result[0] == FENCED:
            _, fence_ms = recover_holds(client)
            if fence_ms > 0:
                time.sleep(fence_ms / 1000)
        elif result[0] == MISSING:  # a new period, or Redis lost its data
            recover_holds(client, force=True)
            if rebuild(client, meters[result[1] - 1], wait=True) is None:
                raise RuntimeError(f"budget counter {meters[result[1] - 1].base} is still being rebuilt")
        else:
            return result
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


def settle(reservation: Reservation, *, cost: Decimal, tokens: int, row_committed: bool = False) -> list[Settled]:
    """Release the hold and count what the call really cost. Returns each grant's spend before and after,
    for threshold alerts. See `settle_part` for `row_committed`."""
    part = settle_part(reservation, cost=cost, tokens=tokens, row_committed=row_committed)
    if part is None:
        return []
    try:
        result = run_parts(get_redis(), [part])[0]
    except Exception:  # the ledger row is the truth: the counter is rebuilt from it by the drift check
        log.exception("could not settle budget hold %s", reservation.hold_id)
        return []
    return settled_from(part, reservation, result)


def settle_part(reservation: Reservation, *, cost: Decimal, tokens: int, row_committed: bool = False) -> ScriptPart | None:
    """The settle script for this reservation, to run alone (`settle`) or with others in one round trip;
    None when there is nothing to settle in Redis.

    Settle after the call's ledger row is committed, and say so with `row_committed=True`: if the counter
    turns out to be missing (Redis lost its data), its rebuild from the ledger then already includes this
    call's row, and the call's cost is not added again. With `row_committed=False` (the row is not known to
    be in the database yet) the cost is added to the rebuilt counter, which may count it twice until the
    drift check, never zero times. A hold is closed here, before the script runs, so this process never
    puts it back after the script released it."""
    if not reservation.meters or reservation.unverified:
        return None
    _hold_closed(reservation)
    meters = reservation.meters
    amounts = [tokens if m.unit == "tokens" else to_units(cost) for m in meters]
    return ScriptPart(_SETTLE, [k for m in meters for k in (*m.redis_keys(), m.late_key, m.counted_key)],
                      [reservation.hold_id, max(_ttl(m) for m in meters), int(row_committed), *amounts])


def settled_from(part: ScriptPart, reservation: Reservation, result: list) -> list[Settled]:
    """The settle script's answer: each grant's spend before and after the call. A counter the script
    found missing is rebuilt here (the call's amount was noted as late), and this process's holds are put
    back; if that fails, the grant's alerts wait for the next call."""
    spent, missing = list(result[0]), result[1]
    amounts = part.args[3:]
    if any(int(flag) for flag in missing):
        spent = _rebuild_after_settle(reservation.meters, spent, missing)
    return [
        Settled(m.grant, m.since, (int(after) - amount) * UNIT, int(after) * UNIT)
        for m, after, amount in zip(reservation.meters, spent, amounts)
        if m.grant is not None and m.unit == "cost" and after is not None
    ]


def _rebuild_after_settle(meters: list[Meter], spent: list, missing: list) -> list:
    try:
        client = get_redis()
        recover_holds(client, force=True)
        return [rebuild(client, meter, wait=False) if int(flag) else value
                for meter, value, flag in zip(meters, spent, missing)]
    except Exception:  # the counter is rebuilt by the next call's reserve; this call is already answered
        log.exception("could not rebuild budget counters after settling")
        return [None if int(flag) else value for value, flag in zip(spent, missing)]


def release(reservation: Reservation) -> None:
    """The call never reached a provider: drop the hold, charge nothing."""
    settle(reservation, cost=Decimal(0), tokens=0)


def rebuild(client, meter: Meter, *, wait: bool) -> int | None:
    """Create a missing counter from the ledger plus the amounts settled while it was missing; returns the
    counter (None when another process is rebuilding it and `wait` is false, or it took too long).

    The ledger read may or may not have the rows of calls that settled meanwhile, or that are committed and
    about to settle. Holds carrying their call's identity (`reserve_plan`) are looked up in the same read,
    so each is counted exactly once: by the read, or by its own amount. For the others the order of events
    in Redis decides, and what it cannot decide is counted (too much, repaired by the drift check, rather
    than too little); anything that appeared during the read is read again first, up to three times. Only
    one process reads the ledger for a meter at a time (a short Redis lock); the others wait for its counter."""
    spent_key, lock_key = meter.redis_keys()[0], f"{meter.base}:rebuild"
    keys = [spent_key, meter.late_key, meter.redis_keys()[3], meter.counted_key]
    token = uuid.uuid4().hex
    deadline = time.monotonic() + REBUILD_LOCK_SECONDS
    while not client.set(lock_key, token, nx=True, ex=REBUILD_LOCK_SECONDS):
        value = client.get(spent_key)
        if value is not None:
            return int(value)
        if not wait or time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    try:
        for attempt in range(3):
            seen = run_parts(client, [ScriptPart(_BEFORE_READ, keys[:3], [])])[0]
            if seen[0]:
                return int(seen[1])
            late, open_ = [h.decode() for h in seen[1]], [h.decode() for h in seen[2]]
            total, found = meter.ledger_read(late + open_)
            args = [total, _ttl(meter), int(attempt == 2)]
            for holds in (late, open_, found):
                args += [len(holds), *holds]
            done, *value = run_parts(client, [ScriptPart(_REBUILD, keys, args)])[0]
            if done:
                return int(value[0])
        raise AssertionError("the last rebuild attempt always sets the counter")
    finally:
        run_parts(client, [ScriptPart(_UNLOCK, [lock_key], [token])])


# --- This process's open holds, put back after Redis lost its data ---------------------------------------
# Only the process that made a hold knows it once Redis forgot it. The registry is small (the calls in
# flight here) and guarded by one lock, which re-registration holds while its script runs: a settle removes
# its hold from the registry (under the lock) before its own script runs, so a hold is never put back after
# it was settled.

_open: dict[str, Reservation] = {}
_open_lock = threading.Lock()
_holds_open = threading.Event()  # set while _open is not empty: the watcher sleeps otherwise
_epoch_seen: bytes | None = None
_watcher_pid: int | None = None


def _hold_opened(reservation: Reservation) -> None:
    with _open_lock:
        _open[reservation.hold_id] = reservation
        if not _holds_open.is_set():
            _holds_open.set()
    if _watcher_pid != os.getpid():
        _start_watcher()


def _hold_closed(reservation: Reservation) -> None:
    with _open_lock:
        _open.pop(reservation.hold_id, None)


def open_reservations() -> list[Reservation]:
    """This process's holds not yet settled or released (and not yet lapsed)."""
    with _open_lock:
        return list(_open.values())


def recover_holds(client, *, force: bool = False) -> tuple[bytes, int]:
    """Make sure the epoch exists (a new one starts a fence) and, when it is not the one this process last
    saw (or `force`), put this process's open holds back. Returns the epoch and the fence's ms left."""
    global _epoch_seen
    epoch, fence_ms = run_parts(client, [ScriptPart(_ENSURE_EPOCH, [EPOCH_KEY, FENCE_KEY],
                                                    [uuid.uuid4().hex, int(EPOCH_FENCE_SECONDS * 1000)])])[0]
    if force or epoch != _epoch_seen:
        put_back = _reregister(client)
        if put_back:
            log.warning("budget holds were lost by Redis: %d put back from this process", put_back)
        _epoch_seen = epoch
    return epoch, int(fence_ms)


def _forget_lapsed(now_ms: int) -> None:
    """Holds past their expiry (a call that never settled): Redis reclaims them anyway. Under _open_lock."""
    for hold_id in [h for h, r in _open.items() if r.expires_ms <= now_ms]:
        del _open[hold_id]


def _reregister(client) -> int:
    now_ms = int(time.time() * 1000)
    with _open_lock:
        _forget_lapsed(now_ms)
        if not _open:
            return 0
        keys, args = [], [now_ms]
        for reservation in _open.values():
            keys += [k for m in reservation.meters for k in m.redis_keys()]
            args += [reservation.hold_id, reservation.expires_ms, max(_ttl(m) for m in reservation.meters),
                     len(reservation.meters), *reservation.amounts]
        return run_parts(client, [ScriptPart(_REREGISTER, keys, args)])[0]


def _start_watcher() -> None:
    global _watcher_pid
    with _open_lock:
        if _watcher_pid == os.getpid():
            return
        _watcher_pid = os.getpid()  # after a fork, the child starts its own
    threading.Thread(target=_watch_epoch, name="budget-holds", daemon=True).start()


def _watch_epoch() -> None:
    """A process whose calls are streaming sends Redis nothing until they end; this thread notices a data
    loss meanwhile (one GET per poll, only while the process has holds open) and puts the holds back within
    the epoch's fence, so no other process admits calls against counters that do not count them."""
    failing = False
    while True:
        _holds_open.wait()
        time.sleep(REREGISTER_EVERY_SECONDS)
        with _open_lock:
            _forget_lapsed(int(time.time() * 1000))
            if not _open:
                _holds_open.clear()
                continue
        try:
            client = get_redis()
            if client is not None and client.get(EPOCH_KEY) != _epoch_seen:
                recover_holds(client)
            failing = False
        except Exception as exc:  # Redis down: try again next poll, say so once
            if not failing:
                log.warning("budget holds watcher cannot reach Redis (%s)", type(exc).__name__)
            failing = True


def spent_now(grant: Grant) -> Decimal:
    """This period's spend of a grant, from its counter (or the ledger when there is none yet)."""
    meter = Meter(f"grant:{grant.pk}:cost", period_start(grant.period, term_start=grant.term_start), NO_LIMIT, grant=grant)
    client = get_redis()
    try:
        value = client.get(meter.redis_keys()[0]) if client is not None else None
    except Exception:
        value = None
    return (int(value) if value is not None else meter.ledger_total()) * UNIT
