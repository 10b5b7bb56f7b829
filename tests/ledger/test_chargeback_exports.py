"""Chargeback exports finance can use (issue 14): numbers as numbers with the currency, plain decimals,
human column labels, refused calls counted apart, and models both as requested and as served."""
import csv
import io
from datetime import timedelta
from decimal import Decimal

import openpyxl
import pytest
from django.utils import timezone

from governance import roles
from ledger import chargeback as cb
from ledger.models import LedgerEntry
from ledger.services import ledger_rollup
from tests.gateway.factories import ModelAliasFactory, ProviderModelFactory
from tests.governance.factories import PersonFactory, TeamFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


def _report(*group_by):
    ledger_rollup()
    today = timezone.localdate()
    return cb.chargeback(start=today - timedelta(days=1), end=today + timedelta(days=1), group_by=list(group_by))


def _spend(team, cost, **kwargs):
    return LedgerEntryFactory(team=team, cost_center=team.cost_center, cost=Decimal(cost), **kwargs)


def _refused(**attribution):
    """A call refused before it was attributed (unknown key, rate limit at the door): no team, no key."""
    return LedgerEntryFactory(**{"key": None, "person": None, "team": None, "cost_center": None, **attribution},
                              cost=0, input_tokens=0, output_tokens=0, outcome=LedgerEntry.Outcome.REFUSED,
                              http_status=429)


def _csv_rows(report):
    return list(csv.reader(io.StringIO(cb.export(report, "csv"))))


def _sheet(report):
    return openpyxl.load_workbook(io.BytesIO(cb.export(report, "xlsx"))).active


def _table(sheet, first_label):
    """The column labels row, the line rows and the totals row of a sheet."""
    rows = list(sheet.iter_rows())
    start = next(i for i, row in enumerate(rows) if row[0].value == first_label)
    return rows[start], rows[start + 1:-1], rows[-1]


def test_xlsx_amounts_are_numbers_in_the_currency_and_add_up_to_the_total():
    for slug, cost in [("platform", "1.234"), ("data", "2.345"), ("search", "0.00000006")]:
        _spend(TeamFactory(slug=slug), cost)
    report = _report("team")
    sheet = _sheet(report)
    labels, lines, totals = _table(sheet, "Team")
    column = {cell.value: i for i, cell in enumerate(labels)}
    amount, exact = column["Amount (USD)"], column["Exact amount"]
    assert len(lines) == 3
    for row in [*lines, totals]:
        assert row[amount].data_type == "n" and '"USD"' in row[amount].number_format
        assert row[amount].number_format.startswith("#,##0.00 ")
        assert row[exact].data_type == "n" and "0.00000000" in row[exact].number_format
        for name in ("Calls", "Input tokens", "Output tokens", "Refused calls"):
            assert isinstance(row[column[name]].value, int)
    assert round(sum(Decimal(str(row[amount].value)) for row in lines), 2) == report.total == Decimal("3.58")
    assert Decimal(str(totals[amount].value)) == Decimal("3.58") and totals[column["Calls"]].value == 3
    assert Decimal(str(next(row[exact].value for row in lines if row[0].value == "search"))) == Decimal("0.00000006")
    header = {row[0].value: row[1] for row in sheet.iter_rows(max_row=7)}
    assert header["Total"].data_type == "n" and Decimal(str(header["Total"].value)) == Decimal("3.58")
    assert '"USD"' in header["Total"].number_format and header["Currency"].value == "USD"
    assert header["Period"].value and header["Generated at"].value


