"""The audit trail's one write path (`audit_record`) and its verifier (`audit_verify`)."""
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, models, transaction
from django.utils import timezone

from governance.context import request_id_var, source_ip_var
from governance.models import AuditEvent, Person

GENESIS_HASH = "0" * 64
# Serialises chain appends on PostgreSQL; any constant shared by every writer works.
_CHAIN_LOCK_ID = 0x7011_6A7E


def _jsonable(value: Any) -> Any:
    """Decimals, dates and UUIDs as strings, so the stored JSON reads back exactly as it was hashed."""
    return None if value is None else json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def snapshot(obj: models.Model) -> dict:
    """The audited state of a model instance; fields named in AUDIT_EXCLUDE (secrets) are never copied."""
    excluded = getattr(obj, "AUDIT_EXCLUDE", ())
    state = {}
    for field in obj._meta.concrete_fields:
        if field.name in excluded:
            continue
        state[field.attname] = field.value_from_object(obj)
    return _jsonable(state)


def canonical(event: AuditEvent) -> str:
    return json.dumps(
        {
            "created_at": event.created_at.isoformat(),
            "actor_id": event.actor_id,
            "actor_label": event.actor_label,
            "action": event.action,
            "object_type": event.object_type,
            "object_id": event.object_id,
            "object_repr": event.object_repr,
            "before": event.before,
            "after": event.after,
            "source_ip": event.source_ip,
            "request_id": event.request_id,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def chain_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256((prev_hash + canonical(event)).encode()).hexdigest()


def audit_record(
    *,
    actor: Person | None,
    action: str,
    obj: models.Model | None = None,
    before: dict | None = None,
    after: dict | None = None,
    actor_label: str | None = None,
    source_ip: str | None = None,
    request_id: str | None = None,
) -> AuditEvent:
    """Append one event to the chain, inside the caller's transaction: the change and its event commit
    together or not at all."""
    event = AuditEvent(
        created_at=timezone.now(),
        actor=actor,
        actor_label=actor_label or (actor.get_username() if actor else "system"),
        action=action,
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(obj.pk) if obj is not None and obj.pk is not None else "",
        object_repr=str(obj)[:200] if obj is not None else "",
        before=_jsonable(before),
        after=_jsonable(after),
        source_ip=source_ip if source_ip is not None else source_ip_var.get(),
        request_id=request_id if request_id is not None else request_id_var.get(),
    )
    with transaction.atomic():
        # Two writers reading the same "last hash" would fork the chain. PostgreSQL: a transaction-scoped
        # advisory lock orders appends. SQLite: transactions are IMMEDIATE, so writers are already serial.
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CHAIN_LOCK_ID])
        event.prev_hash = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first() or GENESIS_HASH
        event.hash = chain_hash(event.prev_hash, event)
        event.save(force_insert=True)
    return event


@dataclass(frozen=True)
class ChainBreak:
    event_id: int
    reason: str


def audit_verify() -> tuple[int, ChainBreak | None]:
    """Walk the chain in order; return how many events were checked and the first broken link, if any."""
    expected_prev = GENESIS_HASH
    checked = 0
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        checked += 1
        if event.prev_hash != expected_prev:
            return checked, ChainBreak(event.pk, "previous hash does not match the event before it (an event was removed or reordered)")
        if chain_hash(event.prev_hash, event) != event.hash:
            return checked, ChainBreak(event.pk, "content does not match its hash (the event was altered)")
        expected_prev = event.hash
    return checked, None
