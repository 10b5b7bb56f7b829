"""Chargeback: spend for a date range grouped by any of department, cost center, team, project, person,
model, provider and tags, read from the daily rollups. Amounts are rounded to cents so that the lines add
up exactly to the total, and the total equals the ledger sum for the period to the cent."""
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal

import tablib
from django.conf import settings
from django.db.models import Sum
from django.utils import timezone
from import_export.formats.base_formats import CSV, XLSX

from governance.spreadsheets import safe_cell
from ledger.models import DailyRollup

CENT = Decimal("0.01")
UNATTRIBUTED = "(unattributed)"
GROUPS = {
    "department": ("team__department__name", "Department"),
    "cost_center": ("cost_center__code", "Cost center"),
    "team": ("team__slug", "Team"),
    "project": ("project", "Project"),
    "person": ("person__username", "Person"),
    "model": ("provider_model__name", "Model"),
    "provider": ("provider_model__provider__name", "Provider"),
    "feature": ("feature", "Feature"),
    "environment": ("environment", "Environment"),
    "experiment": ("experiment", "Experiment"),
}
FORMATS = {"csv": CSV, "xlsx": XLSX}


@dataclass(frozen=True)
class Line:
    groups: tuple[str, ...]
    calls: int
    input_tokens: int
    output_tokens: int
    exact: Decimal
    amount: Decimal  # in cents, allocated so the lines sum to the rounded total


@dataclass(frozen=True)
class Chargeback:
    start: date
    end: date
    group_by: tuple[str, ...]
    lines: list[Line]
    exact_total: Decimal
    total: Decimal
    generated_at: datetime


def _allocate(exact: list[Decimal], total: Decimal) -> list[Decimal]:
    """Round each line to cents, then hand the leftover cents to the lines with the largest remainders."""
    floors = [(value / CENT).to_integral_value(rounding="ROUND_FLOOR") * CENT for value in exact]
    leftover = int(((total - sum(floors, Decimal(0))) / CENT).to_integral_value())
    order = sorted(range(len(exact)), key=lambda i: exact[i] - floors[i], reverse=True)
    for i in order[:leftover]:
        floors[i] += CENT
    return floors


def chargeback(*, start: date, end: date, group_by: list[str]) -> Chargeback:
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown or not group_by:
        raise ValueError(f"group by one or more of {', '.join(GROUPS)}; not {', '.join(unknown) or 'nothing'}")
    fields = [GROUPS[g][0] for g in group_by]
    rows = list(
        DailyRollup.objects.filter(day__gte=start, day__lte=end).values(*fields)
        .annotate(calls=Sum("calls"), input_tokens=Sum("input_tokens"), output_tokens=Sum("output_tokens"), exact=Sum("cost"))
        .order_by(*fields)
    )
    exact_total = sum((row["exact"] for row in rows), Decimal(0))
    total = exact_total.quantize(CENT, rounding=ROUND_HALF_UP)
    amounts = _allocate([row["exact"] for row in rows], total)
    lines = [
        Line(tuple(safe_cell(str(row[f])) if row[f] not in (None, "") else UNATTRIBUTED for f in fields),
             row["calls"], row["input_tokens"], row["output_tokens"], row["exact"], amount)
        for row, amount in zip(rows, amounts)
    ]
    return Chargeback(start, end, tuple(group_by), lines, exact_total, total, timezone.now())


def export(report: Chargeback, fmt: str) -> bytes | str:
    """CSV or XLSX (django-import-export's formats): a header block (period, currency, generation time,
    total), then one row per line."""
    width = len(report.group_by) + 5
    data = tablib.Dataset()
    pad = [""] * (width - 2)
    for label, value in [
        ("Tollgate chargeback", ""), ("Period", f"{report.start} to {report.end}"),
        ("Currency", settings.TOLLGATE_CURRENCY), ("Generated at", report.generated_at.isoformat(timespec="seconds")),
        ("Total", f"{report.total}"), ("Lines", str(len(report.lines))), ("", ""),
    ]:
        data.append([label, value, *pad])
    data.append([*(GROUPS[g][1] for g in report.group_by), "Calls", "Input tokens", "Output tokens",
                 f"Amount ({settings.TOLLGATE_CURRENCY})", "Exact amount"])
    for line in report.lines:
        data.append([*line.groups, line.calls, line.input_tokens, line.output_tokens, f"{line.amount}", f"{line.exact}"])
    data.append(["Total", *[""] * (len(report.group_by) - 1), sum(line.calls for line in report.lines), "", "", f"{report.total}",
                 f"{report.exact_total}"])
    return FORMATS[fmt]().export_data(data)