def test_csv_prints_exact_amounts_in_plain_decimals_and_amounts_to_the_cent():
    _spend(TeamFactory(slug="platform"), "0.00000006")
    _spend(TeamFactory(slug="data"), "10")
    text = cb.export(_report("team"), "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert "E-" not in text and "E+" not in text
    labels = next(row for row in rows if row[0] == "Team")
    platform = next(row for row in rows if row[0] == "platform")
    assert platform[labels.index("Exact amount")] == "0.00000006" and platform[labels.index("Amount (USD)")] == "0.00"
    data = next(row for row in rows if row[0] == "data")
    assert data[labels.index("Exact amount")] == "10.00000000" and data[labels.index("Amount (USD)")] == "10.00"
    assert rows[-1][0] == "Total" and rows[-1][labels.index("Exact amount")] == "10.00000006"


def test_exports_label_columns_for_people_not_with_internal_codes():
    _spend(TeamFactory(slug="platform"), "1")
    report = _report("cost_center", "team", "alias", "model")
    expected = ["Cost center", "Team", "Model (as requested)", "Provider model", "Calls", "Input tokens",
                "Output tokens", "Amount (USD)", "Exact amount", "Refused calls"]
    assert next(row for row in _csv_rows(report) if row[0] == "Cost center") == expected
    labels, _, _ = _table(_sheet(report), "Cost center")
    assert [cell.value for cell in labels] == expected


def test_a_group_with_only_refused_calls_is_no_line_and_refused_calls_are_counted_apart():
    platform = TeamFactory(slug="platform")
    _spend(platform, "1.50")
    _refused(team=platform, cost_center=platform.cost_center)
    _refused(team=platform, cost_center=platform.cost_center)
    for _ in range(3):
        _refused()
    report = _report("team")
    assert [(line.groups, line.calls, line.refused, line.amount) for line in report.lines] == [
        (("platform",), 1, 2, Decimal("1.50"))]
    assert report.refused_left_out == 3 and sum(line.amount for line in report.lines) == report.total

    rows = _csv_rows(report)
    assert not [row for row in rows if row[0] == cb.UNATTRIBUTED]
    labels = next(row for row in rows if row[0] == "Team")
    line = next(row for row in rows if row[0] == "platform")
    assert (line[labels.index("Calls")], line[labels.index("Refused calls")]) == ("1", "2")
    header = {row[0]: row[1] for row in rows[:8]}
    assert header["Refused calls (not charged)"] == "3" and header["Lines"] == "1"

    sheet = _sheet(report)
    _, lines, totals = _table(sheet, "Team")
    assert [row[0].value for row in lines] == ["platform"] and totals[labels.index("Calls")].value == 1
    assert {row[0].value: row[1].value for row in sheet.iter_rows(max_row=7)}["Refused calls (not charged)"] == 3


def test_a_group_with_refused_calls_and_something_to_charge_keeps_its_line_to_the_cent():
    """Only groups with nothing served and nothing to charge are left out: an unattributed credit stays."""
    _spend(TeamFactory(slug="platform"), "0.333")
    _refused()
    credit = LedgerEntryFactory(key=None, person=None, team=None, cost_center=None, cost=Decimal("0.3349"),
                                input_tokens=0, output_tokens=0, outcome=LedgerEntry.Outcome.ADJUSTMENT, http_status=200)
    report = _report("team")
    assert [line.groups[0] for line in report.lines] == ["platform", cb.UNATTRIBUTED]
    unattributed = report.lines[1]
    assert (unattributed.calls, unattributed.refused, unattributed.exact) == (0, 1, credit.cost)
    assert report.refused_left_out == 0
    assert sum(line.amount for line in report.lines) == report.total == Decimal("0.67")


def test_alias_grouping_shows_what_was_asked_for_and_model_grouping_what_served_it():
    fast = ModelAliasFactory(name="fast")
    served = ProviderModelFactory(name="gpt-4o-mini-2024-07-18")
    team = TeamFactory(slug="platform")
    _spend(team, "1", alias=fast, provider_model=served, model_requested="fast")
    by_alias, by_model = _report("alias"), _report("model")
    assert [line.groups for line in by_alias.lines] == [("fast",)]
    assert [line.groups for line in by_model.lines] == [("gpt-4o-mini-2024-07-18",)]
    assert by_alias.total == by_model.total == Decimal("1.00")
    alias_rows, model_rows = _csv_rows(by_alias), _csv_rows(by_model)
    assert alias_rows[-3][0] == "Model (as requested)" and alias_rows[-2][0] == "fast"
    assert model_rows[-3][0] == "Provider model" and model_rows[-2][0] == "gpt-4o-mini-2024-07-18"


def test_chargeback_page_shows_labels_and_refused_calls(client):
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    platform = TeamFactory(slug="platform")
    _spend(platform, "2")
    _refused(team=platform, cost_center=platform.cost_center)
    _refused()
    ledger_rollup()
    today = timezone.localdate()
    page = client.get("/ledger/chargeback/", {"start": today - timedelta(days=1), "end": today, "group_by": ["team"]})
    html = page.content.decode()
    assert page.status_code == 200
    assert "<th>Team</th>" in html and "<th>Refused calls</th>" in html and ">2.00<" in html
    assert "<td>platform</td><td>1</td><td>100</td><td>50</td><td>2.00</td><td>1</td>" in html
    assert cb.UNATTRIBUTED not in html and "Refused calls (not charged): 1" in html
