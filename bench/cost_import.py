"""bench/cost_import: a provider cost CSV of 1,000,000 lines imported as finance does, on PostgreSQL.

    .venv/bin/python -m bench.cost_import [--lines 1000000]

Writes a generic cost CSV (31 days, 40 models, 20 projects, 50 API keys), accepts it as the upload page does
(the request's part: store the file, queue the task), then reads it as the worker does (ledger.imports.
cost_import_run) in a child process, while this process plays the import page: every second it reads the
progress the page shows and times a query of the kind the relay's web worker runs meanwhile. Prints the
accept time, the import time, lines per second, the progress seen, and the slowest concurrent query, then
imports the same month again with one day restated (replace, not add). Target (issue 14): the web request
returns in well under a second whatever the size; the page shows progress while the worker reads.
"""
import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DB_NAME = "tollgate_cost_import_bench"
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _env(media: str) -> None:
    os.environ.update({
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}", "DEBUG": "false", "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "bench-only-" + "k" * 50, "TOLLGATE_ENCRYPTION_KEYS": "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg=",
        "SECURE_SSL_REDIRECT": "false", "DJANGO_SETTINGS_MODULE": "governance.settings", "TIME_ZONE": "UTC",
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"), "TOLLGATE_MEDIA_DIR": media,
        "CELERY_BROKER_URL": "memory://", "TOLLGATE_COST_IMPORT_MAX_BYTES": str(1 << 31),
    })


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)


def write_csv(path: Path, lines: int, *, restate_day: int | None = None) -> int:
    rng = random.Random(14)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["date", "provider", "model", "project", "api_key", "token_type", "tokens", "amount", "currency"])
        for i in range(lines):
            day = 1 + i % 31
            if restate_day is not None and day != restate_day:
                continue
            writer.writerow([f"2026-10-{day:02d}", "Bench", f"model-{i % 40}", f"proj_{i % 20}", f"key_{i % 50}",
                             ("input", "output", "cached input")[i % 3], rng.randint(1, 50_000), f"{rng.randint(1, 99_999) / 10_000:.4f}",
                             "USD"])
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    media = os.environ.get("BENCH_MEDIA_DIR") or tempfile.mkdtemp(prefix="tollgate-bench-media-")
    _env(media)
    if args.child:
        import django

        django.setup()
        from ledger.imports import cost_import_run

        record = cost_import_run(args.child)
        print(f"child: {record.status} {record.error}", file=sys.stderr)
        return
    _admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    _admin(f"CREATE DATABASE {DB_NAME}")
    import django

    django.setup()
    from django.core.files import File
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    from gateway.models import Provider
    from ledger.imports import cost_import_accept, progress
    from ledger.models import ProviderCostImport, ProviderCostLine

    provider = Provider.objects.create(name="Bench", kind="openai", base_url="http://127.0.0.1:9/v1")
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-csv-"))
    results = {}
    for label, kwargs in [("full month", {}), ("one day restated", {"restate_day": 10})]:
        path = work / f"{label.replace(' ', '-')}.csv"
        size = write_csv(path, args.lines, **kwargs)
        started = time.perf_counter()
        with path.open("rb") as handle:
            record = cost_import_accept(provider=provider, file=File(handle, name=path.name), file_name=path.name)
        accepted = time.perf_counter() - started
        child = subprocess.Popen([sys.executable, "-m", "bench.cost_import", "--child", str(record.pk)],
                                 env={**os.environ, "BENCH_MEDIA_DIR": media})
        started, seen, slowest = time.perf_counter(), [], 0.0
        while child.poll() is None:
            time.sleep(1)
            record.refresh_from_db()
            seen.append((round(time.perf_counter() - started), progress(record)))
            query = time.perf_counter()
            with connection.cursor() as cursor:  # what a relay call reads meanwhile: a key lookup
                cursor.execute("SELECT count(*) FROM ledger_providercostline WHERE provider_id = %s AND day = '2026-10-01' "
                               "AND measure = 'cost' AND line_key = 'x'", [provider.pk])
            slowest = max(slowest, time.perf_counter() - query)
        elapsed = time.perf_counter() - started
        record.refresh_from_db()
        total = ProviderCostLine.objects.filter(provider=provider).count()
        results[label] = (size, accepted, elapsed, record, total, seen, slowest)
    for label, (size, accepted, elapsed, record, total, seen, slowest) in results.items():
        print(f"{label}: {size / 1e6:.1f} MB, {record.read:,} lines read, {record.lines:,} imported, "
              f"{record.replaced:,} replaced, {record.rejected} rejected, status {record.status}")
        print(f"  accept (the web request's part): {accepted * 1000:.0f} ms; import by the worker: {elapsed:.1f} s "
              f"({record.read / elapsed:,.0f} lines/s); lines in the table after: {total:,}")
        shown = seen[:: max(1, len(seen) // 8)]
        print(f"  progress the page showed (s, lines): {shown}; slowest concurrent query: {slowest * 1000:.1f} ms")
    assert ProviderCostImport.objects.filter(status="done").count() == 2
    connection.close()
    _admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
