"""Fixtures for the reliability tests: the production web tier started with extra environment (a factory,
so each test says its pool, timeout and worker count), a burst's ledger counted on the test database, and a
throwaway PostgreSQL cluster a test may stop and start. The relay, stub provider and key fixtures come from
tests/support/relay_fixtures.py."""
import logging
import socket
import subprocess
import time

import pytest
import redis
from django.conf import settings

from budgets import enforcement
from governance import redis as shared_redis
from tests.reliability.harness import LedgerCount, PostgresCluster, WebTier, start_web_tier, wait_for_ledger


@pytest.fixture(autouse=True)
def _quiet_sdk_logs():
    """The SDK logs every request at INFO: hundreds of lines per burst that would drown the counts."""
    loggers = [logging.getLogger(name) for name in ("httpx2", "httpx", "openai")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def served_database_url() -> str:
    """The URL of the database pytest-django set up for this run (the same logic as the `gunicorn` fixture)."""
    db = settings.DATABASES["default"]
    if not db["ENGINE"].endswith("postgresql"):
        pytest.skip("the web tier runs on PostgreSQL only")
    user = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    socket_dir = db.get("OPTIONS", {}).get("host")  # pgserver's unix socket
    return (f"postgres://{user}@/{db['NAME']}?host={socket_dir}" if socket_dir
            else f"postgres://{user}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}")


@pytest.fixture
def web_tier(tmp_path_factory):
    """Start the production web tier: `web_tier(workers=2, database_url=None, **env)`.

    Every tier gets its own TOLLGATE_SPOOL_DIR (a fresh temp dir) and log file (`tier.log_path`); extra
    keyword arguments are environment variables (DATABASE_POOL_MAX_SIZE=4, DATABASE_POOL_TIMEOUT=1, ...).
    Without `database_url` it serves the test database, so the test must commit its data (`relay`, which
    this test requests first, brings transactional_db). All tiers are stopped after the test."""
    started: list[WebTier] = []

    def start(*, workers: int = 2, database_url: str | None = None, **env) -> WebTier:
        home = tmp_path_factory.mktemp("web-tier")
        tier = start_web_tier(
            database_url=database_url or served_database_url(), spool_dir=home / "spool", log_path=home / "gunicorn.log",
            base_env={"SECRET_KEY": settings.SECRET_KEY,
                      "TOLLGATE_ENCRYPTION_KEYS": ",".join(settings.TOLLGATE_ENCRYPTION_KEYS)},
            workers=workers, env=env)
        started.append(tier)
        return tier

    yield start
    for tier in reversed(started):
        tier.stop()


def ledger_fetch(ids: list[str]) -> tuple[list[dict], int]:
    """The rows of these request ids on the test database, and the number of rows in the ledger."""
    from ledger.models import LedgerEntry
    from tests.reliability.harness import ROW_COLUMNS

    rows = list(LedgerEntry.objects.filter(request_id__in=ids).order_by().values(*ROW_COLUMNS))
    return rows, LedgerEntry.objects.count()


@pytest.fixture
def ledger_count():
    """`ledger_count(ids, timeout=10)`: wait for the rows of these request ids on the test database, then count them."""

    def count(ids: list[str], *, timeout: float = 10.0) -> LedgerCount:
        return wait_for_ledger(ledger_fetch, ids, timeout=timeout)

    return count


@pytest.fixture
def postgres_cluster():
    """A throwaway PostgreSQL cluster, initialised and started; stopped and deleted after the test."""
    try:
        cluster = PostgresCluster().init()
    except RuntimeError as exc:
        pytest.skip(f"cannot run a throwaway PostgreSQL here: {exc}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


class ThrowawayRedis:
    """A redis-server of this test's own on a free port, without persistence."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        probe.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def restart_empty(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def throwaway_redis(settings):
    server = ThrowawayRedis()
    server.start()
    settings.REDIS_URL = server.url
    shared_redis._client.cache_clear()
    try:
        yield server
    finally:
        try:
            for reservation in enforcement.open_reservations():  # nothing of this test is put back elsewhere
                enforcement.release(reservation)
        finally:
            server.stop()
            shared_redis._client.cache_clear()  # `settings` restores REDIS_URL after this
