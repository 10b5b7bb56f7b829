"""Reproduction: PostgreSQL stops for 8 s under steady load and comes back. A throwaway cluster of the test's
own (started, stopped and deleted here) is migrated and given a provider (the stub), an alias and a key;
the production web tier (gunicorn, two gevent workers, a pool of 8) serves it; 8 client threads on the
official openai SDK call it for about 20 s while the cluster is stopped (`pg_ctl stop -m fast`, and
again with `-m immediate`, as in a crash) and started again.

What must hold: no client waits more than MAX_WAIT_SECONDS, no 500 and no client timeout (a call the relay
cannot serve without the database is answered 503 `service_unavailable` or `overloaded`), and, within 15 s
of PostgreSQL being back, the ledger holds exactly one row per X-Request-ID sent, none twice, with the
status the client was answered: what was answered during the outage was kept in the journal and written
once the database returned."""
import json
import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from django.conf import settings

from tests.reliability.harness import (
    MAX_WAIT_SECONDS,
    ROOT,
    Call,
    answer_problems,
    burst,
    chat,
    psycopg_fetch,
    request_id,
    sdk,
    tally,
    wait_for_ledger,
)
from tests.support.relay_fixtures import PROVIDER_SECRET

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

UPSTREAM = "slow-0.1"
CLIENTS = 8
LOAD_SECONDS_BEFORE = 4.0  # steady load before PostgreSQL stops
OUTAGE_SECONDS = 8.0
LOAD_SECONDS_AFTER = 8.0  # steady load after it is back
LEDGER_GRACE_SECONDS = 15.0  # after PostgreSQL is back, every row must be in within this
COLD_RECOVERY_SECONDS = 5.0  # after PostgreSQL is back, a call that needs the database is served within this

# Run by `manage.py shell -c` against the throwaway cluster: the catalog and a key, as the admin would make them.
SETUP = """
import json, os
from gateway.models import Provider
from keys import services
from tests.gateway.factories import DeploymentFactory, ModelAliasFactory, ModelPriceFactory, ProviderFactory, ProviderModelFactory
from tests.governance.factories import PersonFactory, TeamFactory

provider = ProviderFactory(name="Stub OpenAI", kind=Provider.Kind.OPENAI, base_url=os.environ["STUB_BASE_URL"],
                           api_key=os.environ["STUB_API_KEY"], read_timeout=5.0)
model = ProviderModelFactory(provider=provider, name=os.environ["STUB_MODEL"])
ModelPriceFactory(provider_model=model)
DeploymentFactory(alias=ModelAliasFactory(name="steady"), provider_model=model, priority=0)
issued = services.key_issue(name="steady load", team=TeamFactory(), person=PersonFactory(), actor=None)
cold = services.key_issue(name="first used in the outage", team=TeamFactory(), person=PersonFactory(), actor=None)
print("SETUP " + json.dumps({"secret": issued.secret, "key_id": issued.key.pk, "cold": cold.secret}))
"""


def manage(database_url: str, *args: str, extra_env: dict | None = None) -> str:
    env = {**os.environ, "DATABASE_URL": database_url, "DEBUG": "false", "SECRET_KEY": settings.SECRET_KEY,
           "TOLLGATE_ENCRYPTION_KEYS": ",".join(settings.TOLLGATE_ENCRYPTION_KEYS), "CELERY_TASK_ALWAYS_EAGER": "true",
           "LOG_LEVEL": "WARNING", **(extra_env or {})}
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=180)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"manage.py {args[0]} failed:\n{output[-3000:]}"
    return output


