"""The ledger writer (group commit, idempotent): a call's row is committed before the call returns, once
however often it is written, kept while the database refuses and written when it is back; one bad row
never costs the others theirs; a dead process's journal is written once; a caller's transaction keeps its
row; a broken connection is replaced."""
import json
import threading
import time
import uuid
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction

from governance.models import BodyLogging
from keys.models import VirtualKey
from ledger import writer
from ledger.models import CallBody, LedgerEntry
from ledger.services import CallRecord, call_row, ledger_record
from tests.keys.factories import VirtualKeyFactory


def record(**overrides) -> CallRecord:
    return CallRecord(request_id=uuid.uuid4().hex, client_ip="127.0.0.1", started=0.0, model_requested="fast",
                      **overrides)


@pytest.mark.django_db(transaction=True)
def test_each_caller_returns_only_after_its_row_is_committed():
    seen_by_caller, errors = [], []

    def caller():
        try:
            entry = ledger_record(record())
            # This thread's own connection is not the writer's: it sees the row only if it is committed.
            seen_by_caller.append(LedgerEntry.objects.filter(request_id=entry.request_id).exists())
        except Exception as exc:  # reported below; a thread's exception would otherwise vanish
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=caller) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and seen_by_caller == [True] * 24
    assert LedgerEntry.objects.count() == 24


@pytest.mark.django_db(transaction=True)
def test_a_row_is_written_with_every_field_as_given():
    entry = ledger_record(record(input_tokens=12, output_tokens=34, cached_tokens=5, cost=Decimal("0.00012345"),
                                 tags={"project": "atlas", "environment": "prod"}, streamed=True, http_status=200,
                                 outcome=LedgerEntry.Outcome.OK, upstream_latency_ms=7, detail="fine"))
    stored = LedgerEntry.objects.get(pk=entry.pk)
    fields = [f.attname for f in LedgerEntry._meta.concrete_fields]
    assert {name: getattr(stored, name) for name in fields} == {name: getattr(entry, name) for name in fields}
    assert stored.tags == {"project": "atlas", "environment": "prod"} and stored.cost == Decimal("0.00012345")


@pytest.mark.django_db(transaction=True)
def test_the_row_of_a_call_whose_key_was_deleted_meanwhile_is_still_written():
    key = VirtualKeyFactory()
    key_id = key.pk
    key.delete()  # no entry points to it yet, so nothing protects it
    entry = ledger_record(record(key=VirtualKey(pk=key_id), person=key.person, team=key.team))
    assert LedgerEntry.objects.filter(pk=entry.pk, key_id=key_id, team=key.team).exists()


@pytest.mark.django_db(transaction=True)
def test_a_body_kept_by_policy_is_written_with_its_entry():
    entry = ledger_record(record(body_mode=BodyLogging.FULL, request_text='{"q": 1}', response_text='{"a": 2}'))
    body = CallBody.objects.get()
    assert body.entry_id == entry.pk and (body.request, body.response) == ('{"q": 1}', '{"a": 2}')


@pytest.mark.django_db(transaction=True)
def test_one_bad_row_in_a_batch_is_set_aside_alone_and_kept(settings, tmp_path):
    from ledger.writer import LedgerWriter, Written

    settings.TOLLGATE_SPOOL_DIR = tmp_path
    good = [Written(call_row(record())) for _ in range(3)]
    bad = Written({**call_row(record()), "outcome": None})  # violates NOT NULL
    batch = [good[0], bad, *good[1:]]
    try:
        LedgerWriter()._flush(batch)
    finally:
        connections["ledger"].close()
    assert all(p.done.is_set() and p.committed for p in batch)
    assert set(LedgerEntry.objects.values_list("request_id", flat=True)) == {p.row["request_id"] for p in good}
    kept = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert [line["row"]["request_id"] for line in kept] == [bad.row["request_id"]]


@pytest.mark.django_db(transaction=True)
def test_a_row_written_twice_is_in_the_ledger_once():
    call = record(cost=Decimal("0.25"))
    row = call_row(call)
    for _ in range(3):  # a retry after an unknown outcome, a journal replayed after a crash
        assert writer.submit(dict(row)).wait(timeout=10)
    assert LedgerEntry.objects.filter(request_id=call.request_id).count() == 1


