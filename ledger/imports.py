"""Importing provider cost and usage files: the web request only accepts the upload (size-limited, stored
as it streams in); a Celery task reads it (ledger.tasks.import_cost_file). A file is imported whole or not
at all; each UTC day it covers replaces what earlier imports said of that day (providers restate days, and
the same month can come from the API and from an export), and the import's report says what changed."""
import hashlib
import json
import logging
from collections import defaultdict
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import requests
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile, File
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from gateway.models import Provider
from governance.audit import audit_record
from ledger import costfiles
from ledger.models import ProviderCostImport, ProviderCostLine

Status = ProviderCostImport.Status
log = logging.getLogger(__name__)
BATCH = 5000
REPORTED_REJECTIONS = 50


class Refused(Exception):
    """The file cannot be imported; nothing of it is."""


def _digest(file) -> str:
    sha = hashlib.sha256()
    for chunk in file.chunks() if hasattr(file, "chunks") else iter(lambda: file.read(1 << 20), b""):
        sha.update(chunk)
    file.seek(0)
    return sha.hexdigest()


@transaction.atomic
def cost_import_accept(*, provider: Provider, file: File, file_name: str, source: str = "", actor=None) -> ProviderCostImport:
    """Store an uploaded (or fetched) file and queue it to be read. The same file again (by content) is not
    imported twice: the earlier import is returned."""
    if file.size > settings.TOLLGATE_COST_IMPORT_MAX_BYTES:
        raise ValidationError({"file": f"The file is {file.size:,} bytes; the limit is "
                                       f"{settings.TOLLGATE_COST_IMPORT_MAX_BYTES:,} (TOLLGATE_COST_IMPORT_MAX_BYTES)."})
    if not file.size:
        raise ValidationError({"file": "The file is empty."})
    digest = _digest(file)
    existing = ProviderCostImport.objects.filter(provider=provider, sha256=digest).exclude(status=Status.FAILED).first()
    if existing:
        return existing
    record = ProviderCostImport(provider=provider, source=source, file_name=file_name[:200], size=file.size,
                                sha256=digest, uploaded_by=actor)
    record.file.save(file_name[-100:] or "costs", file, save=False)
    record.save()
    audit_record(actor=actor, actor_label=None if actor else "cost import", action="ledger.cost_import.accepted",
                 obj=record, after={"provider": provider.name, "file": record.file_name, "bytes": file.size})
    from ledger.tasks import import_cost_file

    transaction.on_commit(lambda: import_cost_file.delay(record.pk), robust=True)
    return record


def progress_key(record_id: int) -> str:
    return f"cost-import:{record_id}:progress"


def progress(record: ProviderCostImport) -> int:
    """Lines read so far by a running import (kept in the cache: the import's transaction is not visible)."""
    return cache.get(progress_key(record.pk), record.progress)


def cost_import_run(record_id: int) -> ProviderCostImport:
    """Read a stored file: import all its lines, or, if any line is rejected, none (the report lists why)."""
    with transaction.atomic():
        record = ProviderCostImport.objects.select_for_update().select_related("provider").get(pk=record_id)
        if record.status != Status.PENDING:
            return record
        record.status = Status.RUNNING
        record.save(update_fields=["status"])
    try:
        with transaction.atomic():
            Provider.objects.select_for_update().get(pk=record.provider_id)  # one import of a provider at a time
            _read(record)
    except (Refused, Exception) as refusal:
        if not isinstance(refusal, Refused):  # a fault, not the file: said as such, and the import is not left running
            log.exception("cost import %s failed", record.pk)
            refusal = Refused(f"The import failed ({type(refusal).__name__}); nothing was imported. Try again, or "
                              f"tell IT if it fails again.")
        record.status, record.error, record.finished_at = Status.FAILED, str(refusal)[:500], timezone.now()
        record.lines = record.replaced = 0
        record.save()
        audit_record(actor=record.uploaded_by, actor_label=None if record.uploaded_by else "cost import",
                     action="ledger.cost_import.refused", obj=record,
                     after={"file": record.file_name, "read": record.read, "rejected": record.rejected, "why": record.error})
    finally:
        cache.delete(progress_key(record.pk))
    return record


def _read(record: ProviderCostImport) -> None:
    provider = record.provider
    currency = settings.TOLLGATE_CURRENCY.upper()
    with record.file.open("rb") as binary:
        try:
            source, lines = costfiles.open_lines(binary, expected=record.source)
        except costfiles.NotThisKind as error:
            raise Refused(f"This is {error}.") from None
        if not costfiles.accepts(source, provider.kind):
            raise Refused(f"This file is an {ProviderCostImport.Source(source).label} export, which "
                          f"{provider.name} ({provider.get_kind_display()}) does not send.")
        record.source = source
        batch, days, rejections = [], set(), []
        read = rejected = imported = 0
        for number, line in lines:
            read += 1
            why = line if isinstance(line, str) else line.problem()
            if why is None and line.provider and line.provider.lower() != provider.name.lower():
                why = f"the line is for provider {line.provider[:60]!r}, not {provider.name}"
            if why is None and (line.currency or currency) != currency:
                why = f"the amount is in {line.currency[:3]}; Tollgate's currency is {currency} (TOLLGATE_CURRENCY)"
            if why is not None:
                rejected += 1
                if len(rejections) < REPORTED_REJECTIONS:
                    rejections.append({"line": number, "why": why[:200]})
                continue
            if rejected:
                continue  # the file will be refused: keep reading only to count and report
            days.add((line.measure, line.day))
            batch.append(_row(record, line))
            if len(batch) >= BATCH:
                ProviderCostLine.objects.bulk_create(batch)
                imported += len(batch)
                batch = []
                cache.set(progress_key(record.pk), read, timeout=3600)
        record.read, record.rejected = read, rejected
        record.report = {"rejections": rejections}
        if rejected:
            raise Refused(f"{rejected} of {read} lines were rejected (the first: line {rejections[0]['line']}, "
                          f"{rejections[0]['why']}); nothing was imported.")
        if not read:
            raise Refused("The file has no lines.")
        ProviderCostLine.objects.bulk_create(batch)
        imported += len(batch)
    record.report["days"], record.replaced = _restate(record, days)
    record.lines, record.progress, record.status, record.finished_at = imported, read, Status.DONE, timezone.now()
    record.save()
    audit_record(actor=record.uploaded_by, actor_label=None if record.uploaded_by else "cost import",
                 action="ledger.cost_import", obj=record,
                 after={"provider": provider.name, "file": record.file_name, "kind": record.source, "read": read,
                        "imported": imported, "replaced": record.replaced, "days restated": len(record.report["days"])})


