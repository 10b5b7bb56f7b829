"""Writes to the ledger. One entry per relay call, refusals included; bodies only when policy says so."""
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import timezone as dt_timezone
from decimal import Decimal

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, transaction
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


ROLLUP_DIMENSIONS = ("team_id", "person_id", "key_id", "grant_path", "cost_center_id", "alias_id", "provider_model_id",
                     "project", "feature", "environment", "experiment", "error_code")
ROLLUP_MEASURES = ("calls", "refused", "failed", "input_tokens", "output_tokens", "cached_tokens", "cost")
TAG_DIMENSIONS = ("project", "feature", "environment", "experiment")
_FAILED = [LedgerEntry.Outcome.UPSTREAM_ERROR, LedgerEntry.Outcome.CLIENT_ABORT]


def rollup_grain(day, utc_day, dimensions: dict) -> str:
    """A rollup row's identity: its days and every dimension, hashed (None and "" differ)."""
    parts = [str(day), str(utc_day), *("\x00" if dimensions[d] is None else str(dimensions[d]) for d in ROLLUP_DIMENSIONS)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _upsert_rollups(rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT (grain) DO UPDATE adding the measures: one statement per batch, no row read
    back, and two folds at once cannot both insert a grain (the second one adds)."""
    table = connection.ops.quote_name(DailyRollup._meta.db_table)
    columns = ["grain", "day", "utc_day", *ROLLUP_DIMENSIONS, *ROLLUP_MEASURES]
    updates = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in ROLLUP_MEASURES)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 2000):
            batch = rows[start:start + 2000]
            placeholders = ", ".join(["(" + ", ".join(["%s"] * len(columns)) + ")"] * len(batch))
            cursor.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {placeholders} "
                           f"ON CONFLICT (grain) DO UPDATE SET {updates}",
                           [row[c] for row in batch for c in columns])


@transaction.atomic
def ledger_rollup(*, batch_size: int = 500_000) -> int:
    """Fold ledger entries written since the last run into the daily rollups; returns how many were read.
    The database aggregates (GROUP BY the days and every dimension), so only the groups cross the wire, and
    upserts them against the grain. Runs under a row lock, so two runs at once are serial, and the
    high-water mark moves with the sums in the same transaction, so a second run never adds anything twice.
    A beat task's job (every TOLLGATE_ROLLUP_SECONDS), never a web request's."""
    state, _ = RollupState.objects.select_for_update().get_or_create(pk=1)
    newest = LedgerEntry.objects.filter(pk__gt=state.last_entry_id).aggregate(m=Max("pk"))["m"]
    if newest is None:
        return 0
    upto = min(newest, state.last_entry_id + batch_size)
    entries = LedgerEntry.objects.filter(pk__gt=state.last_entry_id, pk__lte=upto)
    groups = (
        entries.annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone()),
                         utc_day=TruncDate("created_at", tzinfo=dt_timezone.utc),
                         **{tag: Coalesce(KeyTextTransform(tag, "tags"), Value(""), output_field=CharField())
                            for tag in TAG_DIMENSIONS})
        .values("day", "utc_day", *ROLLUP_DIMENSIONS)
        .annotate(
            calls_sum=Count("pk", filter=~Q(outcome__in=[LedgerEntry.Outcome.ADJUSTMENT, LedgerEntry.Outcome.REFUSED])),
            refused_sum=Count("pk", filter=Q(outcome=LedgerEntry.Outcome.REFUSED)),
            failed_sum=Count("pk", filter=Q(outcome__in=_FAILED)),
            input_tokens_sum=Sum("input_tokens"), output_tokens_sum=Sum("output_tokens"),
            cached_tokens_sum=Sum("cached_tokens"), cost_sum=Sum("cost"), entries=Count("pk"),
        )
        .order_by()
    )
    read = 0
    rows = []
    for group in groups:
        read += group["entries"]
        dimensions = {d: group[d] for d in ROLLUP_DIMENSIONS}
        for tag in TAG_DIMENSIONS:
            dimensions[tag] = dimensions[tag][:64]
        rows.append({"grain": rollup_grain(group["day"], group["utc_day"], dimensions), "day": group["day"],
                     "utc_day": group["utc_day"], **dimensions, **{m: group[f"{m}_sum"] or 0 for m in ROLLUP_MEASURES}})
    _upsert_rollups(rows)
    state.last_entry_id = upto
    state.save(update_fields=["last_entry_id", "updated_at"])
    if read == 0 and upto < newest:  # a gap in the ids: move on to where the entries are
        return ledger_rollup(batch_size=batch_size)
    return read
