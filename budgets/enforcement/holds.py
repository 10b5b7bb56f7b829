"""Holds: the worst case held on every meter before a call is forwarded, settled to the actual cost after,
in one Redis script each (see budgets.enforcement)."""
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import DatabaseError

from budgets.enforcement.grants import BudgetRefused
from budgets.enforcement.meters import NO_LIMIT, UNIT, Meter, _ttl, meters_for, period_start, to_units
from budgets.enforcement.recovery import (
    EPOCH_FENCE_SECONDS,
    EPOCH_KEY,
    FENCE_KEY,
    _hold_closed,
    _hold_opened,
    rebuild,
    recover_holds,
)
from budgets.models import Grant
from governance.redis import ScriptPart, get_redis, run_parts

log = logging.getLogger(__name__)
RESERVED, REFUSED, MISSING, FENCED = 1, 0, -1, -2  # the reserve script's answers

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
        log.warning("budget counters cannot be used: %s: %s", type(exc).__name__, exc)
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
    rebuilds = 0
    fenced_until = time.monotonic() + EPOCH_FENCE_SECONDS + 1
    while True:
        result = run_parts(client, [plan.part()])[0]
        if result[0] == FENCED:
            # Waiting out the fence is not a failed attempt: its end is rounded to the millisecond, so the
            # first retry may find a millisecond left (a flake seen in tests, which start each on an empty Redis).
            _, fence_ms = recover_holds(client)
            if time.monotonic() > fenced_until:
                raise RuntimeError("budget counters are still fenced after a data loss")
            time.sleep(max(fence_ms, 2) / 1000)
        elif result[0] == MISSING:  # a new period, or Redis lost its data
            rebuilds += 1
            if rebuilds > len(meters) + 3:
                raise RuntimeError("budget counters could not be initialised")
            recover_holds(client, force=True)
            if rebuild(client, meters[result[1] - 1], wait=True) is None:
                raise RuntimeError(f"budget counter {meters[result[1] - 1].base} is still being rebuilt")
        else:
            return result


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


def held_now(grant: Grant) -> Decimal:
    """What calls in flight hold against a grant this period (settled into spend when they finish)."""
    meter = Meter(f"grant:{grant.pk}:cost", period_start(grant.period, term_start=grant.term_start), NO_LIMIT, grant=grant)
    client = get_redis()
    try:
        value = client.get(meter.redis_keys()[1]) if client is not None else None
    except Exception:
        value = None
    return int(value or 0) * UNIT


def spent_now(grant: Grant) -> Decimal:
    """This period's spend of a grant, from its counter (or the ledger when there is none yet)."""
    meter = Meter(f"grant:{grant.pk}:cost", period_start(grant.period, term_start=grant.term_start), NO_LIMIT, grant=grant)
    client = get_redis()
    try:
        value = client.get(meter.redis_keys()[0]) if client is not None else None
    except Exception:
        value = None
    return (int(value) if value is not None else meter.ledger_total()) * UNIT
