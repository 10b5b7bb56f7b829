"""Writes to the ledger. One entry per relay call, refusals included; bodies only when policy says so."""
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import CharField, Count, Max, Q, Sum, Value
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from governance.audit import audit_record
from governance.models import BodyLogging
from ledger import writer
from ledger.models import CallBody, DailyRollup, LedgerEntry, RollupState
from ledger.redaction import redact_body


@dataclass
class CallRecord:
    """Everything the relay learned about one call, filled in as the call proceeds."""

    request_id: str
    client_ip: str | None
    started: float
    created_at: object = field(default_factory=timezone.now)
    key: object = None
    person: object = None
    team: object = None
    cost_center: object = None
    grant: object = None
    grant_path: str = ""
    tags: dict = field(default_factory=dict)
    model_requested: str = ""
    alias: object = None
    provider_model: object = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_ms: int = 0
    upstream_latency_ms: int | None = None
    outcome: str = LedgerEntry.Outcome.OK
    http_status: int = 200
    error_code: str = ""
    detail: str = ""
    streamed: bool = False
    body_mode: str = BodyLogging.OFF
    request_text: str = ""
    response_text: str = ""
    finished: bool = False  # its row has been handed to the ledger: a call is written once, never twice


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """Text PostgreSQL (and UTF-8) can store: NUL and lone surrogates, which a client can put in a model name,
    a tag or a prompt and a provider in a reply, become U+FFFD instead of failing the ledger insert."""
    return _UNSTORABLE.sub("\ufffd", text) if not text.isascii() or "\x00" in text else text


def _id(obj) -> int | None:
    return obj.pk if obj is not None else None


def call_row(record: CallRecord) -> dict:
    """The call's ledger row, column by column (ledger.writer.COLUMNS): the one mapping from what the relay
    learned to what the ledger stores."""
    return {
        "request_id": record.request_id, "created_at": record.created_at, "key_id": _id(record.key),
        "person_id": _id(record.person), "team_id": _id(record.team), "grant_id": _id(record.grant),
        "grant_path": record.grant_path, "cost_center_id": _id(record.cost_center),
        "tags": {storable(str(k)): storable(str(v)) for k, v in record.tags.items()},
        "model_requested": storable(record.model_requested[:120]), "alias_id": _id(record.alias),
        "provider_model_id": _id(record.provider_model), "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens, "cached_tokens": record.cached_tokens, "cost": record.cost,
        "latency_ms": record.latency_ms, "upstream_latency_ms": record.upstream_latency_ms,
        "outcome": record.outcome, "http_status": record.http_status, "error_code": record.error_code[:40],
        "detail": storable(record.detail[:200]), "client_ip": record.client_ip, "streamed": record.streamed,
    }


def call_body(record: CallRecord) -> dict | None:
    """The call's prompt and response, when policy keeps them (redacted when it says so)."""
    if record.body_mode == BodyLogging.OFF or not record.request_text:
        return None
    clean = redact_body if record.body_mode == BodyLogging.REDACTED else (lambda text: text)
    return {"mode": record.body_mode, "request": storable(clean(record.request_text)),
            "response": storable(clean(record.response_text))}


def ledger_call_opened(record: CallRecord) -> None:
    """Journal what is known of a call that has started (again when admission learned more), so that if
    its process dies before the row is written, the next process writes this one, marked as lost."""
    writer.journal_open(call_row(record))


def ledger_record_submit(record: CallRecord) -> writer.Written:
    """Hand one call's row to the ledger writer, once: `wait()` on the result for its commit."""
    if record.finished:
        raise RuntimeError(f"request {record.request_id} is already in the ledger")
    record.finished = True
    return writer.submit(call_row(record), call_body(record))


def ledger_record(record: CallRecord) -> LedgerEntry:
    """Write one call's entry (and its body when policy keeps it) and return it, committed."""
    written = ledger_record_submit(record)
    if not written.wait(timeout=30):
        raise TimeoutError(f"the ledger row of {record.request_id} is journaled, not yet committed")
    return LedgerEntry.objects.get(request_id=record.request_id, created_at=record.created_at)


