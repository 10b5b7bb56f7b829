"""Shared fixtures. Tests run on the database and Redis that `tollgate test` chose (real servers)."""
import os

import pytest
from django.conf import settings

pytest_plugins = ["tests.support.relay_fixtures"]


def pytest_configure(config):
    # Transactional tests run the relay as it runs (the ledger writer thread, on the `ledger` alias: the
    # test database's mirror); tests inside one transaction write rows on their own connection instead.
    import django.test

    django.test.TransactionTestCase.databases = {"default", "ledger"}
    django.test.TestCase.databases = {"default"}


def _on_postgres() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


def pytest_collection_modifyitems(config, items):
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL (this run is on SQLite)")
    skip_redis = pytest.mark.skip(reason="needs Redis (no REDIS_URL in this run)")
    for item in items:
        if item.get_closest_marker("postgres") and not _on_postgres():
            item.add_marker(skip_pg)
        if item.get_closest_marker("redis") and not os.environ.get("REDIS_URL"):
            item.add_marker(skip_redis)


@pytest.fixture(autouse=True, scope="session")
def _celery_runs_tasks_inline():
    """Tasks queued on commit run at once in tests, so their effects (emails) are visible."""
    from governance.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield


@pytest.fixture(autouse=True, scope="session")
def _ledger_writer_stopped_before_teardown(django_db_setup, django_db_blocker, tmp_path_factory):
    """The ledger journals of this run in a directory of its own (a journal left by an earlier run must
    not be written into this run's database), and the writer thread stopped, its connection closed,
    before the test database is dropped (PostgreSQL refuses to drop a database with open connections)."""
    from ledger import journal, writer

    spool = tmp_path_factory.mktemp("spool")
    settings.TOLLGATE_SPOOL_DIR = spool
    writer._writer.journal = journal.Journal(spool)
    yield
    writer.stop()


@pytest.fixture(autouse=True)
def _audit_head_of_this_test(settings, tmp_path):
    """The audit head outside the table (Redis, the checkpoint file) is per test: an earlier test's head would
    make this test's table look truncated."""
    settings.TOLLGATE_AUDIT_CHECKPOINT_FILE = tmp_path / "audit-checkpoints.jsonl"
    settings.MEDIA_ROOT = tmp_path / "media"  # uploaded cost files
    if os.environ.get("REDIS_URL"):
        from governance.audit import HEAD_KEY
        from governance.redis import get_redis

        client = get_redis()
        if client is not None:
            try:
                client.delete(HEAD_KEY)
            except Exception:  # a test that stops Redis on purpose
                pass
    yield


@pytest.fixture
def person(db):
    from tests.governance.factories import PersonFactory

    return PersonFactory()


@pytest.fixture
def on_postgres() -> bool:
    return _on_postgres()


@pytest.fixture(autouse=True)
def _sqlite_audit_guard(request):
    """SQLite empties tables with DELETE between transactional tests, which the audit table's append-only
    trigger refuses (PostgreSQL uses TRUNCATE). Keep the triggers on during every test; lift them only for
    pytest-django's flush after a transactional one."""
    marker = request.node.get_closest_marker("django_db")
    uses_db = marker is not None or {"db", "transactional_db", "live_server"} & set(request.fixturenames)
    if not uses_db or _on_postgres():
        yield
        return
    from importlib import import_module

    from django.db import connection

    transactional = (marker is not None and marker.kwargs.get("transaction")) or {"transactional_db", "live_server"} & set(request.fixturenames)
    request.getfixturevalue("transactional_db" if transactional else "db")  # set up first, so torn down after us
    migration = import_module("governance.migrations.0002_audit_append_only")
    with connection.cursor() as cursor:
        for statement in migration.SQLITE_FORWARD:
            cursor.execute(statement)
    yield
    if transactional:
        with connection.cursor() as cursor:
            for statement in migration.SQLITE_REVERSE:
                cursor.execute(statement)
