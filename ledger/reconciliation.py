"""Monthly reconciliation: import what providers billed, compare it with the ledger per provider x model x
day, explain what can be explained, and flag spend billed with no ledger traffic (a possible bypass)."""
import csv
import hashlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal, InvalidOperation

import requests
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone

from gateway.models import ModelPrice, Provider
from governance import roles
from governance.audit import audit_record
from governance.notify import email_after_commit
from governance.spreadsheets import safe_cell
from ledger.models import (
    DailyRollup,
    LedgerEntry,
    ProviderCostImport,
    ProviderCostLine,
    Reconciliation,
    ReconciliationLine,
)

Source = ProviderCostImport.Source


@dataclass(frozen=True)
class BilledLine:
    day: date
    model: str
    project: str
    description: str
    tokens: int
    amount: Decimal


def _model_of(text: str) -> str:
    """OpenAI line items read "gpt-4o-mini-2024-07-18, input": the model is before the comma."""
    return (text or "").split(",")[0].strip().lower()


MAX_AMOUNT = Decimal(10) ** 10  # what the amount columns hold (18 digits, 8 after the point)


def parse(source: str, content: bytes) -> list[BilledLine]:
    """The file's lines, or a ValidationError on `file` naming what is wrong (nothing is imported)."""
    lines = _parse(source, content)
    for number, line in enumerate(lines, start=1):
        if not line.amount.is_finite() or abs(line.amount) >= MAX_AMOUNT:
            raise ValidationError({"file": f"Line {number}: the amount {line.amount} is not an amount of money."})
        if not 0 <= line.tokens < 2 ** 31:
            raise ValidationError({"file": f"Line {number}: {line.tokens} is not a token count."})
    return lines


def _parse(source: str, content: bytes) -> list[BilledLine]:
    try:
        if source == Source.OPENAI_COSTS:
            lines = []
            for bucket in json.loads(content)["data"]:
                day = datetime.fromtimestamp(bucket["start_time"], tz=dt_timezone.utc).date()
                for result in bucket.get("results", []):
                    amount = Decimal(str((result.get("amount") or {}).get("value", 0)))
                    item = result.get("line_item") or ""
                    lines.append(BilledLine(day, _model_of(item), result.get("project_id") or "", item, 0, amount))
            return lines
        if source == Source.ANTHROPIC_COSTS:
            lines = []
            for bucket in json.loads(content)["data"]:
                day = datetime.fromisoformat(bucket["starting_at"].replace("Z", "+00:00")).date()
                for result in bucket.get("results", []):
                    # Anthropic reports amounts in the currency's lowest unit (cents), as a decimal string.
                    amount = Decimal(str(result.get("amount", "0"))) / 100
                    lines.append(BilledLine(day, _model_of(result.get("model") or ""), result.get("workspace_id") or "",
                                            result.get("description") or result.get("token_type") or "", 0, amount))
            return lines
        rows = csv.DictReader(io.StringIO(content.decode("utf-8-sig")))
        return [BilledLine(date.fromisoformat(row["date"].strip()[:10]), _model_of(row.get("model", "")),
                           (row.get("project") or "").strip(), "", int(row.get("tokens") or 0), Decimal(row["amount"].strip()))
                for row in rows]
    except (KeyError, ValueError, TypeError, InvalidOperation, json.JSONDecodeError, csv.Error, RecursionError) as exc:
        raise ValidationError({"file": f"This is not a {Source(source).label} file ({type(exc).__name__}: {exc})."}) from None


@transaction.atomic
def cost_import(*, provider: Provider, source: str, file_name: str, content: bytes, actor=None) -> ProviderCostImport:
    """Import a provider's cost file. The same file again, or lines already imported from another file,
    change nothing."""
    digest = hashlib.sha256(content).hexdigest()
    existing = ProviderCostImport.objects.filter(provider=provider, sha256=digest).first()
    if existing:
        return existing
    billed = parse(source, content)
    record = ProviderCostImport.objects.create(provider=provider, source=source, file_name=file_name[:200], sha256=digest,
                                               uploaded_by=actor)
    lines = [
        ProviderCostLine(
            source_import=record, provider=provider, day=b.day, model=b.model[:120], project=b.project[:120],
            description=b.description[:200], tokens=b.tokens, amount=b.amount,
            line_key=hashlib.sha256(f"{provider.pk}|{b.day}|{b.model}|{b.project}|{b.description}|{b.amount}".encode()).hexdigest(),
        )
        for b in billed
    ]
    ProviderCostLine.objects.bulk_create(lines, ignore_conflicts=True)
    record.lines = ProviderCostLine.objects.filter(source_import=record).count()
    record.save(update_fields=["lines"])
    audit_record(actor=actor, actor_label=None if actor else "cost import", action="ledger.cost_import", obj=record,
                 after={"provider": provider.name, "file": file_name, "lines": record.lines, "parsed": len(billed)})
    return record


