"""Budget counters and alerts through Redis faults, on a throwaway redis-server each test starts, restarts
empty (no persistence: a restart loses everything, as a failover to an empty replica would) and stops.

What must hold: a counter Redis lost is rebuilt from the ledger plus the holds of the calls still in flight,
and nothing is counted on it before that (settle never creates a counter from 0); spend plus holds never
pass a cap, however many calls race for it after the restart; the drift check covers keys' own monthly
caps; and an alert raised while Redis (the Celery broker) is down is sent once it is back, exactly once."""
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from budgets import alerts, enforcement, tasks
from budgets.enforcement import BudgetRefused, Settled, meters_for, to_units
from budgets.models import Grant, GrantAlert
from budgets.services import grant_counters_verify
from governance.celery import app as celery_app
from governance.redis import get_redis, run_parts
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]
CAP = Decimal("1.00")


def units(amount: str | Decimal) -> int:
    return to_units(Decimal(amount))


def charge(key, grant: Grant | None, cost: str, *, call: tuple[str, datetime] | None = None) -> LedgerEntry:
    """A call's committed ledger row."""
    identity = {"request_id": call[0], "created_at": call[1]} if call else {}
    return LedgerEntryFactory(key=key, grant=grant, grant_path=f",{grant.pk}," if grant else "", cost=Decimal(cost),
                              **identity)


def ledger_units(grant: Grant) -> int:
    return meters_for([grant])[0].ledger_total()


def counters(meter) -> tuple[int | None, int]:
    spent, held = get_redis().mget(meter.redis_keys()[:2])
    return (int(spent) if spent is not None else None), int(held or 0)


def hold(grant: Grant, key, cost: str) -> enforcement.Reservation:
    """A relay call's hold: it carries the identity its ledger row will have, as the relay's does."""
    return enforcement.reserve(grants=[grant], key=key, cost=Decimal(cost), tokens=0,
                               call=(uuid.uuid4().hex, timezone.now()))


def row_of(reservation: enforcement.Reservation, key, grant: Grant, cost: str) -> LedgerEntry:
    """The call's ledger row, committed (gateway.relay.call.finish writes it before the call settles)."""
    return charge(key, grant, cost, call=enforcement.call_of(reservation.hold_id))


def finish(reservation: enforcement.Reservation, key, grant: Grant, cost: str) -> None:
    """A call ending as the relay ends one: its row committed, then its hold settled."""
    row_of(reservation, key, grant, cost)
    enforcement.settle(reservation, cost=Decimal(cost), tokens=0, row_committed=True)


@pytest.fixture
def capped():
    """A key and its team's experimentation grant with $0.70 spent this month (in the ledger)."""
    key = VirtualKeyFactory()
    grant = GrantFactory(scope=Grant.Scope.TEAM, team=key.team, limit_amount=CAP)
    charge(key, grant, "0.35")
    charge(key, grant, "0.35")
    return key, grant


def burst(grant: Grant, key, cost: str, calls: int = 20) -> list:
    """`calls` reserve attempts at once, from threads; each the reservation or None when refused."""

    def attempt(_):
        try:
            return hold(grant, key, cost)
        except BudgetRefused:
            return None
        finally:
            connection.close()  # a rebuild reads the ledger on this thread's own connection

    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(attempt, range(calls)))


def test_calls_in_flight_through_a_restart_are_counted_once_and_a_burst_stays_under_the_cap(throwaway_redis, capped):
    key, grant = capped
    meter = meters_for([grant])[0]
    in_flight = [hold(grant, key, "0.10"), hold(grant, key, "0.10")]
    assert counters(meter) == (units("0.70"), units("0.20"))

    throwaway_redis.restart_empty()
    for reservation in in_flight:
        finish(reservation, key, grant, "0.05")
    assert counters(meter) == (units("0.80"), 0) == (ledger_units(grant), 0)  # not 0.10: rebuilt, then counted

    admitted = [r for r in burst(grant, key, "0.05") if r is not None]
    spent, held = counters(meter)
    assert len(admitted) == 4  # 0.80 + 4 x 0.05 = 1.00
    assert spent == ledger_units(grant) and held == units("0.05") * len(admitted)
    assert spent + held <= units(CAP)


