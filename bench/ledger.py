"""bench/ledger: the ledger at scale on PostgreSQL.

    .venv/bin/python -m bench.ledger [--entries 10000000]

Fills a fresh database with ENTRIES ledger rows over three months (2,000 people, 200 teams, 20 models,
tags) and prints: the insert rate of the relay's ledger writer, the rollup build time, the time to roll up
one day's entries, the monthly chargeback by team and by person (from rollups, with the CSV export), and
the bytes per ledger row on disk with indexes. Targets (issue 6): chargeback by team < 2 s, by person
< 5 s; < 400 bytes per row; a day's rollup < 10 s.
"""
import argparse
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

DB_NAME = "tollgate_ledger_bench"
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _env() -> None:
    os.environ.update({
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}", "DEBUG": "false", "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "bench-only-" + "k" * 50, "TOLLGATE_ENCRYPTION_KEYS": "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg=",
        "SECURE_SSL_REDIRECT": "false", "DJANGO_SETTINGS_MODULE": "governance.settings", "TIME_ZONE": "UTC",
    })
    os.environ.pop("REDIS_URL", None)


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)


def _dimensions():
    from gateway.models import Provider, ProviderModel
    from governance.models import CostCenter, Department, Person, Team
    from keys.models import VirtualKey

    depts = Department.objects.bulk_create([Department(name=f"Dept {i}", slug=f"dept-{i}") for i in range(10)])
    ccs = CostCenter.objects.bulk_create([CostCenter(code=f"CC-{i:03d}", name=f"CC {i}", department=depts[i % 10]) for i in range(50)])
    people = Person.objects.bulk_create([Person(username=f"p{i}", email=f"p{i}@example.com") for i in range(2000)])
    teams = Team.objects.bulk_create([Team(name=f"Team {i}", slug=f"team-{i}", department=depts[i % 10], cost_center=ccs[i % 50],
                                           owner=people[i]) for i in range(200)])
    provider = Provider.objects.create(name="Bench", kind="openai", base_url="http://127.0.0.1:9/v1")
    models = ProviderModel.objects.bulk_create([ProviderModel(provider=provider, name=f"model-{i}") for i in range(20)])
    keys = VirtualKey.objects.bulk_create([VirtualKey(name=f"k{i}", prefix=f"tg_l_{i:07d}", key_hash=uuid.uuid4().hex * 2,
                                                      person=people[i], team=teams[i % 200]) for i in range(2000)])
    return people, teams, models, keys


def _writer_rate(people, teams, models, keys, calls: int, threads: int) -> float:
    """The relay's own ledger write (ledger_record), as many threads as a web worker would run."""
    from django.db import connection
    from django.utils import timezone

    from ledger.services import CallRecord, ledger_record

    def one(i):
        key = keys[i % len(keys)]
        ledger_record(CallRecord(request_id=uuid.uuid4().hex, client_ip="10.0.0.1", started=0, created_at=timezone.now(),
                                 key=key, person=people[i % len(people)], team=teams[i % len(teams)],
                                 cost_center=teams[i % len(teams)].cost_center, tags={"project": "bench", "environment": "prod"},
                                 model_requested="fast", provider_model=models[i % 20], input_tokens=500, output_tokens=200,
                                 cost=Decimal("0.00123400"), latency_ms=420, upstream_latency_ms=400, http_status=200))
        connection.close_if_unusable_or_obsolete()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    return calls / (time.perf_counter() - started)


COLUMNS = ["request_id", "created_at", "key_id", "person_id", "team_id", "grant_path", "cost_center_id", "tags",
           "model_requested", "provider_model_id", "input_tokens", "output_tokens", "cached_tokens", "cost", "latency_ms",
           "upstream_latency_ms", "outcome", "http_status", "error_code", "detail", "streamed"]