@pytest.mark.django_db(transaction=True)
def test_rows_wait_while_the_database_refuses_and_are_written_once_it_is_back():
    from django.db import connections as handler

    ledger_db = handler.settings["ledger"]
    real = ledger_db.get("PORT"), ledger_db.get("NAME")
    calls = [record() for _ in range(5)]
    try:
        if handler["default"].vendor == "postgresql":
            ledger_db["PORT"] = "1"  # nothing listens there: every connection attempt is refused
        else:
            ledger_db["NAME"] = "/nonexistent/dir/ledger.sqlite3"
        writer.stop()  # the next batch opens a new connection, as after a database restart
        started = time.monotonic()
        waited = [writer.submit(call_row(call)).wait(timeout=0.5) for call in calls]
        assert waited == [False] * 5 and time.monotonic() - started < 5  # callers are not held up
        assert not LedgerEntry.objects.exists()
    finally:
        ledger_db["PORT"], ledger_db["NAME"] = real
    deadline = time.monotonic() + 15
    while LedgerEntry.objects.count() < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(LedgerEntry.objects.values_list("request_id", flat=True)) == sorted(c.request_id for c in calls)


@pytest.mark.django_db(transaction=True)
def test_a_dead_processs_journal_is_written_once_with_its_lost_calls(tmp_path):
    from ledger import journal as journals

    dead = journals.Journal(tmp_path)
    served, lost, committed = record(cost=Decimal("0.5")), record(), record()
    dead.open(call_row(served))
    dead.row(call_row(served))
    dead.open(call_row(lost))  # the worker died while the provider was answering this one
    ledger_record(committed)  # in the ledger, but its process died before it journaled "done"
    dead.row(call_row(committed))
    for segment in {id(s): s for s in dead._segments.values()}.values():
        segment.close()  # the process is gone: its lock with it

    def write(rows, opened):
        writer._insert(connections["ledger"], [*rows, *((writer._lost_row(row), None) for row in opened)],
                       idle_check=False)

    try:
        assert journals.recover(tmp_path, journals.Journal(tmp_path / "other"), write) == 3
        assert journals.recover(tmp_path, journals.Journal(tmp_path / "other"), write) == 0  # the file is gone
    finally:
        connections["ledger"].close()
    entries = {e.request_id: e for e in LedgerEntry.objects.all()}
    assert len(entries) == LedgerEntry.objects.count() == 3
    assert entries[served.request_id].cost == Decimal("0.5") and entries[served.request_id].outcome == "ok"
    assert (entries[lost.request_id].error_code, entries[lost.request_id].cost) == ("worker_lost", Decimal(0))


def test_a_live_processs_journal_is_left_alone(tmp_path):
    from ledger import journal as journals

    alive = journals.Journal(tmp_path)
    alive.open(call_row(record()))
    touched = []
    assert journals.recover(tmp_path, journals.Journal(tmp_path / "other"), lambda *a: touched.append(a)) == 0
    assert touched == [] and len(list(tmp_path.glob("*.journal"))) == 1
    alive.close()


@pytest.mark.django_db
def test_inside_a_callers_transaction_the_row_commits_or_rolls_back_with_it():
    with pytest.raises(RuntimeError), transaction.atomic():
        ledger_record(record())
        raise RuntimeError("the caller's transaction fails")
    assert not LedgerEntry.objects.exists()
    ledger_record(record())
    assert LedgerEntry.objects.count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_writer_replaces_a_connection_the_database_killed(monkeypatch):
    monkeypatch.setattr(writer, "IDLE_CHECK_SECONDS", 0.0)  # as if the connection had been idle a while
    ledger_record(record())
    with connection.cursor() as cursor:  # kills every other session on the test database, the writer's too
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    ledger_record(record())
    assert LedgerEntry.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_stopped_writer_starts_again_on_the_next_write():
    ledger_record(record())
    writer.stop()
    ledger_record(record())
    assert LedgerEntry.objects.count() == 2


def test_a_journal_that_cannot_be_written_does_not_fail_the_call(tmp_path, caplog):
    from ledger import journal as journals

    (tmp_path / "a-file").write_text("not a directory")
    broken = journals.Journal(tmp_path / "a-file" / "spool")
    broken.open(call_row(record()))  # no exception: the row still goes to the database
    broken.row(call_row(record()))
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1  # said once, loudly
