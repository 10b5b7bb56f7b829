"""How fast IT's key console (the virtual-key admin) answers on a large table: every view under 1 s.

Run from the repository root: ``.venv/bin/python -m bench.keys_admin [--keys N] [--explain]`` (default
1,000,000 keys; see bench/keys_admin.md). It creates a throwaway PostgreSQL database, migrates it, loads
N keys across 200 teams and 2,000 people with COPY, runs VACUUM ANALYZE, then times the real admin views
through django.test.Client as a logged-in superuser (median of 3 runs each) and drops the database.
Everything connects to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

HOST = "127.0.0.1"
DB_NAME = "tollgate_keys_bench"
PG_ADMIN_DSN = f"host={HOST} port=5432 user=postgres dbname=postgres"
PG_BENCH_DSN = f"host={HOST} port=5432 user=postgres dbname={DB_NAME}"

TARGET_SECONDS = 1.0
RUNS = 3
TEAMS = 200
PEOPLE = 2000
COPY_CHUNK = 10_000
OLD_TEAM_KEYS = 50
MAX_KEYS = 10_000_000
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

KEYS_URL = "/admin/keys/virtualkey/"


def configure_environment(var_dir: str) -> None:
    """Production-like settings with throwaway secrets; must run before Django reads its settings."""
    from cryptography.fernet import Fernet

    for name in list(os.environ):
        if name.startswith(("TOLLGATE_", "DATABASE_", "CELERY_", "REDIS_", "DJANGO_")):
            del os.environ[name]
    os.environ.update(
        DJANGO_SETTINGS_MODULE="governance.settings",
        DATABASE_URL=f"postgres://postgres@{HOST}:5432/{DB_NAME}",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(50),
        TOLLGATE_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        TOLLGATE_VAR_DIR=var_dir,
        SECURE_SSL_REDIRECT="false",
        SESSION_COOKIE_SECURE="false",
        CSRF_COOKIE_SECURE="false",
        ALLOWED_HOSTS="testserver",
        EMAIL_URL="dummymail://",
        LOG_LEVEL="WARNING",
    )


def database_create() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")


def database_drop() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


# --- data ---------------------------------------------------------------------------------------

def create_people_and_teams() -> tuple[list[int], list[int]]:
    from governance.models import CostCenter, Department, Person, Team

    department = Department.objects.create(name="Bench", slug="bench")
    cost_center = CostCenter.objects.create(code="CC-BENCH", name="Bench", department=department)
    people = Person.objects.bulk_create(
        [Person(username=f"bench{i}", email=f"bench{i}@example.com", password="!") for i in range(PEOPLE)],
        batch_size=COPY_CHUNK,
    )
    teams = Team.objects.bulk_create(
        [Team(name=f"Team {i:03d}", slug=f"team-{i:03d}", department=department, cost_center=cost_center,
              owner=people[i * (PEOPLE // TEAMS)]) for i in range(TEAMS)]
    )
    return [p.pk for p in people], [t.pk for t in teams]


KEY_COLUMNS = ("name", "prefix", "key_hash", "signing_secret_encrypted", "person_id", "team_id", "key_class", "status",
               "ip_allowlist", "default_tags", "body_logging", "expires_at", "last_used_at", "created_at",
               "approved_by_policy")


def key_rows(n: int, people: list[int], teams: list[int], now: datetime, rng: random.Random):
    """Tab-separated COPY lines. Roughly: 70% active, 5% suspended, 15% expired, 10% revoked; created over
    two years; active keys expire within 90 days (10% never); 40% never used; 5% service keys; 20%
    production; 60% provisioned by policy."""
    statuses = rng.choices(["active", "suspended", "expired", "revoked"], weights=[70, 5, 15, 10], k=n)
    day = 86400.0
    for i in range(n):
        status = statuses[i]
        created = now - timedelta(seconds=rng.random() * 730 * day)
        if status == "active":
            expires = None if rng.random() < 0.1 else now + timedelta(seconds=rng.uniform(0.01, 90) * day)
        elif status == "expired":
            expires = min(created + timedelta(days=30), now - timedelta(seconds=rng.random() * day))
        else:
            expires = created + timedelta(days=90)
        used = None if rng.random() < 0.4 else created + (now - created) * rng.random()
        person = r"\N" if rng.random() < 0.05 else str(people[rng.randrange(len(people))])
        yield "\t".join((
            f"key {i}", "tg_l_" + "".join(rng.choices(ALPHABET, k=7)),
            hashlib.sha256(f"bench-key-{i}".encode()).hexdigest(), "", person, str(teams[rng.randrange(len(teams))]),
            "production" if rng.random() < 0.2 else "experimentation", status, "[]", "{}", "",
            expires.isoformat() if expires else r"\N", used.isoformat() if used else r"\N", created.isoformat(),
            "t" if rng.random() < 0.6 else "f",
        )) + "\n"


def load_keys(n: int, people: list[int], teams: list[int]) -> None:
    import psycopg

    rng = random.Random(20240601)
    now = datetime.now(UTC)
    copy_sql = f"COPY keys_virtualkey ({', '.join(KEY_COLUMNS)}) FROM STDIN"
    with psycopg.connect(PG_BENCH_DSN, connect_timeout=5) as conn, conn.cursor() as cursor:
        with cursor.copy(copy_sql) as copy:
            chunk = io.StringIO()
            # The last team gets no random keys: it holds only the oldest ones (below).
            for done, line in enumerate(key_rows(n, people, teams[:-1], now, rng), start=1):
                chunk.write(line)
                if done % COPY_CHUNK == 0:
                    copy.write(chunk.getvalue())
                    chunk = io.StringIO()
                    if done % 100_000 == 0:
                        print(f"  {done:,} keys", flush=True)
            copy.write(chunk.getvalue())
        conn.commit()
    with psycopg.connect(PG_BENCH_DSN, autocommit=True, connect_timeout=5) as conn:
        # A skewed team as real ones are: a few keys, all old. Walking the created_at index for its first
        # page would pass every newer key; the planner must pick the team index instead.
        conn.execute("UPDATE keys_virtualkey SET team_id = %s WHERE id IN "
                     "(SELECT id FROM keys_virtualkey ORDER BY created_at LIMIT %s)", [teams[-1], OLD_TEAM_KEYS])
        conn.execute("VACUUM (ANALYZE) keys_virtualkey")
        conn.execute("ANALYZE")


# --- timing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    label: str
    url: str
    runs: list[float]
    rows: int | None  # rows listed on a changelist page

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def time_view(client, label: str, url: str, *, explain: bool) -> Timing:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    runs, rows = [], 0
    for _ in range(RUNS):
        started = time.perf_counter()
        response = client.get(url)
        runs.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"{label}: {url} answered {response.status_code} {response.get('Location', '')}")
        rows = response.content.count(b'name="_selected_action"') if "/change/" not in url else None
    if explain:
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        print(f"\n--- {label}: {url}")
        with connection.cursor() as cursor:
            for query in queries.captured_queries:
                sql = query["sql"]
                if "keys_virtualkey" not in sql or not sql.lstrip().upper().startswith("SELECT"):
                    continue
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
                print(f"{float(query['time']) * 1000:7.1f} ms  {sql[:160]}")
                print("\n".join("           " + row[0] for row in cursor.fetchall()[:12]))
    return Timing(label, url, runs, rows)


def proposed_indexes():
    """The indexes bench/keys_admin.md proposes for keys.VirtualKey.Meta.indexes (not in the models yet)."""
    from django.db import models

    return [
        models.Index(fields=["key_class", "-created_at"], name="key_class_created_idx"),
        models.Index(fields=["approved_by_policy", "-created_at"], name="key_policy_created_idx"),
        models.Index(fields=["status", "last_used_at"], name="key_status_last_used_idx"),
    ]


def run(n: int, explain: bool, with_proposed: bool) -> list[Timing]:
    import django
    from django.core.management import call_command
    from django.test import Client
    from django.test.utils import override_settings

    django.setup()
    from governance.models import Person
    from keys import services
    from keys.models import VirtualKey

    started = time.perf_counter()
    call_command("migrate", verbosity=0)
    print(f"migrated in {time.perf_counter() - started:.1f}s; loading {n:,} keys", flush=True)
    started = time.perf_counter()
    people, teams = create_people_and_teams()
    if with_proposed:
        from django.db import connection

        with connection.schema_editor() as editor:
            for index in proposed_indexes():
                editor.add_index(VirtualKey, index)
        print("created the proposed indexes", flush=True)
    load_keys(n, people, teams)
    print(f"loaded and analysed in {time.perf_counter() - started:.1f}s", flush=True)

    admin_user = Person.objects.create_superuser("bench-admin", "bench-admin@example.com", secrets.token_urlsafe(16))
    sample = VirtualKey.objects.filter(status="active", person__isnull=False).order_by("-id").first()
    # Some history for the change page, written as IT would: through the lifecycle services.
    services.key_suspend(key=sample, actor=admin_user, reason="bench: suspicious traffic")
    services.key_reactivate(key=sample, actor=admin_user, reason="bench: false alarm")
    services.key_extend(key=sample, actor=admin_user, days=30, reason="bench: project extended")

    team = teams[len(teams) // 2]
    last_page = max(1, -(-n // 100))
    page = min(500, last_page)
    views = [
        ("changelist, first page", KEYS_URL),
        (f"changelist, page {page}", f"{KEYS_URL}?p={page}"),
        ("filter status=active", f"{KEYS_URL}?status__exact=active"),
        ("filter expires within 7 days", f"{KEYS_URL}?expires_within=7"),
        ("filter unused for 30 days", f"{KEYS_URL}?unused=30"),
        ("filter team", f"{KEYS_URL}?team__id__exact={team}"),
        (f"filter team ({OLD_TEAM_KEYS} oldest keys)", f"{KEYS_URL}?team__id__exact={teams[-1]}"),
        ("filter key class=production", f"{KEYS_URL}?key_class__exact=production"),
        ("filter provisioned by approver", f"{KEYS_URL}?provisioned_by=approver"),
        ("filter service keys", f"{KEYS_URL}?holder=service"),
        ("search key prefix", f"{KEYS_URL}?q={sample.prefix}"),
        ("search key name", f"{KEYS_URL}?q={quote(sample.name)}"),
        ("search holder email", f"{KEYS_URL}?q={quote(sample.person.email)}"),
        ("change page (with history)", f"{KEYS_URL}{sample.pk}/change/"),
    ]
    client = Client()
    client.force_login(admin_user)
    # Static files are served by whitenoise from a collected manifest in production; none is collected here.
    with override_settings(STORAGES={"default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
                                     "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}):
        return [time_view(client, label, url, explain=explain) for label, url in views]


def report(n: int, timings: list[Timing]) -> bool:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nVirtual-key admin, {n:,} keys, PostgreSQL, median of {RUNS} (target < {TARGET_SECONDS:.0f} s each); "
          f"load average {load} on {os.cpu_count()} CPUs")
    print(f"{'view':34} {'median':>8}  {'runs (s)':24} {'rows':>5}  verdict")
    ok = True
    for t in timings:
        met = t.median < TARGET_SECONDS
        ok &= met
        runs = " ".join(f"{r:.3f}" for r in t.runs)
        rows = "-" if t.rows is None else t.rows
        print(f"{t.label:34} {t.median:7.3f}s  {runs:24} {rows:>5}  {'ok' if met else 'MISSED'}")
    print("all views under target" if ok else "SOME VIEWS MISSED THE TARGET")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="how many keys to load (default 1,000,000)")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of each view's key queries")
    parser.add_argument("--proposed-indexes", action="store_true",
                        help="also create the indexes proposed in bench/keys_admin.md before loading")
    args = parser.parse_args(argv)
    if not 1 <= args.keys <= MAX_KEYS:
        parser.error(f"--keys must be between 1 and {MAX_KEYS:,}")

    warnings.filterwarnings("ignore", message="No directory at")  # whitenoise: no collected static files here
    with tempfile.TemporaryDirectory(prefix="tollgate-keys-bench-") as var_dir:
        configure_environment(var_dir)
        database_create()
        try:
            timings = run(args.keys, args.explain, args.proposed_indexes)
        finally:
            from django.db import connections

            connections.close_all()
            database_drop()
            print(f"dropped database {DB_NAME}")
    return 0 if report(args.keys, timings) else 1


if __name__ == "__main__":
    sys.exit(main())