def test_holds_of_calls_in_flight_are_put_back_before_a_burst_after_a_restart_is_admitted(throwaway_redis, capped):
    key, grant = capped
    meter = meters_for([grant])[0]
    in_flight = [hold(grant, key, "0.10"), hold(grant, key, "0.10")]
    throwaway_redis.restart_empty()

    admitted = [r for r in burst(grant, key, "0.05") if r is not None]
    spent, held = counters(meter)
    assert (spent, held) == (ledger_units(grant), units("0.20") + units("0.05") * len(admitted))
    assert len(admitted) == 2  # 0.70 spent + 0.20 still in flight + 2 x 0.05 = 1.00
    for reservation in in_flight:
        finish(reservation, key, grant, "0.08")
    spent, held = counters(meter)
    assert spent == ledger_units(grant) == units("0.86") and spent + held <= units(CAP)


def test_a_process_with_calls_in_flight_puts_its_holds_back_without_a_call_of_its_own(throwaway_redis, capped):
    key, grant = capped
    meter = meters_for([grant])[0]
    hold(grant, key, "0.10")
    throwaway_redis.restart_empty()
    time.sleep(enforcement.EPOCH_FENCE_SECONDS)  # the watcher polls; the fence gives it this long
    assert counters(meter) == (None, units("0.10"))  # the hold is back; the counter waits for the next call


def test_settle_on_a_missing_counter_leaves_it_missing_and_the_rebuild_counts_the_call_once(throwaway_redis, capped):
    key, grant = capped
    meter = meters_for([grant])[0]
    reservation = hold(grant, key, "0.10")
    get_redis().delete(meter.redis_keys()[0])  # Redis lost the counter (the holds survive here)
    row_of(reservation, key, grant, "0.05")

    part = enforcement.settle_part(reservation, cost=Decimal("0.05"), tokens=0, row_committed=True)
    result = run_parts(get_redis(), [part])[0]
    assert not get_redis().exists(meter.redis_keys()[0])  # never created from 0 (it would read 0.05)
    assert counters(meter) == (None, 0)  # the hold is released all the same

    settled = enforcement.settled_from(part, reservation, result)  # rebuilt from the ledger, which has the row
    assert counters(meter) == (units("0.75"), 0) == (ledger_units(grant), 0)
    assert settled == [Settled(grant, meter.since, Decimal("0.70"), Decimal("0.75"))]


def test_a_call_whose_row_a_rebuild_already_read_is_not_counted_again_when_it_settles(throwaway_redis, capped):
    key, grant = capped
    meter = meters_for([grant])[0]
    early = hold(grant, key, "0.10")
    throwaway_redis.restart_empty()
    row_of(early, key, grant, "0.05")  # its row is committed (with others', in one batch of the ledger writer) ...
    later = hold(grant, key, "0.05")  # ... another call's reserve rebuilds the counter from the ledger, row included
    enforcement.settle(early, cost=Decimal("0.05"), tokens=0, row_committed=True)  # ... and only then it settles
    assert counters(meter) == (units("0.75"), units("0.05")) == (ledger_units(grant), units("0.05"))
    finish(later, key, grant, "0.04")
    assert counters(meter) == (units("0.79"), 0) == (ledger_units(grant), 0)


def test_a_call_settled_before_its_row_is_written_is_counted_on_the_rebuilt_counter(throwaway_redis, capped):
    key, grant = capped
    meter = meters_for([grant])[0]
    reservation = hold(grant, key, "0.10")
    throwaway_redis.restart_empty()
    enforcement.settle(reservation, cost=Decimal("0.05"), tokens=0, row_committed=False)  # the row is journaled
    assert counters(meter) == (units("0.75"), 0)  # ledger 0.70 + this call, not 0.05
    row_of(reservation, key, grant, "0.05")  # the journal's row reaches the database
    assert counters(meter)[0] == ledger_units(grant)