@pytest.fixture
def tollgate_on_its_own_cluster(postgres_cluster, stub):
    """The throwaway cluster with a migrated `tollgate` database, the stub as provider, an alias `steady`
    and a key: (cluster, database url, key secret)."""
    started = time.monotonic()
    with psycopg.connect(postgres_cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE tollgate")
    url = postgres_cluster.url("tollgate")
    manage(url, "migrate", "--noinput", "-v", "0")
    migrated = time.monotonic()
    output = manage(url, "shell", "-c", SETUP, extra_env={
        "STUB_BASE_URL": stub.openai_base_url, "STUB_API_KEY": PROVIDER_SECRET, "STUB_MODEL": UPSTREAM})
    keys = json.loads(output.split("SETUP ", 1)[1].splitlines()[0])
    print(f"\n[postgres restart] cluster on port {postgres_cluster.port}: migrated in {migrated - started:.1f}s, "
          f"catalog and key in {time.monotonic() - migrated:.1f}s")
    return postgres_cluster, url, keys["secret"], keys["cold"]


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
def test_a_postgres_restart_under_load_loses_no_ledger_row_and_hangs_no_client(fresh_state, tollgate_on_its_own_cluster,
                                                                               web_tier, stop_mode):
    """`fast`: PostgreSQL disconnects every session and shuts down cleanly; `immediate`: it stops as if it
    crashed (commits under way when it stops are in doubt for the relay: exactly once relies on the
    ledger's unique call identity)."""
    cluster, url, secret, cold_secret = tollgate_on_its_own_cluster
    tier = web_tier(workers=2, database_url=url, DATABASE_POOL_MAX_SIZE=8, DATABASE_POOL_TIMEOUT=2)
    # Warm both workers (key, catalog, grants in memory), so the outage finds them as production would.
    # Not a harness check: these calls count with the others.
    warm = burst(tier.v1, secret, calls=4 * CLIENTS, concurrency=CLIENTS, model="steady", prefix="warm")

    calls: list[Call] = []
    lock, stop_load = threading.Lock(), threading.Event()

    def steady(index: int) -> None:
        client = sdk(tier.v1, secret)
        try:
            while not stop_load.is_set():
                call = chat(client, request_id(f"pg{index}"), model="steady")
                with lock:
                    calls.append(call)
        finally:
            client.close()

    cold_calls: list[Call] = []
    outage_begins = threading.Event()

    def cold() -> None:
        """A key no process has in memory, first used when the outage begins: every call needs the database,
        so this client sees when each worker's pool is back (the pool's reconnect back-off once kept
        workers refusing for ~54 s after PostgreSQL was up)."""
        client = sdk(tier.v1, cold_secret)
        outage_begins.wait()
        try:
            while not stop_load.is_set():
                call = chat(client, request_id("cold"), model="steady")
                with lock:
                    cold_calls.append(call)
                time.sleep(0.1)
        finally:
            client.close()

    clients = [threading.Thread(target=steady, args=(i,), daemon=True) for i in range(CLIENTS)]
    clients.append(threading.Thread(target=cold, daemon=True))
    load_started = time.monotonic()
    for thread in clients:
        thread.start()
    time.sleep(LOAD_SECONDS_BEFORE)
    stopping = time.monotonic()
    cluster.stop(stop_mode)
    outage_begins.set()
    down = time.monotonic()
    assert not cluster.accepts_connections(), "harness: PostgreSQL still answers after pg_ctl stop"
    time.sleep(OUTAGE_SECONDS)
    cluster.start()
    back = time.monotonic()
    time.sleep(LOAD_SECONDS_AFTER)
    stop_load.set()
    for thread in clients:
        thread.join(timeout=40)
    load_ended = time.monotonic()
    assert not any(thread.is_alive() for thread in clients), "harness: a client thread is still waiting 40s after the load"

    everything = warm + calls + cold_calls
    served_cold = [c.started + c.elapsed - back for c in cold_calls if c.status == 200 and c.started >= back]
    cold_recovery = min(served_cold) if served_cold else None
    count = wait_for_ledger(psycopg_fetch(url), [c.request_id for c in everything],
                            timeout=max(0.0, back + LEDGER_GRACE_SECONDS - time.monotonic()))
    rows_in = time.monotonic() - back
    during = [c for c in calls if c.started + c.elapsed >= stopping and c.started <= back]

    print(f"[postgres restart, {stop_mode}] load {load_ended - load_started:.1f}s with {CLIENTS} clients; PostgreSQL stopped at "
          f"+{stopping - load_started:.1f}s (down after {down - stopping:.1f}s), back at +{back - load_started:.1f}s")
    print(f"[postgres restart, {stop_mode}] warming calls: {dict(tally(warm))}")
    print(f"[postgres restart, {stop_mode}] calls {len(everything)} (warm {len(warm)}): answers {dict(tally(everything))}; "
          f"longest wait {max(c.elapsed for c in everything):.1f}s, over {MAX_WAIT_SECONDS:.0f}s: "
          f"{sum(c.elapsed > MAX_WAIT_SECONDS for c in everything)}")
    print(f"[postgres restart, {stop_mode}] calls overlapping the outage {len(during)}: {dict(tally(during))}")
    print(f"[postgres restart, {stop_mode}] ledger {rows_in:.1f}s after PostgreSQL is back: {count.summary()}")
    print(f"[postgres restart, {stop_mode}] cold key: {dict(tally(cold_calls))}; first served "
          + (f"{cold_recovery:.1f}s after PostgreSQL was back" if cold_recovery is not None else "never"))
    print(f"[postgres restart, {stop_mode}] web tier log: {tier.log_count('Traceback')} tracebacks, "
          f"{tier.log_count('LEDGER WRITE FAILED')} 'LEDGER WRITE FAILED'")

    assert during, "harness: no call overlapped the outage"
    problems = answer_problems(everything, allowed={200: {None}, 503: {"overloaded", "service_unavailable"}})
    problems += count.problems(everything)
    if cold_recovery is None or cold_recovery > COLD_RECOVERY_SECONDS:
        problems.append(f"a call needing the database was first served {cold_recovery}s after PostgreSQL was back "
                        f"(at most {COLD_RECOVERY_SECONDS}s)")
    assert not problems, "\n".join(problems) + "\n" + tier.log_tail()
