"""Monthly reconciliation: what a provider billed (ledger.imports) against the ledger, per UTC day and
catalog model (providers bill by UTC day, whatever TIME_ZONE is). Billed names reach catalog models only
through the billed names table; anything else is its own line, flagged as spend that may have bypassed
Tollgate. A difference is explained only when the evidence shows its cause; what stays unexplained is what
a true-up allocates to teams, once per provider and month."""
import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F, Sum
from django.utils import timezone

from gateway.catalog import billed_model_matcher
from gateway.models import ModelPrice, Provider
from governance import roles
from governance.audit import audit_record
from governance.notify import email_after_commit
from governance.spreadsheets import safe_cell
from governance.webhooks import reconciliation_payload, webhook_emit
from ledger.models import DailyRollup, LedgerEntry, ProviderCostLine, Reconciliation, ReconciliationLine, TrueUp

Flag = ReconciliationLine.Flag
EIGHT_PLACES = Decimal("0.00000001")
MTOK = Decimal(1_000_000)


def month_range(month: date) -> tuple[date, date]:
    first = month.replace(day=1)
    return first, (first + timedelta(days=32)).replace(day=1)


@dataclass
class _Cell:
    """One UTC day and model: what the bill and the ledger say."""

    billed: Decimal = Decimal(0)
    billed_cached: Decimal | None = None  # the bill's cached-input lines, when it has any
    billed_tokens: int | None = None  # from the provider's usage file
    billed_as: set = None
    ledger: Decimal = Decimal(0)
    ledger_tokens: int = 0
    cached_tokens: int = 0
    failed: int = 0

    def __post_init__(self):
        self.billed_as = set()


def _is_cached_line(line: dict) -> bool:
    text = f"{line['description']} {line['token_type']}".lower()
    return "cache" in text and "write" not in text and "creation" not in text


def _cells(provider: Provider, first: date, following: date) -> dict[tuple[date, str], _Cell]:
    match = billed_model_matcher(provider)
    cells: dict[tuple[date, str], _Cell] = defaultdict(_Cell)
    for row in (DailyRollup.objects.filter(provider_model__provider=provider, utc_day__gte=first, utc_day__lt=following)
                .values("utc_day", "provider_model__name")
                .annotate(cost=Sum("cost"), input=Sum("input_tokens"), output=Sum("output_tokens"),
                          cached=Sum("cached_tokens"), failed_calls=Sum("failed")).order_by()):
        cell = cells[(row["utc_day"], row["provider_model__name"])]
        cell.ledger += row["cost"]
        cell.ledger_tokens += row["input"] + row["output"]
        cell.cached_tokens += row["cached"]
        cell.failed += row["failed_calls"]
    lines = (ProviderCostLine.objects.filter(provider=provider, day__gte=first, day__lt=following)
             .values("measure", "day", "model", "description", "token_type").annotate(amount=Sum("amount"), tokens=Sum("tokens"))
             .order_by())
    for line in lines:
        model = match(line["model"]) or line["model"] or "(no model)"
        cell = cells[(line["day"], model)]
        cell.billed_as.add(line["model"] or "(no model)")
        if line["measure"] == ProviderCostLine.Measure.USAGE:
            cell.billed_tokens = (cell.billed_tokens or 0) + line["tokens"]
            continue
        cell.billed += line["amount"]
        if _is_cached_line(line):
            cell.billed_cached = (cell.billed_cached or Decimal(0)) + line["amount"]
    return cells