def _fill(entries: int, start: datetime, days: int, people, teams, models, keys) -> None:
    """COPY a realistic mix (3% refused, project and environment tags, costs by model), as text lines."""
    import psycopg

    rng = random.Random(7)
    per_second = entries / (days * 86400)
    base = start.timestamp()
    run = uuid.uuid4().hex[:8]
    tags = [f'{{"project": "proj-{k % 60}", "environment": "{"prod" if k % 3 else "dev"}"}}' for k in range(2000)]
    key_rows = [(keys[k].pk, people[k].pk, teams[k % 200].pk, teams[k % 200].cost_center_id) for k in range(2000)]
    model_ids = [m.pk for m in models]
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}") as conn, conn.cursor() as cur:
        with cur.copy(f"COPY ledger_ledgerentry ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            chunk = []
            for i in range(entries):
                k = rng.randrange(2000)
                key_id, person_id, team_id, cc_id = key_rows[k]
                # People stick to a model or two: mostly their key's usual one, sometimes the next.
                model = model_ids[(k + (rng.random() < 0.2)) % 20]
                refused = rng.random() < 0.03
                tokens_in, tokens_out = rng.randrange(50, 4000), (0 if refused else rng.randrange(10, 1500))
                cost = 0 if refused else (tokens_in + 4 * tokens_out) * (model % 5 + 1)
                when = datetime.fromtimestamp(base + i / per_second, tz=dt_timezone.utc).isoformat()
                chunk.append(
                    f"{run}{i:024x}\t{when}\t{key_id}\t{person_id}\t{team_id}\t\t{cc_id}\t{tags[k]}\tfast\t{model}\t"
                    f"{tokens_in}\t{tokens_out}\t0\t{cost / 1_000_000:.8f}\t400\t380\t{'refused' if refused else 'ok'}\t"
                    f"{429 if refused else 200}\t{'rate_limit_exceeded' if refused else ''}\t\tf\n")
                if len(chunk) == 10000:
                    copy.write("".join(chunk))
                    chunk = []
            copy.write("".join(chunk))
        conn.commit()
        cur.execute("ANALYZE ledger_ledgerentry")


def _bytes_per_row() -> tuple[float, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree('ledger_ledgerentry')")
        size = cursor.fetchone()[0]
        cursor.execute("SELECT count(*) FROM ledger_ledgerentry")
        rows = cursor.fetchone()[0]
    return size / rows, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--writer-calls", type=int, default=20_000)
    args = parser.parse_args()
    _env()
    _admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    _admin(f"CREATE DATABASE {DB_NAME}")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from ledger import chargeback as cb
    from ledger import partitions
    from ledger.services import ledger_rollup

    people, teams, models, keys = _dimensions()
    today = date.today()
    start_month = (today.replace(day=1) - timedelta(days=62)).replace(day=1)
    partitions.ensure_partitions(start=start_month)
    rate1 = _writer_rate(people, teams, models, keys, args.writer_calls // 4, threads=1)
    rate8 = _writer_rate(people, teams, models, keys, args.writer_calls, threads=8)
    print(f"ledger writer (the relay's INSERT): {rate1:,.0f} rows/s from one thread, {rate8:,.0f} rows/s from 8 threads")

    days = (today - start_month).days
    started = time.perf_counter()
    _fill(args.entries, datetime(start_month.year, start_month.month, 1, tzinfo=dt_timezone.utc), days, people, teams, models, keys)
    print(f"bulk fill: {args.entries:,} entries over {days} days in {time.perf_counter() - started:.0f} s (COPY)")
    per_row, rows = _bytes_per_row()
    print(f"bytes per ledger row on disk, with indexes: {per_row:.0f}  (target < 400; {rows:,} rows)")

    started = time.perf_counter()
    while ledger_rollup(batch_size=200_000):
        pass
    build = time.perf_counter() - started
    print(f"rollup build: {build:.1f} s for {rows:,} entries ({rows / build:,.0f} entries/s)")
    day_entries = args.entries // days
    _fill(day_entries, datetime(today.year, today.month, today.day, tzinfo=dt_timezone.utc), 1, people, teams, models, keys)
    started = time.perf_counter()
    while ledger_rollup(batch_size=200_000):
        pass
    print(f"rollup of one day's entries ({day_entries:,}): {time.perf_counter() - started:.1f} s  (target < 10 s)")

    month_start = (start_month.replace(day=28) + timedelta(days=4)).replace(day=1)
    month_end = (month_start.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
    for group, target in (("team", 2), ("person", 5)):
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            report = cb.chargeback(start=month_start, end=month_end, group_by=[group])
            cb.export(report, "csv")
            timings.append(time.perf_counter() - started)
        print(f"monthly chargeback by {group} ({len(report.lines):,} lines, total {report.total}) with CSV: "
              f"{sorted(timings)[1]:.2f} s median of 3  (target < {target} s)")
    from django.db import connections

    connections.close_all()
    _admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
