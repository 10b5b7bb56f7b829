"""Chargeback: spend for a date range grouped by any of department, cost center, team, project, person,
model (as requested or as served), provider and tags, read from the daily rollups. Amounts are rounded to
cents so that the lines add up exactly to the total, and the total equals the ledger sum for the period to
the cent. Exports are for finance: human column labels, and in XLSX real numbers with currency formats."""
import csv
import io
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db.models import F, Sum
from django.utils import timezone
from openpyxl import Workbook
from openpyxl.styles import Font
from openpyxl.utils import get_column_letter

from governance.spreadsheets import safe_cell
from ledger.models import DailyRollup

CENT = Decimal("0.01")
EXACT = Decimal("0.00000001")  # the ledger's precision
UNATTRIBUTED = "(unattributed)"
GROUPS = {
    "department": ("team__department__name", "Department"),
    "cost_center": ("cost_center__code", "Cost center"),
    "team": ("team__slug", "Team"),
    "project": ("project", "Project"),
    "person": ("person__username", "Person"),
    "alias": ("alias__name", "Model (as requested)"),
    "model": ("provider_model__name", "Provider model"),
    "provider": ("provider_model__provider__name", "Provider"),
    "feature": ("feature", "Feature"),
    "environment": ("environment", "Environment"),
    "experiment": ("experiment", "Experiment"),
}


@dataclass(frozen=True)
class Line:
    groups: tuple[str, ...]
    calls: int  # served or failed; refused calls are counted apart
    input_tokens: int
    output_tokens: int
    exact: Decimal
    amount: Decimal  # in cents, allocated so the lines sum to the rounded total
    refused: int = 0


@dataclass(frozen=True)
class Chargeback:
    start: date
    end: date
    group_by: tuple[str, ...]
    lines: list[Line]
    exact_total: Decimal
    total: Decimal
    generated_at: datetime
    refused_left_out: int = 0  # refused calls of groups with nothing to charge, which get no line

    @property
    def group_labels(self) -> tuple[str, ...]:
        return tuple(GROUPS[g][1] for g in self.group_by)

    @property
    def calls(self) -> int:
        return sum(line.calls for line in self.lines)

    @property
    def refused(self) -> int:
        return sum(line.refused for line in self.lines)


def _allocate(exact: list[Decimal], total: Decimal) -> list[Decimal]:
    """Round each line to cents, then hand the leftover cents to the lines with the largest remainders."""
    floors = [((value / CENT).to_integral_value(rounding="ROUND_FLOOR") * CENT).quantize(CENT) for value in exact]
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
        .annotate(calls=Sum("calls"), refused=Sum("refused"), input_tokens=Sum("input_tokens"),
                  output_tokens=Sum("output_tokens"), exact=Sum("cost"))
        .order_by(*(F(f).asc(nulls_last=True) for f in fields))  # the same order on every database
    )
    # Refused calls often carry no team or key: as lines of their own they were zero-amount "(unattributed)"
    # lines inflating the call counts. A group with nothing served and nothing to charge gets no line; its
    # refused calls are counted in the header instead. Dropping zero amounts leaves the total unchanged.
    charged = [row for row in rows if row["calls"] or row["exact"]]
    refused_left_out = sum(row["refused"] for row in rows if not (row["calls"] or row["exact"]))
    exact_total = sum((row["exact"] for row in charged), Decimal(0))
    total = exact_total.quantize(CENT, rounding=ROUND_HALF_UP)
    amounts = _allocate([row["exact"] for row in charged], total)
    lines = [
        Line(tuple(safe_cell(str(row[f])) if row[f] not in (None, "") else UNATTRIBUTED for f in fields),
             row["calls"], row["input_tokens"], row["output_tokens"], row["exact"], amount, row["refused"])
        for row, amount in zip(charged, amounts)
    ]
    return Chargeback(start, end, tuple(group_by), lines, exact_total, total, timezone.now(), refused_left_out)


def _header_block(report: Chargeback) -> list[tuple[str, object]]:
    return [
        ("Tollgate chargeback", ""), ("Period", f"{report.start} to {report.end}"),
        ("Currency", settings.TOLLGATE_CURRENCY), ("Generated at", report.generated_at.isoformat(timespec="seconds")),
        ("Total", report.total), ("Lines", len(report.lines)), ("Refused calls (not charged)", report.refused_left_out),
    ]


def _columns(report: Chargeback) -> list[str]:
    # Refused calls come last so that the columns finance already reads (amounts included) keep their place.
    return [*report.group_labels, "Calls", "Input tokens", "Output tokens",
            f"Amount ({settings.TOLLGATE_CURRENCY})", "Exact amount", "Refused calls"]


def _rows(report: Chargeback) -> list[list]:
    """The lines and the totals row, with numbers as numbers (ints and Decimals)."""
    rows = [[*line.groups, line.calls, line.input_tokens, line.output_tokens, line.amount, line.exact, line.refused]
            for line in report.lines]
    rows.append(["Total", *[""] * (len(report.group_by) - 1), report.calls,
                 sum(line.input_tokens for line in report.lines), sum(line.output_tokens for line in report.lines),
                 report.total, report.exact_total, report.refused])
    return rows


def _plain(value) -> object:
    """Decimals in plain notation (Decimal('6E-8') as 0.00000006): E-notation is not a number to finance."""
    return f"{value:f}" if isinstance(value, Decimal) else value


def _csv(report: Chargeback) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    width = len(_columns(report))
    amounts = {len(report.group_by) + 3: CENT, len(report.group_by) + 4: EXACT}
    for label, value in [*_header_block(report), ("", "")]:
        writer.writerow([label, _plain(value), *[""] * (width - 2)])
    writer.writerow(_columns(report))
    for row in _rows(report):
        writer.writerow([_plain(value.quantize(amounts[i])) if i in amounts else value for i, value in enumerate(row)])
    return out.getvalue()


def _xlsx(report: Chargeback) -> bytes:
    """Written with openpyxl itself: tablib (and so django-import-export) cannot set number formats."""
    currency = settings.TOLLGATE_CURRENCY.replace('"', "")
    money, exact, count = f'#,##0.00 "{currency}"', f'#,##0.00000000 "{currency}"', "#,##0"
    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "Chargeback"
    for label, value in _header_block(report):
        sheet.append([label, value])
        cell = sheet.cell(row=sheet.max_row, column=2)
        cell.number_format = money if isinstance(value, Decimal) else count if isinstance(value, int) else "@"
    sheet["A1"].font = Font(bold=True)
    sheet.append([])
    sheet.append(_columns(report))
    header_row = sheet.max_row
    for cell in sheet[header_row]:
        cell.font = Font(bold=True)
    groups = len(report.group_by)
    formats = [*["@"] * groups, count, count, count, money, exact, count]
    for row in _rows(report):
        sheet.append(row)
        for cell, number_format in zip(sheet[sheet.max_row], formats):
            cell.number_format = number_format
    for cell in sheet[sheet.max_row]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = sheet.cell(row=header_row + 1, column=1)
    for column, width in enumerate([*[24] * groups, 10, 14, 14, 18, 22, 14], start=1):
        sheet.column_dimensions[get_column_letter(column)].width = width
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


FORMATS = {"csv": _csv, "xlsx": _xlsx}


def export(report: Chargeback, fmt: str) -> bytes | str:
    """CSV or XLSX: a header block (period, currency, generation time, total, refused calls not charged),
    then a row of column labels, one row per line and a totals row."""
    return FORMATS[fmt](report)
