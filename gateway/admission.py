"""Admission: the one place a relay call is counted in Redis, and the one failure policy for it.

Before the provider, `admit` runs ONE script (governance.redis.run_parts): the check of the stamps the call's
in-memory keys and grants were read at (governance.stamps), the rate limits (gateway.ratelimit), then the
budget hold (budgets.enforcement), each part only if the ones before it passed: a call on stale memory
counts nothing, a rate-limited call holds nothing. After the provider, `settle` runs ONE script: the hold
becomes what the call cost and its tokens are charged to the token limits. `release` drops the hold of a
call no provider answered.

The failure policy, decided here and nowhere else in the relay:
- Redis unreachable before the call: with rate limits configured the call is refused (`limits_unavailable`:
  a limit that cannot be counted cannot be honoured); otherwise each covering grant decides
  (budgets.enforcement.unverified: experimentation refuses, production admits unchecked and IT is paged).
- A budget counter missing (a new period, or Redis lost its data): the hold alone is made again once the
  counter is rebuilt from the ledger plus the open holds (budgets.enforcement.hold); the request is not
  counted twice against its rate limits.
- A budget refusal: `Refused`, carrying the rate-limit admission already counted, so the caller's
  downgrade policy can hold again on a cheaper model (`hold_again`) without counting the request twice.
- Redis unreachable after the call: the call was served and its ledger row is the truth. Nothing is
  retried on the call's time: the hold lapses after TOLLGATE_HOLD_SECONDS and the hourly drift check
  (budgets.services.grant_counters_verify) sets the counters to the ledger.
"""
import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from budgets import alerts, enforcement
from budgets.enforcement import BudgetRefused, Reservation, ReservePlan
from gateway import ratelimit
from gateway.errors import RelayError
from governance import stamps
from governance.redis import get_redis, run_parts

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """A call counted against its rate limits and holding its worst case on its budgets."""

    limits: ratelimit.Admission
    hold: Reservation

    def headers(self) -> dict[str, str]:
        return self.limits.headers()


class Refused(Exception):
    """A budget refused the call after its rate limits counted it."""

    def __init__(self, refusal: BudgetRefused, limits: ratelimit.Admission):
        super().__init__(refusal.message)
        self.refusal, self.limits = refusal, limits


def admit(*, key, person, team, grants: list, cost: Decimal, tokens: int, call: tuple[str, datetime]) -> Admitted:
    """Count the call and hold `cost` (and `tokens`) on every meter of `grants` and the key, in one round
    trip. Raises RelayError for a rate limit (or limits that cannot be checked), Refused for a budget, and
    stamps.Stale when memory is out of date (nothing was counted: the call starts again)."""
    limits = ratelimit.limits_for(key=key, person=person, team=team)
    plan = enforcement.reserve_plan(grants=grants, key=key, cost=cost, tokens=tokens, call=call)
    parts, now = [], 0.0
    if limits:
        limits_part, now = ratelimit.admit_part(limits)
        parts.append(limits_part)
    if plan.reservation.meters:
        parts.append(plan.part())
    client = get_redis()
    if not parts or client is None:
        stamps.verify()
        if parts:
            return _unreachable(limits, plan, ConnectionError("REDIS_URL is not set"))
        return Admitted(ratelimit.Admission(), plan.reservation)
    check = stamps.verification_part()  # the stamps this call assumed, confirmed before anything is counted
    try:
        results = run_parts(client, [*([check] if check else []), *parts])
    except Exception as exc:  # redis.RedisError and socket errors alike
        stamps.verify()
        return _unreachable(limits, plan, exc)
    if check:
        stamps.confirm(results.pop(0))
    admission = ratelimit.Admission()
    if limits:
        try:
            admission = ratelimit.admission_from(limits, results.pop(0), now)
        except ratelimit.LimitExceeded as exc:
            raise _rate_refusal(exc) from None
    if not plan.reservation.meters:
        return Admitted(admission, plan.reservation)
    try:
        return Admitted(admission, enforcement.reservation_from(plan, results[0]))
    except enforcement.CounterMissing:
        return _hold(admission, plan)
    except BudgetRefused as exc:
        raise Refused(exc, admission) from None


def hold_again(limits: ratelimit.Admission, *, key, grants: list, cost: Decimal, tokens: int,
               call: tuple[str, datetime]) -> Admitted:
    """A second hold for a call whose rate limits are counted already (a downgrade to a cheaper model)."""
    return _hold(limits, enforcement.reserve_plan(grants=grants, key=key, cost=cost, tokens=tokens, call=call))


def _hold(limits: ratelimit.Admission, plan: ReservePlan) -> Admitted:
    try:
        return Admitted(limits, enforcement.hold(plan))
    except BudgetRefused as exc:
        raise Refused(exc, limits) from None


def _unreachable(limits: list, plan: ReservePlan, exc: Exception) -> Admitted:
    if limits:
        raise RelayError("limits_unavailable", f"limits cannot be checked right now: rate-limit store unreachable "
                         f"({type(exc).__name__})")
    try:
        return Admitted(ratelimit.Admission(), enforcement.unverified(plan, exc))
    except BudgetRefused as refusal:
        raise Refused(refusal, ratelimit.Admission()) from None


def _rate_refusal(exc: ratelimit.LimitExceeded) -> RelayError:
    return RelayError("rate_limit_exceeded", f"{exc.limit.describe()} reached; retry after {exc.retry_after}s",
                      headers={"Retry-After": str(exc.retry_after)})


def settle(admitted: Admitted, *, cost: Decimal, tokens: int) -> None:
    """The call is over: its hold becomes `cost`, its `tokens` count against the token limits, in one round
    trip; threshold alerts follow. It may run before the call's ledger row is committed: the hold carries
    the call's identity, so a counter rebuilt from the ledger around it counts the call exactly once."""
    budget = enforcement.settle_part(admitted.hold, cost=cost, tokens=tokens)
    charge = ratelimit.charge_part(admitted.limits, tokens)
    parts = [part for part in (budget, charge) if part is not None]
    if not parts:
        return
    try:
        results = run_parts(get_redis(), parts)
    except Exception as exc:  # the ledger row is the truth: the drift check sets the counters to it
        log.warning("could not settle hold %s in Redis (%s); the hourly counter check repairs it",
                    admitted.hold.hold_id, type(exc).__name__)
        return
    if budget is not None:
        alerts.after_settle(enforcement.settled_from(budget, admitted.hold, results[0]))


def release(admitted: Admitted) -> None:
    """No provider answered the call: drop its hold, charge nothing."""
    settle(admitted, cost=Decimal(0), tokens=0)