def _explain(provider: Provider, model: str, day: date, cell: _Cell, prices: dict) -> str:
    """Causes the evidence shows, or nothing."""
    drift = cell.billed - cell.ledger
    reasons = []
    if drift > 0 and cell.failed:
        reasons.append(f"{cell.failed} failed, timed-out or aborted calls that day may have been billed")
    if cell.billed_cached is not None:
        price = next((p for p in prices.get(model, []) if p.effective_from.date() <= day), None)
        ledger_cached = (Decimal(cell.cached_tokens) * price.cached_input_per_mtok / MTOK) if price else None
        if ledger_cached is not None:
            cached_gap = cell.billed_cached - ledger_cached
            if cached_gap and (cached_gap > 0) == (drift > 0) and abs(cached_gap) * 2 >= abs(drift):
                reasons.append(f"the bill's cached-input lines are {cell.billed_cached:.4f} where the ledger's "
                               f"{cell.cached_tokens:,} cached tokens at the catalog's cached price make {ledger_cached:.4f}")
    if cell.billed_tokens is not None and cell.billed_tokens != cell.ledger_tokens and \
            (cell.billed_tokens > cell.ledger_tokens) == (drift > 0):
        reasons.append(f"the provider counted {cell.billed_tokens:,} tokens, the ledger {cell.ledger_tokens:,}")
    for price in prices.get(model, []):
        if abs((price.effective_from.astimezone(dt_timezone.utc).date() - day).days) <= 1:
            reasons.append(f"the catalog price changed on {price.effective_from:%Y-%m-%d}")
    return "; ".join(reasons)[:300]


@transaction.atomic
def reconcile(*, provider: Provider, month: date, actor=None) -> Reconciliation:
    """Compare billed and ledger spend per UTC day and catalog model for the month (from the rollups: the
    caller folds the ledger first, as the beat task does). Flags drift over TOLLGATE_RECONCILE_DRIFT_ABS and
    _PCT, billed spend with no ledger traffic, and ledger traffic not billed; finance is told when a month
    does not reconcile."""
    first, following = month_range(month)
    cells = _cells(provider, first, following)
    prices = defaultdict(list)
    for price in ModelPrice.objects.filter(provider_model__provider=provider).select_related("provider_model") \
            .order_by("-effective_from"):
        prices[price.provider_model.name].append(price)
    abs_limit, pct_limit = settings.TOLLGATE_RECONCILE_DRIFT_ABS, settings.TOLLGATE_RECONCILE_DRIFT_PCT
    result = Reconciliation.objects.create(provider=provider, month=first, billed=Decimal(0), ledger=Decimal(0),
                                           status=Reconciliation.Status.OK, created_by=actor)
    lines = []
    for (day, model), cell in sorted(cells.items()):
        drift = cell.billed - cell.ledger
        explanation = ""
        if cell.billed > 0 and cell.ledger == 0:
            flag = Flag.BYPASS
            result.bypass += cell.billed
        elif cell.billed < 0 and cell.ledger == 0:  # a credit or refund: no ratio to take
            flag = Flag.DRIFT
            explanation = "a credit or refund from the provider on a day without ledger spend for this model"
        elif cell.ledger and not cell.billed:
            flag = Flag.UNBILLED
        elif cell.ledger and abs(drift) > abs_limit and abs(drift) / abs(cell.ledger) * 100 > pct_limit:
            flag = Flag.DRIFT
        else:
            flag = Flag.OK
        if flag in (Flag.DRIFT, Flag.UNBILLED) and not explanation:
            explanation = _explain(provider, model, day, cell, prices)
        if flag != Flag.BYPASS:
            if explanation:
                result.explained += drift
            else:
                result.unexplained += drift
        result.billed += cell.billed
        result.ledger += cell.ledger
        lines.append(ReconciliationLine(
            reconciliation=result, day=day, model=model[:120], billed_as=", ".join(sorted(cell.billed_as))[:300],
            billed=cell.billed, ledger=cell.ledger, billed_tokens=cell.billed_tokens, ledger_tokens=cell.ledger_tokens,
            flag=flag, explanation=explanation))
    ReconciliationLine.objects.bulk_create(lines, batch_size=2000)
    unexplained = abs(result.unexplained)
    over = unexplained > abs_limit and (not result.ledger or unexplained / abs(result.ledger) * 100 > pct_limit)
    if over or any(line.flag != Flag.OK for line in lines):
        result.status = Reconciliation.Status.DRIFT
        email_after_commit(
            to=roles.people_with_role(roles.FINANCE), subject=f"{provider.name} {first:%Y-%m}: billed and ledger differ",
            body=f"Billed {result.billed:.2f}, ledger {result.ledger:.2f}: {result.bypass:.2f} billed with no ledger "
                 f"traffic (possible bypass), {result.explained:.2f} explained, {result.unexplained:.2f} unexplained.")
    result.save()
    audit_record(actor=actor, actor_label=None if actor else "monthly reconciliation", action="ledger.reconcile",
                 obj=result, after={"billed": result.billed, "ledger": result.ledger, "bypass": result.bypass,
                                    "unexplained": result.unexplained, "status": result.status})
    webhook_emit("reconciliation.finished", reconciliation_payload(result))
    return result