def _row(record: ProviderCostImport, line: costfiles.BilledLine) -> ProviderCostLine:
    return ProviderCostLine(
        source_import=record, provider_id=record.provider_id, measure=line.measure, day=line.day, model=line.model[:120],
        project=line.project[:120], description=line.line_item[:200], api_key=line.api_key[:120],
        token_type=line.token_type[:40], service_tier=line.service_tier[:40], currency=line.currency[:3],
        tokens=line.tokens, input_tokens=line.input_tokens, output_tokens=line.output_tokens,
        cached_tokens=line.cached_tokens, amount=line.amount, line_key=line.identity())


def _restate(record: ProviderCostImport, days: set[tuple[str, date]]) -> tuple[list[dict], int]:
    """Lines of earlier imports on the days this file covers give way to its lines. Returns, per day that
    had lines before, what it said before and now, and how many lines were replaced."""
    if not days:
        return [], 0
    by_measure = defaultdict(set)
    for measure, day in days:
        by_measure[measure].add(day)
    covered = Q()
    for measure, measure_days in by_measure.items():
        covered |= Q(measure=measure, day__in=measure_days)
    lines = ProviderCostLine.objects.filter(covered, provider_id=record.provider_id)
    totals = lambda rows: {(r["measure"], r["day"]): r for r in rows.values("measure", "day").order_by()  # noqa: E731
                           .annotate(amount=Sum("amount"), tokens=Sum("tokens"), lines=Count("pk"))}
    before = totals(lines.exclude(source_import=record))
    if not before:
        return [], 0
    after = totals(lines.filter(source_import=record))
    changes = [
        {"day": day.isoformat(), "measure": measure, "lines_before": old["lines"], "lines_now": after[(measure, day)]["lines"],
         "amount_before": _money(old["amount"]), "amount_now": _money(after[(measure, day)]["amount"]),
         "tokens_before": old["tokens"], "tokens_now": after[(measure, day)]["tokens"]}
        for (measure, day), old in sorted(before.items())
    ]
    replaced = sum(old["lines"] for old in before.values())
    lines.exclude(source_import=record).delete()
    return changes, replaced


def _money(amount) -> str:
    return f"{Decimal(amount or 0).quantize(Decimal('0.00000001')):f}"


def cost_import(*, provider: Provider, content: bytes, file_name: str, source: str = "", actor=None) -> ProviderCostImport:
    """Accept and read a file now (the cost API fetch, tests, the command line): the import, or a
    ValidationError on `file` saying why nothing was imported."""
    record = cost_import_accept(provider=provider, file=ContentFile(content, name=file_name), file_name=file_name,
                                source=source, actor=actor)
    record = cost_import_run(record.pk)
    if record.status == Status.FAILED:
        raise ValidationError({"file": record.error})
    return record


COST_API = {"openai": "{base}/organization/costs", "anthropic": "{base}/v1/organizations/cost_report"}


def _month_bounds(month: date) -> tuple[datetime, datetime]:
    first = datetime(month.year, month.month, 1, tzinfo=dt_timezone.utc)
    return first, (first + timedelta(days=32)).replace(day=1)


def fetch_costs(*, provider: Provider, month: date) -> ProviderCostImport:
    """With an admin key configured, fetch the month's costs from the provider's cost API (all pages) and
    import them like an upload. Raises requests' errors when the API fails (the caller retries)."""
    if provider.kind not in COST_API or not provider.admin_key:
        raise ValidationError(f"{provider.name} has no cost API or no admin key configured.")
    first, following = _month_bounds(month)
    url = COST_API[provider.kind].format(base=provider.base_url.rstrip("/"))
    if provider.kind == "openai":
        params = {"start_time": int(first.timestamp()), "end_time": int(following.timestamp()), "bucket_width": "1d",
                  "group_by": ["line_item", "project_id"], "limit": 31}
        headers = {"Authorization": f"Bearer {provider.admin_key}"}
    else:
        params = {"starting_at": first.isoformat().replace("+00:00", "Z"), "ending_at": following.isoformat().replace("+00:00", "Z"),
                  "bucket_width": "1d", "group_by[]": ["description", "workspace_id"], "limit": 31}
        headers = {"x-api-key": provider.admin_key, "anthropic-version": "2023-06-01"}
    buckets, page = [], None
    for _ in range(50):  # bounded: a month is at most a few pages
        response = requests.get(url, params={**params, **({"page": page} if page else {})}, headers=headers, timeout=30)
        response.raise_for_status()
        body = response.json()
        buckets += body.get("data", [])
        page = body.get("next_page")
        if not body.get("has_more") or not page:
            break
    content = json.dumps({"data": buckets}, sort_keys=True).encode()
    return cost_import(provider=provider, file_name=f"{provider.kind}-cost-api-{first:%Y-%m}.json", content=content)

