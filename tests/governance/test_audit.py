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