def export_csv(result: Reconciliation) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["Tollgate reconciliation", safe_cell(result.provider.name), f"{result.month:%Y-%m}", "UTC days",
                     settings.TOLLGATE_CURRENCY])
    writer.writerow(["Billed", f"{result.billed:.2f}", "Ledger", f"{result.ledger:.2f}", "Drift", f"{result.drift:.2f}"])
    writer.writerow(["Possible bypass", f"{result.bypass:.2f}", "Explained", f"{result.explained:.2f}",
                     "Unexplained", f"{result.unexplained:.2f}"])
    writer.writerow([])
    writer.writerow(["Day (UTC)", "Model", "Billed as", "Billed", "Ledger", "Drift", "Drift %", "Billed tokens",
                     "Ledger tokens", "Flag", "Explanation"])
    for line in result.lines.all():
        writer.writerow([line.day, safe_cell(line.model), safe_cell(line.billed_as), f"{line.billed:.4f}", f"{line.ledger:.4f}",
                         f"{line.drift:.4f}", line.drift_percent if line.drift_percent is not None else "",
                         "" if line.billed_tokens is None else line.billed_tokens, line.ledger_tokens,
                         line.get_flag_display(), safe_cell(line.explanation)])
    return out.getvalue()


# --- true-up ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    day: date
    model: str
    provider_model_id: int
    team_id: int | None
    cost_center_id: int | None
    amount: Decimal


def true_up_plan(result: Reconciliation) -> list[Allocation]:
    """What a true-up would write: each unexplained line's difference, split between the teams that spent
    on that model that day, pro rata to their ledger spend (the last share takes the rounding remainder,
    so the allocations add up exactly). Bypass lines and explained lines are not allocated."""
    plan = []
    for line in result.lines.exclude(flag=Flag.BYPASS).filter(explanation="").exclude(billed=F("ledger")):
        shares = list(DailyRollup.objects.filter(provider_model__provider=result.provider_id, provider_model__name=line.model,
                                                 utc_day=line.day)
                      .values("team_id", "cost_center_id", "provider_model_id").annotate(cost=Sum("cost"))
                      .filter(cost__gt=0).order_by("team_id", "cost_center_id", "provider_model_id"))
        base = sum((share["cost"] for share in shares), Decimal(0))
        if not base:
            continue
        allocated = Decimal(0)
        for i, share in enumerate(shares):
            last = i == len(shares) - 1
            amount = line.drift - allocated if last else (line.drift * share["cost"] / base).quantize(EIGHT_PLACES)
            allocated += amount
            plan.append(Allocation(line.day, line.model, share["provider_model_id"], share["team_id"], share["cost_center_id"], amount))
    return plan


def _latest(result: Reconciliation) -> bool:
    return not Reconciliation.objects.filter(provider=result.provider_id, month=result.month, created_at__gt=result.created_at).exists()


def reconciliation_true_up(*, result: Reconciliation, actor) -> TrueUp:
    """Write the plan as adjustment entries dated on their UTC days, so a re-run of the reconciliation sees
    them and reports nothing unexplained. Finance only; once per provider and month (a database
    constraint: two approvals at once cannot both land) until reversed."""
    if not actor.has_perm("ledger.add_ledgerentry"):
        raise PermissionDenied("Only finance may true up.")
    try:
        with transaction.atomic():
            return _true_up(result, actor)
    except IntegrityError:
        raise ValidationError(f"{result.provider} {result.month:%Y-%m} was already trued up.") from None


