"""Reproductions: bursts at many times the database pool's size against the production web tier (gunicorn,
gevent workers, DEBUG off) on the test database, clients on the official openai SDK, upstream `slow-0.3`.

What must hold, counted per call: every client is answered within MAX_WAIT_SECONDS with a 200 or a 503
`overloaded` carrying Retry-After (never a 500, never a client timeout), and the ledger holds exactly one
row per X-Request-ID sent, refusals included, with the status the client was answered; under a team's cap
the ledger never passes the cap and every call served is in it."""
import time
from decimal import Decimal

import pytest

from budgets.models import Grant
from keys import services as key_services
from keys.actor import sign_actor
from tests.budgets.factories import GrantFactory
from tests.governance.factories import MembershipFactory
from tests.reliability.harness import (
    MAX_WAIT_SECONDS,
    Call,
    LedgerCount,
    SessionSampler,
    WebTier,
    answer_problems,
    burst,
    tally,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

POOL = 4  # DATABASE_POOL_MAX_SIZE, per web process
POOL_TIMEOUT = 1  # DATABASE_POOL_TIMEOUT, seconds
WORKERS = 2
CONCURRENCY = 16 * POOL  # clients at once: 8x the pool of each of the two processes
CALLS = 400
UPSTREAM = "slow-0.3"
CAP = Decimal("0.50")  # the team's grant
COST = Decimal("0.01")  # per call on "pricey": 2 input tokens at $1000/M + 4 output at $2000/M


def start_tier(web_tier) -> WebTier:
    return web_tier(workers=WORKERS, DATABASE_POOL_MAX_SIZE=POOL, DATABASE_POOL_TIMEOUT=POOL_TIMEOUT)


def report(name: str, calls: list[Call], took: float, count: LedgerCount, tier: WebTier, sessions: SessionSampler) -> None:
    """The counts the lead reports, printed whether the test passes or not (pytest -s, or shown on failure)."""
    print(f"\n[{name}] {len(calls)} calls, {CONCURRENCY} at once, pool {POOL}x{WORKERS} (timeout {POOL_TIMEOUT}s), "
          f"{took:.1f}s: answers {dict(tally(calls))}; longest wait {max(c.elapsed for c in calls):.1f}s, "
          f"over {MAX_WAIT_SECONDS:.0f}s: {sum(c.elapsed > MAX_WAIT_SECONDS for c in calls)}")
    print(f"[{name}] ledger: {count.summary()}")
    print(f"[{name}] database sessions, peak during the burst (this test's own included): {sessions.peak}")
    print(f"[{name}] web tier log: {tier.log_count('Traceback')} tracebacks, "
          f"{tier.log_count('LEDGER WRITE FAILED')} 'LEDGER WRITE FAILED', {tier.log_count('PoolTimeout')} 'PoolTimeout'")


def test_burst_on_a_cold_key_is_answered_fast_and_ledgered_exactly_once(relay, web_tier, key, ledger_count):
    """Reproduction: 64 clients at once, 400 calls, on a key no process has seen yet (every first call of
    a process misses its key cache and goes to the database), pool of 4 per process."""
    relay.alias("burst", (relay.openai_provider, UPSTREAM))
    tier = start_tier(web_tier)
    started = time.monotonic()
    with SessionSampler(tier.database_url) as sessions:
        calls = burst(tier.v1, key.secret, calls=CALLS, concurrency=CONCURRENCY, model="burst", prefix="cold")
    took = time.monotonic() - started
    count = ledger_count([c.request_id for c in calls])
    report("cold key", calls, took, count, tier, sessions)

    problems = answer_problems(calls, allowed={200: {None}, 503: {"overloaded"}})
    if sum(c.status == 200 for c in calls) < POOL:
        problems.append(f"only {sum(c.status == 200 for c in calls)} calls served: the tier must still serve under a burst")
    problems += count.problems(calls)
    assert not problems, "\n".join(problems) + "\n" + tier.log_tail()


def test_burst_on_a_service_key_with_signed_actors_is_answered_fast_and_ledgered_exactly_once(relay, web_tier, ledger_count):
    """Reproduction: the same burst on a team's service key, each call signed for a person with
    X-Tollgate-Actor (the actor's person is resolved from the database on a cold process)."""
    relay.alias("burst", (relay.openai_provider, UPSTREAM))
    membership = MembershipFactory()
    alice = membership.person
    issued = key_services.key_issue(name="burst bot", team=membership.team, person=None, actor=None,
                                    with_signing_secret=True)

    def as_alice() -> dict:
        value, signature = sign_actor(issued.signing_secret, user=alice.email, feature="burst")
        return {"X-Tollgate-Actor": value, "X-Tollgate-Actor-Signature": signature}

    tier = start_tier(web_tier)
    started = time.monotonic()
    with SessionSampler(tier.database_url) as sessions:
        calls = burst(tier.v1, issued.secret, calls=CALLS, concurrency=CONCURRENCY, model="burst", prefix="actor",
                      headers=as_alice)
    took = time.monotonic() - started
    count = ledger_count([c.request_id for c in calls])
    report("service key + actor", calls, took, count, tier, sessions)

    problems = answer_problems(calls, allowed={200: {None}, 503: {"overloaded"}})
    if sum(c.status == 200 for c in calls) < POOL:
        problems.append(f"only {sum(c.status == 200 for c in calls)} calls served: the tier must still serve under a burst")
    problems += count.problems(calls)
    not_alices = [row for row in count.rows if row["outcome"] == "ok" and row["person_id"] != alice.pk]
    if not_alices:
        problems.append(f"{len(not_alices)} calls served but not attributed to the signed actor")
    assert not problems, "\n".join(problems) + "\n" + tier.log_tail()


def test_burst_against_a_team_cap_never_passes_it_and_every_served_call_is_ledgered(relay, web_tier, key, ledger_count):
    """Reproduction: a team grant of $0.50 (room for 50 calls of $0.01) hit by the same burst: the ledger's
    spend on the grant stays within the cap, every 200 a client saw has its `ok` row, and every refusal
    (429 budget_exceeded, 503 overloaded) is ledgered too, exactly once. A call that finds no pooled
    connection in time while the grant's counter is rebuilt from the ledger timed out on the pool: 503
    `overloaded` with Retry-After, like any other (not `budget_unverifiable`)."""
    relay.alias("pricey", (relay.openai_provider, UPSTREAM), price=("1000", "2000", "0"))
    grant = GrantFactory(name="burst team", scope=Grant.Scope.TEAM, team=key.team, limit_amount=CAP)
    tier = start_tier(web_tier)
    started = time.monotonic()
    with SessionSampler(tier.database_url) as sessions:
        calls = burst(tier.v1, key.secret, calls=CALLS, concurrency=CONCURRENCY, model="pricey", prefix="cap",
                      max_tokens=5)
    took = time.monotonic() - started
    count = ledger_count([c.request_id for c in calls])
    report("team cap", calls, took, count, tier, sessions)
    charged = [row for row in count.rows if row["outcome"] == "ok" and f",{grant.pk}," in row["grant_path"]]
    spent = sum((row["cost"] for row in charged), Decimal(0))
    served = [c for c in calls if c.status == 200]
    print(f"[team cap] cap {CAP}, ledger spend on the grant {spent} in {len(charged)} rows, {len(served)} answered 200")

    problems = answer_problems(calls, allowed={200: {None}, 429: {"budget_exceeded"}, 503: {"overloaded"}})
    if spent > CAP:
        problems.append(f"ledger spend on the grant {spent} passes its cap {CAP}")
    unledgered = [c.request_id for c in served if [r["outcome"] for r in count.by_id.get(c.request_id, [])] != ["ok"]]
    if unledgered:
        problems.append(f"{len(unledgered)} of {len(served)} calls answered 200 have no single `ok` row "
                        f"(e.g. {unledgered[:3]})")
    if len(charged) != len(served) or spent != len(served) * COST:
        problems.append(f"{len(charged)} `ok` rows charging {spent} to the grant, {len(served)} calls answered 200 "
                        f"(= {len(served) * COST})")
    if not served:
        problems.append("no call served: the cap leaves room for 50")
    problems += count.problems(calls)
    assert not problems, "\n".join(problems) + "\n" + tier.log_tail()
