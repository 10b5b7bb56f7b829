"""The ledger writer (group commit): a call's row is committed before the call returns, one bad row never
costs the others theirs, a caller's transaction keeps its row, and a broken connection is replaced."""
import threading
import uuid
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction

from governance.models import BodyLogging
from keys.models import VirtualKey
from ledger import writer
from ledger.models import CallBody, LedgerEntry
from ledger.services import CallRecord, ledger_record
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
def test_one_bad_row_in_a_batch_fails_only_its_own_call():
    from ledger.writer import LedgerWriter, Written

    good = [Written(LedgerEntry(**_entry_fields()), None) for _ in range(3)]
    bad = Written(LedgerEntry(**{**_entry_fields(), "outcome": None}), None)  # violates NOT NULL
    batch = [good[0], bad, *good[1:]]
    try:
        LedgerWriter()._flush(batch)
    finally:
        connection.close()
    assert all(p.done.is_set() for p in batch)
    assert isinstance(bad.error, IntegrityError) and all(p.error is None for p in good)
    assert set(LedgerEntry.objects.values_list("request_id", flat=True)) == {p.entry.request_id for p in good}


def _entry_fields() -> dict:
    return {"request_id": uuid.uuid4().hex, "created_at": record().created_at, "outcome": LedgerEntry.Outcome.OK,
            "http_status": 200}


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