def call_bodies_purge(*, older_than_days: int, batch_size: int = 5000) -> int:
    """Delete stored bodies past retention, in batches so the table is never locked for long."""
    cutoff = timezone.now() - timezone.timedelta(days=older_than_days)
    deleted = 0
    while True:
        ids = list(CallBody.objects.filter(created_at__lt=cutoff).values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted
        deleted += CallBody.objects.filter(pk__in=ids).delete()[0]


@transaction.atomic
def ledger_adjust(*, entry: LedgerEntry, amount: Decimal, reason: str, actor) -> LedgerEntry:
    """A correction: a new entry that references the one it corrects, with the same attribution, so
    chargeback moves the money where the original was charged. Finance only; audited."""
    if not actor.has_perm("ledger.add_ledgerentry"):
        raise PermissionDenied("Only finance may adjust the ledger.")
    if not reason.strip():
        raise ValidationError({"reason": "Say why the entry is adjusted."})
    if amount == 0:
        raise ValidationError({"amount": "An adjustment of zero changes nothing."})
    adjustment = LedgerEntry(
        request_id=f"adj-{uuid.uuid4().hex[:24]}", created_at=timezone.now(), key=entry.key, person=entry.person,
        team=entry.team, grant=entry.grant, grant_path=entry.grant_path, cost_center=entry.cost_center, tags=entry.tags,
        model_requested=entry.model_requested, alias=entry.alias, provider_model=entry.provider_model, cost=amount,
        outcome=LedgerEntry.Outcome.ADJUSTMENT, http_status=0, detail=reason.strip()[:200], corrects=entry,
    )
    adjustment.save(force_insert=True)
    audit_record(actor=actor, action="ledger.adjust", obj=adjustment,
                 after={"corrects": entry.request_id, "amount": amount, "reason": reason.strip()})
    return adjustment


ROLLUP_DIMENSIONS = ("team_id", "person_id", "key_id", "cost_center_id", "provider_model_id",
                     "project", "feature", "environment", "experiment")
TAG_DIMENSIONS = ("project", "feature", "environment", "experiment")


@transaction.atomic
def ledger_rollup(*, batch_size: int = 500_000) -> int:
    """Fold ledger entries written since the last run into the daily rollups; returns how many were read.
    The database aggregates (GROUP BY day and every dimension), so only the groups cross the wire. Runs
    under a row lock, so two runs at once are serial, and the high-water mark moves with the sums in the
    same transaction, so a second run never adds anything twice."""
    state, _ = RollupState.objects.select_for_update().get_or_create(pk=1)
    newest = LedgerEntry.objects.filter(pk__gt=state.last_entry_id).aggregate(m=Max("pk"))["m"]
    if newest is None:
        return 0
    upto = min(newest, state.last_entry_id + batch_size)
    entries = LedgerEntry.objects.filter(pk__gt=state.last_entry_id, pk__lte=upto)
    groups = (
        entries.annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone()),
                         **{tag: Coalesce(KeyTextTransform(tag, "tags"), Value(""), output_field=CharField())
                            for tag in TAG_DIMENSIONS})
        .values("day", *ROLLUP_DIMENSIONS)
        .annotate(
            calls=Count("pk", filter=~Q(outcome=LedgerEntry.Outcome.ADJUSTMENT)),
            refused=Count("pk", filter=Q(outcome=LedgerEntry.Outcome.REFUSED)),
            input_tokens_sum=Sum("input_tokens"), output_tokens_sum=Sum("output_tokens"),
            cached_tokens_sum=Sum("cached_tokens"), cost_sum=Sum("cost"), entries=Count("pk"),
        )
        .order_by()
    )
    read = 0
    sums = {}
    for group in groups:
        read += group["entries"]
        sums[(group["day"], *(group[d] for d in ROLLUP_DIMENSIONS))] = {
            "calls": group["calls"], "refused": group["refused"], "input_tokens": group["input_tokens_sum"],
            "output_tokens": group["output_tokens_sum"], "cached_tokens": group["cached_tokens_sum"], "cost": group["cost_sum"],
        }
    existing = {
        (row.day, *(getattr(row, d) for d in ROLLUP_DIMENSIONS)): row
        for row in DailyRollup.objects.select_for_update().filter(day__in={key[0] for key in sums})
    }
    new_rows = []
    for key, bucket in sums.items():
        row = existing.get(key)
        if row is None:
            new_rows.append(DailyRollup(day=key[0], **dict(zip(ROLLUP_DIMENSIONS, key[1:])), **bucket))
            continue
        for measure, value in bucket.items():
            setattr(row, measure, getattr(row, measure) + value)
        row.save(update_fields=list(bucket))
    DailyRollup.objects.bulk_create(new_rows, batch_size=5000)
    state.last_entry_id = upto
    state.save(update_fields=["last_entry_id", "updated_at"])
    if read == 0 and upto < newest:  # a gap in the ids: move on to where the entries are
        return ledger_rollup(batch_size=batch_size)
    return read