def test_drift_on_a_keys_monthly_cap_is_found_and_repaired(throwaway_redis):
    key = VirtualKeyFactory(monthly_budget=Decimal("5.00"))
    other = VirtualKeyFactory(monthly_budget=Decimal("5.00"))
    charge(key, None, "0.30")
    charge(other, None, "0.20")
    meter, other_meter = meters_for([], key)[0], meters_for([], other)[0]
    get_redis().set(meter.redis_keys()[0], units("0.10"))  # e.g. a settle that was lost
    get_redis().set(other_meter.redis_keys()[0], units("0.20"))  # in step with the ledger

    report = grant_counters_verify()
    assert report.checked == 2
    assert report.drift == [(meter.base, units("0.10"), units("0.30"))]
    assert int(get_redis().get(meter.redis_keys()[0])) == units("0.30")
    assert int(get_redis().get(other_meter.redis_keys()[0])) == units("0.20")
    assert grant_counters_verify().drift == []


@pytest.fixture
def broker_is_throwaway_redis(throwaway_redis, monkeypatch):
    """Celery publishes to the throwaway Redis for real (not eagerly), as production does."""
    monkeypatch.setenv("CELERY_BROKER_URL", throwaway_redis.url)  # Celery reads it before its settings
    saved = {name: celery_app.conf[name] for name in ("broker_url", "broker_write_url", "task_always_eager")}
    # ... unless an earlier test had the app read its configuration already: then set it on the app.
    celery_app.conf.update(broker_url=throwaway_redis.url, broker_write_url=throwaway_redis.url, task_always_eager=False)
    yield throwaway_redis
    celery_app.conf.update(saved)


def test_alerts_raised_while_redis_is_down_are_sent_later_exactly_once(broker_is_throwaway_redis, mailoutbox):
    grant = GrantFactory(limit_amount=CAP)
    since = enforcement.period_start(grant.period)
    broker_is_throwaway_redis.stop()

    started = time.monotonic()
    alerts.alert_unverified([grant])  # the alert a call admitted unchecked raises
    alerts.after_settle([Settled(grant, since, Decimal("0.40"), Decimal("0.60"))])  # 50% crossed
    assert time.monotonic() - started < 1  # the calls that raised them were not held up
    assert GrantAlert.objects.filter(pending=True).count() == 2 and mailoutbox == []

    broker_is_throwaway_redis.start()
    celery_app.conf.task_always_eager = True  # the worker picks up what is queued from now on
    alerts.after_settle([Settled(grant, since, Decimal("0.60"), Decimal("0.85"))])  # 80%: queued, and the kept ones go
    subjects = sorted(m.subject for m in mailoutbox)
    assert len(subjects) == 3 and any("unverified" in s or "unreachable" in s for s in subjects)
    assert sum("reached 50%" in s for s in subjects) == 1 and sum("reached 80%" in s for s in subjects) == 1
    assert not GrantAlert.objects.filter(pending=True).exists()

    assert tasks.deliver_pending_grant_alerts() == 0  # beat's run finds nothing left
    assert alerts.send(grant.pk, since.isoformat(), "50", "0.60") is False
    assert len(mailoutbox) == 3


def test_an_alert_kept_pending_is_sent_once_by_beat_however_many_runs_race(broker_is_throwaway_redis, mailoutbox):
    grant = GrantFactory(limit_amount=CAP)
    since = enforcement.period_start(grant.period)
    broker_is_throwaway_redis.stop()
    alerts.cap_reached(grant)
    assert GrantAlert.objects.get(kind="cap").pending

    def beat(_):
        try:
            return tasks.deliver_pending_grant_alerts()
        finally:
            connection.close()

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(beat, range(4))) == 1
    assert [m.subject for m in mailoutbox] == [f"[Tollgate] Grant '{grant.name}' is at its cap: calls are being refused"]
    assert alerts.send(grant.pk, since.isoformat(), "cap", "1.00") is False
