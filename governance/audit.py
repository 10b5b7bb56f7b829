"""The audit trail's one write path (`audit_record`) and its verifier (`audit_verify`).

Each event carries an HMAC-SHA256 of the previous event's hash and its own content, keyed with
TOLLGATE_AUDIT_KEY (derived from SECRET_KEY when unset): a key that is never in the database, so whoever can
write the table cannot recompute a chain after altering an event. Events written before the chain was keyed
(plain SHA-256) verify as such, and only before the first keyed one.

The newest event's number and hash (the head) are also kept outside the table, signed with the same key: in
Redis after every commit, and in a checkpoint file that beat appends to daily (`audit_checkpoint`). Deleting
the newest events leaves the table's last event behind the head, which `audit_verify` reports.
"""
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, models, transaction
from django.utils import timezone

from governance.context import request_id_var, source_ip_var
from governance.models import AuditEvent, Person

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
HEAD_KEY = "audit:head"  # Redis: {"id", "hash", "mac"} of the newest committed event
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


def _key() -> bytes:
    return (settings.TOLLGATE_AUDIT_KEY or f"audit-chain:{settings.SECRET_KEY}").encode()


def chain_hash(prev_hash: str, event: AuditEvent) -> str:
    return hmac.new(_key(), (prev_hash + canonical(event)).encode(), hashlib.sha256).hexdigest()


def _legacy_hash(prev_hash: str, event: AuditEvent) -> str:
    """How events were chained before the chain was keyed."""
    return hashlib.sha256((prev_hash + canonical(event)).encode()).hexdigest()


def sign_head(event_id: int, event_hash: str) -> dict:
    mac = hmac.new(_key(), f"head:{event_id}:{event_hash}".encode(), hashlib.sha256).hexdigest()
    return {"id": event_id, "hash": event_hash, "mac": mac}


def head_is_signed(head: dict) -> bool:
    expected = sign_head(int(head["id"]), head["hash"])["mac"]
    return hmac.compare_digest(expected, str(head.get("mac", "")))


_PUBLISH_HEAD = """
local current = redis.call('GET', KEYS[1])
if current then
  local id = tonumber(string.match(current, '"id": *(%d+)'))
  if id and id >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def _publish_head(event: AuditEvent) -> None:
    """After commit: the head in Redis moves forward (never back: commits may land out of order)."""
    from governance.redis import get_redis

    client = get_redis()
    if client is None:
        return
    try:
        client.eval(_PUBLISH_HEAD, 1, HEAD_KEY, event.pk, json.dumps(sign_head(event.pk, event.hash)))
    except Exception as exc:  # the daily checkpoint still records the head; verification says what it lacks
        log.warning("could not publish the audit head (%s)", type(exc).__name__)


def stored_heads() -> list[tuple[str, dict]]:
    """The heads kept outside the table: (where, head), newest checkpoint line and Redis."""
    from governance.redis import get_redis

    heads = []
    client = get_redis()
    if client is not None:
        try:
            raw = client.get(HEAD_KEY)
        except Exception:
            raw = None
        if raw:
            heads.append(("redis", json.loads(raw)))
    path = settings.TOLLGATE_AUDIT_CHECKPOINT_FILE
    if path and path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            heads.append((str(path), json.loads(lines[-1])))
    return heads


def audit_checkpoint() -> dict | None:
    """Append the newest event's signed head to the checkpoint file (beat, daily; `manage.py audit_checkpoint`).
    Keep the file where the database's users cannot write (another host, a WORM bucket, a log shipper)."""
    newest = AuditEvent.objects.order_by("-id").values_list("id", "hash").first()
    if newest is None:
        return None
    head = {**sign_head(*newest), "at": timezone.now().isoformat(timespec="seconds")}
    path = settings.TOLLGATE_AUDIT_CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(json.dumps(head) + "\n")
    return head


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
        transaction.on_commit(lambda: _publish_head(event))
    return event


@dataclass(frozen=True)
class ChainBreak:
    event_id: int
    reason: str


def audit_verify() -> tuple[int, ChainBreak | None]:
    """Walk the chain in order, then hold its end against the heads kept outside the table; return how many
    events were checked and the first problem, if any."""
    expected_prev = GENESIS_HASH
    checked, keyed, last = 0, False, None
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        checked += 1
        if event.prev_hash != expected_prev:
            return checked, ChainBreak(event.pk, "previous hash does not match the event before it (an event was removed or reordered)")
        if chain_hash(event.prev_hash, event) == event.hash:
            keyed = True
        elif keyed or _legacy_hash(event.prev_hash, event) != event.hash:
            return checked, ChainBreak(event.pk, "content does not match its hash (the event was altered, or the chain "
                                                 "was recomputed without the audit key)")
        expected_prev, last = event.hash, event
    for where, head in stored_heads():
        if not head_is_signed(head):
            return checked, ChainBreak(int(head.get("id") or 0), f"the head kept in {where} is not signed with the audit key")
        if last is None or last.pk < int(head["id"]):
            return checked, ChainBreak(int(head["id"]), f"events up to #{head['id']} were written ({where}) but the table "
                                                        f"ends at #{last.pk if last else 0}: the newest events were deleted")
        if not AuditEvent.objects.filter(pk=int(head["id"]), hash=head["hash"]).exists():
            return checked, ChainBreak(int(head["id"]), f"event #{head['id']} does not have the hash recorded in {where}")
    return checked, None


def audited_save(obj: models.Model, *, actor, changed: list[str] | None = None) -> models.Model:
    """Validate and save a record IT edits directly (org and catalog: no richer service), with its audit event
    (`<model>.create` or `<model>.update`, before and after, secrets excluded) in the same transaction. The
    admin (AuditedModelAdmin) and the management API both write through this."""
    from django.db import transaction

    with transaction.atomic():
        creating = obj._state.adding
        before = None if creating else snapshot(type(obj).objects.select_for_update().get(pk=obj.pk))
        obj.full_clean()
        obj.save()
        audit_record(actor=actor, action=f"{obj._meta.model_name}.{'create' if creating else 'update'}", obj=obj,
                     before=before, after=snapshot(obj))
    return obj
