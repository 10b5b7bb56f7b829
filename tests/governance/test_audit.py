import threading
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction

from governance.audit import GENESIS_HASH, audit_record, audit_verify, chain_hash
from governance.models import AuditEvent
from tests.governance.factories import TeamFactory

pytestmark = pytest.mark.django_db


def _tamper(sql: str, params: list) -> None:
    """Change audit rows behind the triggers' back, as an attacker with table access would."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET session_replication_role = replica")  # disables triggers for this session
            cursor.execute(sql, params)
            cursor.execute("SET session_replication_role = DEFAULT")
        else:
            cursor.execute("DROP TRIGGER governance_auditevent_no_update")
            cursor.execute("DROP TRIGGER governance_auditevent_no_delete")
            cursor.execute(sql, params)
            from importlib import import_module

            for statement in import_module("governance.migrations.0002_audit_append_only").SQLITE_FORWARD:
                cursor.execute(statement)


def _three_events(person):
    team = TeamFactory()
    return [
        audit_record(actor=person, action="team.update", obj=team, before={"name": "a"}, after={"name": "b"}),
        audit_record(actor=None, action="sweep.run", after={"expired": 3}),
        audit_record(actor=person, action="team.update", obj=team, before={"name": "b"}, after={"name": "c"}),
    ]


def test_events_form_a_hash_chain_from_genesis(person):
    first, second, third = _three_events(person)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash and third.prev_hash == second.hash
    stored = AuditEvent.objects.get(pk=second.pk)
    assert chain_hash(stored.prev_hash, stored) == stored.hash  # what was hashed is what reads back
    assert audit_verify() == (3, None)


def test_event_records_who_what_and_where(person, client):
    event = audit_record(actor=person, action="team.update", obj=TeamFactory(), source_ip="10.1.2.3", request_id="req-12345678")
    stored = AuditEvent.objects.get(pk=event.pk)
    assert (stored.actor_label, stored.source_ip, stored.request_id) == (person.username, "10.1.2.3", "req-12345678")
    assert stored.object_type == "governance.team"


def test_altered_event_is_detected(person):
    _, second, _ = _three_events(person)
    _tamper("UPDATE governance_auditevent SET actor_label = %s WHERE id = %s", ["mallory", second.pk])
    checked, broken = audit_verify()
    assert broken.event_id == second.pk and "altered" in broken.reason


def test_removed_event_is_detected(person):
    _, second, third = _three_events(person)
    _tamper("DELETE FROM governance_auditevent WHERE id = %s", [second.pk])
    _, broken = audit_verify()
    assert broken.event_id == third.pk and "removed" in broken.reason


def test_verify_audit_command_reports_first_broken_link(person):
    first, second, _ = _three_events(person)
    out = StringIO()
    call_command("verify_audit", stdout=out)
    assert "3 events verified" in out.getvalue()
    _tamper("UPDATE governance_auditevent SET after = %s WHERE id = %s", ['{"expired": 0}', second.pk])
    with pytest.raises(CommandError, match=f"broken at event #{second.pk}"):
        call_command("verify_audit")


@pytest.mark.parametrize("statement", ["UPDATE governance_auditevent SET action = 'x'", "DELETE FROM governance_auditevent"])
def test_database_refuses_update_and_delete(person, statement):
    _three_events(person)
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement)
    assert AuditEvent.objects.count() == 3
    assert audit_verify()[1] is None


def test_orm_refuses_update_and_delete(person):
    event = _three_events(person)[0]
    event.action = "forged"
    for attempt in (event.save, event.delete, AuditEvent.objects.all().delete, lambda: AuditEvent.objects.update(action="x")):
        with pytest.raises(PermissionError):
            attempt()
    assert AuditEvent.objects.filter(action="forged").count() == 0


def test_audit_event_rolls_back_with_the_change(person):
    team = TeamFactory(name="before")
    with pytest.raises(RuntimeError), transaction.atomic():
        team.name = "after"
        team.save()
        audit_record(actor=person, action="team.update", obj=team)
        raise RuntimeError("the change fails after its event was written")
    assert AuditEvent.objects.count() == 0
    team.refresh_from_db()
    assert team.name == "before"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_never_fork_the_chain():
    def append(n):
        for i in range(10):
            audit_record(actor=None, action="concurrency.probe", after={"thread": n, "i": i})
        connection.close()

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert audit_verify() == (60, None)


# --- A chain you can prove (issue 13): keyed, and its head kept outside the table ---------------------------

@pytest.fixture
def audit_head(settings, tmp_path, django_capture_on_commit_callbacks):
    """Heads go where this test can see them: its own checkpoint file, and Redis emptied of earlier heads."""
    from governance.audit import HEAD_KEY
    from governance.redis import get_redis

    settings.TOLLGATE_AUDIT_CHECKPOINT_FILE = tmp_path / "audit-checkpoints.jsonl"
    client = get_redis()
    if client is not None:
        client.delete(HEAD_KEY)
    return django_capture_on_commit_callbacks


def test_deleting_the_newest_events_is_detected_by_the_checkpoint(person, audit_head):
    _three_events(person)
    head = call_command("audit_checkpoint") or AuditEvent.objects.latest("id")
    newest = AuditEvent.objects.latest("id")
    _tamper("DELETE FROM governance_auditevent WHERE id = %s", [newest.pk])
    _, broken = audit_verify()
    assert broken is not None and "newest events were deleted" in broken.reason, head


def test_deleting_the_newest_events_is_detected_by_the_head_in_redis(person, audit_head):
    from governance.redis import get_redis

    if get_redis() is None:
        pytest.skip("no Redis in this run")
    with audit_head(execute=True):
        events = _three_events(person)
    _tamper("DELETE FROM governance_auditevent WHERE id = %s", [events[-1].pk])
    _, broken = audit_verify()
    assert broken is not None and "newest events were deleted" in broken.reason


def test_a_chain_recomputed_without_the_key_is_detected(person, audit_head):
    from governance.audit import _legacy_hash

    first, second, third = _three_events(person)
    _tamper("UPDATE governance_auditevent SET actor_label = %s WHERE id = %s", ["mallory", second.pk])
    prev = first.hash
    for event in (second, third):  # what an attacker with the table, and the code, but not the key can do
        stored = AuditEvent.objects.get(pk=event.pk)
        stored.prev_hash = prev
        new_hash = _legacy_hash(prev, stored)
        _tamper("UPDATE governance_auditevent SET prev_hash = %s, hash = %s WHERE id = %s", [prev, new_hash, event.pk])
        prev = new_hash
    _, broken = audit_verify()
    assert broken.event_id == second.pk and "without the audit key" in broken.reason


def test_a_forged_head_is_refused(person, audit_head, settings):
    import json

    _three_events(person)
    settings.TOLLGATE_AUDIT_CHECKPOINT_FILE.write_text(json.dumps({"id": 1, "hash": "x", "mac": "forged"}) + "\n")
    _, broken = audit_verify()
    assert broken is not None and "not signed" in broken.reason


def test_events_chained_before_the_key_still_verify(person, audit_head):
    from governance.audit import _legacy_hash

    first, second, third = _three_events(person)
    prev = GENESIS_HASH
    for event in (first, second):  # as written by the unkeyed chain
        stored = AuditEvent.objects.get(pk=event.pk)
        stored.prev_hash = prev
        new_hash = _legacy_hash(prev, stored)
        _tamper("UPDATE governance_auditevent SET prev_hash = %s, hash = %s WHERE id = %s", [prev, new_hash, event.pk])
        prev = new_hash
    stored = AuditEvent.objects.get(pk=third.pk)
    stored.prev_hash = prev
    _tamper("UPDATE governance_auditevent SET prev_hash = %s, hash = %s WHERE id = %s",
            [prev, chain_hash(prev, stored), third.pk])
    assert audit_verify() == (3, None)