def _true_up(result: Reconciliation, actor) -> TrueUp:
    done = TrueUp.objects.filter(provider=result.provider_id, month=result.month, reversed_at__isnull=True).first()
    if done:
        raise ValidationError(f"{result.provider} {result.month:%Y-%m} was already trued up (true-up #{done.pk} by "
                              f"{done.created_by} on {done.created_at:%Y-%m-%d}); reverse it first to true up again.")
    if not _latest(result):
        raise ValidationError("A newer reconciliation of this month exists: true up from that one.")
    plan = true_up_plan(result)
    if not plan:
        raise ValidationError("Nothing unexplained to true up.")
    total = sum((a.amount for a in plan), Decimal(0))
    true_up = TrueUp.objects.create(provider_id=result.provider_id, month=result.month, reconciliation=result,
                                    amount=total, entries=len(plan), created_by=actor)
    detail = f"true-up #{true_up.pk} of {result.provider.name} {result.month:%Y-%m} (reconciliation #{result.pk})"
    LedgerEntry.objects.bulk_create([
        LedgerEntry(request_id=f"trueup-{true_up.pk}-{n}", created_at=datetime.combine(a.day, time(12), tzinfo=dt_timezone.utc),
                    team_id=a.team_id, cost_center_id=a.cost_center_id, provider_model_id=a.provider_model_id, cost=a.amount,
                    outcome=LedgerEntry.Outcome.ADJUSTMENT, http_status=0, detail=detail)
        for n, a in enumerate(plan)
    ], batch_size=2000)
    audit_record(actor=actor, action="ledger.true_up", obj=true_up,
                 after={"reconciliation": result.pk, "amount": total, "entries": len(plan)})
    return true_up


@transaction.atomic
def true_up_reverse(*, true_up: TrueUp, actor) -> int:
    """Counter-entries for every entry of a true-up; the month can then be trued up again."""
    if not actor.has_perm("ledger.add_ledgerentry"):
        raise PermissionDenied("Only finance may reverse a true-up.")
    true_up = TrueUp.objects.select_for_update().get(pk=true_up.pk)
    if true_up.reversed_at:
        raise ValidationError("This true-up was already reversed.")
    first, following = month_range(true_up.month)
    originals = LedgerEntry.objects.filter(
        created_at__gte=datetime.combine(first, time(0), tzinfo=dt_timezone.utc),
        created_at__lt=datetime.combine(following, time(0), tzinfo=dt_timezone.utc),
        outcome=LedgerEntry.Outcome.ADJUSTMENT, request_id__startswith=f"trueup-{true_up.pk}-")
    counters = [
        LedgerEntry(request_id=f"trueup-{true_up.pk}-reversal-{n}", created_at=entry.created_at, team_id=entry.team_id,
                    cost_center_id=entry.cost_center_id, provider_model_id=entry.provider_model_id, cost=-entry.cost,
                    outcome=LedgerEntry.Outcome.ADJUSTMENT, http_status=0, corrects=entry,
                    detail=f"reversal of true-up #{true_up.pk}")
        for n, entry in enumerate(originals.exclude(request_id__contains="-reversal-").order_by("pk"))
    ]
    LedgerEntry.objects.bulk_create(counters, batch_size=2000)
    true_up.reversed_by, true_up.reversed_at = actor, timezone.now()
    true_up.save(update_fields=["reversed_by", "reversed_at"])
    audit_record(actor=actor, action="ledger.true_up.reverse", obj=true_up, after={"entries": len(counters), "amount": -true_up.amount})
    return len(counters)


def plan_by_team(plan: list[Allocation]) -> list[dict]:
    """The plan summed by team, for the confirmation page."""
    from governance.models import Team

    totals = defaultdict(lambda: {"amount": Decimal(0), "entries": 0})
    for allocation in plan:
        totals[allocation.team_id]["amount"] += allocation.amount
        totals[allocation.team_id]["entries"] += 1
    teams = Team.objects.in_bulk([t for t in totals if t])
    return [{"team": teams.get(team_id), **values} for team_id, values in sorted(totals.items(), key=lambda kv: kv[0] or 0)]
