"""bench/dashboard: the Usage page (/ledger/usage/) at scale on PostgreSQL.

    .venv/bin/python -m bench.dashboard [--entries 1000000] [--keep]

Fills a fresh database (tollgate_dashboard_bench) with the ledger benchmark's data set (bench/ledger.py's
helpers: 2,000 people and keys, 200 teams, 20 models, project and environment tags, 3% refused calls over
three months), rolls it up, and times the Usage page for finance (everything), a team owner and an employee
with Django's test Client: one warm-up request, then the median of 5. Target (issue 15): < 500 ms each.
"""
import argparse
import statistics
import time
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone

from bench import ledger as ledger_bench

DB_NAME = "tollgate_dashboard_bench"
TARGET_MS = 500


def _time_page(client, person, path: str, runs: int = 5) -> tuple[float, float]:
    """(first request, median of `runs` after it) in milliseconds."""
    client.force_login(person)
    timings = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        response = client.get(path)
        timings.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{path} answered {response.status_code} for {person}")
    return timings[0], statistics.median(timings[1:])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="Leave the database behind (to look at plans).")
    args = parser.parse_args()
    ledger_bench.DB_NAME = DB_NAME  # its helpers read the name at call time
    ledger_bench._env()
    ledger_bench._admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    ledger_bench._admin(f"CREATE DATABASE {DB_NAME}")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import Group
    from django.core.management import call_command
    from django.db import connection, connections
    from django.test import Client
    from django.test.utils import override_settings, setup_test_environment

    from governance import roles
    from governance.models import Person
    from ledger import partitions
    from ledger.services import ledger_rollup

    setup_test_environment()  # the test Client's host, in-memory e-mail
    # Pages link site.css; no collectstatic here, so plain static storage instead of the manifest's.
    override_settings(STORAGES={**settings.STORAGES, "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}).enable()
    call_command("migrate", verbosity=0)
    people, teams, models, keys = ledger_bench._dimensions()
    today = date.today()
    start_month = (today.replace(day=1) - timedelta(days=62)).replace(day=1)
    partitions.ensure_partitions(start=start_month)
    days = (today - start_month).days + 1  # up to the end of today: the current month has data to forecast
    started = time.perf_counter()
    ledger_bench._fill(args.entries, datetime(start_month.year, start_month.month, 1, tzinfo=dt_timezone.utc), days,
                       people, teams, models, keys)
    print(f"bulk fill: {args.entries:,} entries over {days} days in {time.perf_counter() - started:.0f} s (COPY)")
    started = time.perf_counter()
    while ledger_rollup(batch_size=200_000):
        pass
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE ledger_dailyrollup")
        cursor.execute("SELECT count(*) FROM ledger_dailyrollup")
        rollups = cursor.fetchone()[0]
    print(f"rollup build: {time.perf_counter() - started:.1f} s, {rollups:,} rollup rows")

    finance = Person.objects.create(username="finance", email="finance@example.com", is_staff=True)
    finance.groups.add(Group.objects.get(name=roles.FINANCE))
    owner = people[0]  # owns Team 0 (bench/ledger.py: team i is owned by person i)
    employee = people[500]  # holds key 500 in Team 100, owns nothing
    client = Client()
    failed = False
    for label, person in (("finance (everything)", finance), ("owner (one team)", owner), ("employee (own)", employee)):
        for query in ("", "?period=90d&granularity=week"):
            first, median = _time_page(client, person, "/ledger/usage/" + query)
            ok = median < TARGET_MS
            failed |= not ok
            print(f"usage page{query or ' (this month, by day)'} for {label}: {median:.0f} ms median of 5 "
                  f"(first {first:.0f} ms)  target < {TARGET_MS} ms {'ok' if ok else 'MISSED'}")
    connections.close_all()
    if not args.keep:
        ledger_bench._admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
