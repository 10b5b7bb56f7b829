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

    grants.py    the grants covering a call, in memory        meters.py    counters, periods, ledger totals
    holds.py     reserve, hold and settle (one script each)   recovery.py  after Redis lost its data
"""
from budgets.enforcement.grants import BudgetRefused, check_grants, covering_grants
from budgets.enforcement.holds import (
    CounterMissing,
    Reservation,
    ReservePlan,
    Settled,
    held_now,
    hold,
    release,
    reservation_from,
    reserve,
    reserve_plan,
    settle,
    settle_part,
    settled_from,
    spent_now,
    unverified,
)
from budgets.enforcement.meters import NO_LIMIT, UNIT, Meter, call_of, meters_for, period_start, to_units
from budgets.enforcement.recovery import EPOCH_FENCE_SECONDS, open_reservations, rebuild, recover_holds

__all__ = [
    "EPOCH_FENCE_SECONDS", "NO_LIMIT", "UNIT", "BudgetRefused", "CounterMissing", "Meter", "ReservePlan", "Reservation",
    "Settled", "call_of", "check_grants", "covering_grants", "held_now", "hold", "meters_for", "open_reservations",
    "period_start", "rebuild", "recover_holds", "release", "reservation_from", "reserve", "reserve_plan", "settle",
    "settle_part", "settled_from", "spent_now", "to_units", "unverified",
]