def _month_range(month: date) -> tuple[date, date]:
    first = month.replace(day=1)
    following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first, following


def _match(billed_model: str, ledger_models: list[str]) -> str | None:
    """The ledger model a billed line belongs to: exact, or the longest ledger name the billed name starts with
    (providers bill dated snapshots: gpt-4o-mini-2024-07-18 for gpt-4o-mini)."""
    candidates = [m for m in ledger_models if billed_model == m or billed_model.startswith(m + "-")]
    return max(candidates, key=len) if candidates else None


def _explain(provider: Provider, model: str, day: date, drift: Decimal, first: date, following: date) -> str:
    reasons = []
    if drift > 0:
        failed = LedgerEntry.objects.filter(
            provider_model__provider=provider, provider_model__name=model, created_at__date=day,
            outcome__in=[LedgerEntry.Outcome.UPSTREAM_ERROR, LedgerEntry.Outcome.CLIENT_ABORT],
        ).count()
        if failed:
            reasons.append(f"{failed} failed, timed-out or aborted calls that day may have been billed")
    cached = DailyRollup.objects.filter(provider_model__provider=provider, provider_model__name=model, day=day,
                                        cached_tokens__gt=0).exists()
    if cached:
        reasons.append("cached-token pricing differs between the catalog and the bill")
    changes = ModelPrice.objects.filter(provider_model__provider=provider, provider_model__name=model,
                                        effective_from__date__gte=first, effective_from__date__lt=following)
    reasons += [f"catalog price changed on {p.effective_from:%Y-%m-%d}" for p in changes]
    return "; ".join(reasons)[:300]


@transaction.atomic
def reconcile(*, provider: Provider, month: date, actor=None) -> Reconciliation:
    """Compare billed and ledger spend per model and day for the month; flag drift over the thresholds
    (TOLLGATE_RECONCILE_DRIFT_ABS and _PCT) and billed spend with no ledger traffic. Finance is alerted when
    the month drifts."""
    first, following = _month_range(month)
    ledger = defaultdict(Decimal)
    for row in (DailyRollup.objects.filter(provider_model__provider=provider, day__gte=first, day__lt=following)
                .values("day", "provider_model__name").annotate(cost=Sum("cost"))):
        ledger[(row["day"], row["provider_model__name"].lower())] += row["cost"]
    ledger_models = sorted({model for _, model in ledger})
    billed = defaultdict(Decimal)
    for row in (ProviderCostLine.objects.filter(provider=provider, day__gte=first, day__lt=following)
                .values("day", "model").annotate(amount=Sum("amount"), n=Count("pk"))):
        billed[(row["day"], _match(row["model"], ledger_models) or row["model"] or "(no model)")] += row["amount"]
    abs_limit, pct_limit = settings.TOLLGATE_RECONCILE_DRIFT_ABS, settings.TOLLGATE_RECONCILE_DRIFT_PCT
    result = Reconciliation.objects.create(provider=provider, month=first, billed=sum(billed.values(), Decimal(0)),
                                           ledger=sum(ledger.values(), Decimal(0)), status=Reconciliation.Status.OK,
                                           created_by=actor)
    lines = []
    for day, model in sorted(set(billed) | set(ledger)):
        billed_amount, ledger_amount = billed.get((day, model), Decimal(0)), ledger.get((day, model), Decimal(0))
        drift = billed_amount - ledger_amount
        explanation = ""
        if billed_amount > 0 and ledger_amount == 0:
            flag = ReconciliationLine.Flag.BYPASS
        elif billed_amount < 0 and ledger_amount == 0:  # a credit or refund: drift, but no bypass, and no ratio
            flag = ReconciliationLine.Flag.DRIFT
            explanation = "a credit or refund from the provider on a day without ledger spend for this model"
        elif ledger_amount > 0 and billed_amount == 0:
            flag = ReconciliationLine.Flag.UNBILLED
        elif ledger_amount and abs(drift) > abs_limit and abs(drift) / abs(ledger_amount) * 100 > pct_limit:
            flag = ReconciliationLine.Flag.DRIFT
        else:
            flag = ReconciliationLine.Flag.OK
        if flag != ReconciliationLine.Flag.OK and not explanation:
            explanation = _explain(provider, model, day, drift, first, following)
        lines.append(ReconciliationLine(reconciliation=result, day=day, model=model, billed=billed_amount, ledger=ledger_amount, flag=flag,
                                        explanation=explanation))
    ReconciliationLine.objects.bulk_create(lines)
    total_drift = abs(result.drift)
    drifted = total_drift > abs_limit and (not result.ledger or total_drift / result.ledger * 100 > pct_limit)
    if drifted or any(line.flag == ReconciliationLine.Flag.BYPASS for line in lines):
        result.status = Reconciliation.Status.DRIFT
        result.save(update_fields=["status"])
        email_after_commit(
            to=roles.people_with_role(roles.FINANCE), subject=f"{provider.name} {first:%Y-%m}: billed and ledger differ",
            body=f"Billed {result.billed:.2f}, ledger {result.ledger:.2f}, drift {result.drift:.2f}. "
                 f"{sum(line.flag == 'bypass' for line in lines)} day/model lines were billed with no ledger traffic.")
    audit_record(actor=actor, actor_label=None if actor else "monthly reconciliation", action="ledger.reconcile",
                 obj=result, after={"billed": result.billed, "ledger": result.ledger, "status": result.status})
    return result


def export_csv(result: Reconciliation) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["Tollgate reconciliation", safe_cell(result.provider.name), f"{result.month:%Y-%m}"])
    writer.writerow(["Billed", f"{result.billed:.2f}", "Ledger", f"{result.ledger:.2f}", "Drift", f"{result.drift:.2f}"])
    writer.writerow([])
    writer.writerow(["Day", "Model", "Billed", "Ledger", "Drift", "Drift %", "Flag", "Explanation"])
    for line in result.lines.all():
        writer.writerow([line.day, safe_cell(line.model), f"{line.billed:.4f}", f"{line.ledger:.4f}", f"{line.drift:.4f}",
                         line.drift_percent if line.drift_percent is not None else "", line.flag, safe_cell(line.explanation)])
    return out.getvalue()


@transaction.atomic
def reconciliation_true_up(*, result: Reconciliation, actor) -> list[LedgerEntry]:
    """Allocate the month's unexplained difference (billed minus ledger) to teams pro rata to their ledger
    spend with this provider, as adjustment entries. A finance user approves it by running it; once only."""
    result = Reconciliation.objects.select_for_update().get(pk=result.pk)
    if not actor.has_perm("ledger.add_ledgerentry"):
        raise PermissionDenied("Only finance may true up.")
    if result.trued_up_at:
        raise ValidationError("This reconciliation was already trued up.")
    difference = result.billed - result.ledger
    if not difference:
        raise ValidationError("Nothing to true up: billed equals the ledger.")
    first, following = _month_range(result.month)
    shares = list(DailyRollup.objects.filter(provider_model__provider=result.provider, day__gte=first, day__lt=following)
                  .values("team_id", "team__cost_center_id").annotate(cost=Sum("cost")).order_by("team_id"))
    base = sum((s["cost"] for s in shares), Decimal(0))
    if not base:
        raise ValidationError("No ledger spend to allocate against.")
    entries, allocated = [], Decimal(0)
    when = timezone.make_aware(datetime.combine(following - timedelta(days=1), datetime.min.time()).replace(hour=23, minute=59))
    for i, share in enumerate(shares):
        amount = (difference * share["cost"] / base).quantize(Decimal("0.00000001")) if i < len(shares) - 1 else difference - allocated
        allocated += amount
        entry = LedgerEntry(request_id=f"trueup-{result.pk}-{share['team_id'] or 0}", created_at=when, team_id=share["team_id"],
                            cost_center_id=share["team__cost_center_id"], cost=amount, outcome=LedgerEntry.Outcome.ADJUSTMENT,
                            http_status=0, detail=f"true-up of {result.provider.name} {result.month:%Y-%m} (reconciliation #{result.pk})")
        entry.save(force_insert=True)
        entries.append(entry)
    result.trued_up_by, result.trued_up_at = actor, timezone.now()
    result.save(update_fields=["trued_up_by", "trued_up_at"])
    audit_record(actor=actor, action="ledger.true_up", obj=result,
                 after={"difference": difference, "teams": len(entries)})
    return entries


COST_API = {
    "openai": ("{base}/organization/costs", Source.OPENAI_COSTS),
    "anthropic": ("{base}/v1/organizations/cost_report", Source.ANTHROPIC_COSTS),
}


def fetch_costs(*, provider: Provider, month: date) -> ProviderCostImport:
    """With an admin key configured, fetch the month's costs from the provider's cost API (all pages) and
    import them like an upload."""
    if provider.kind not in COST_API or not provider.admin_key:
        raise ValidationError(f"{provider.name} has no cost API or no admin key configured.")
    first, following = _month_range(month)
    url, source = COST_API[provider.kind]
    url = url.format(base=provider.base_url.rstrip("/"))
    if provider.kind == "openai":
        params = {"start_time": int(datetime(first.year, first.month, 1, tzinfo=dt_timezone.utc).timestamp()),
                  "end_time": int(datetime(following.year, following.month, 1, tzinfo=dt_timezone.utc).timestamp()),
                  "bucket_width": "1d", "group_by": "line_item", "limit": 31}
        headers = {"Authorization": f"Bearer {provider.admin_key}"}
    else:
        params = {"starting_at": f"{first}T00:00:00Z", "ending_at": f"{following}T00:00:00Z", "bucket_width": "1d",
                  "group_by[]": "description", "limit": 31}
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
    return cost_import(provider=provider, source=source, file_name=f"{provider.kind}-cost-api-{first:%Y-%m}.json", content=content)
