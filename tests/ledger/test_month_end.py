"""Month end as finance runs it (issue 14): matching billed names through the table, UTC days, evidence for
explanations, one provider's failure isolated, a true-up of the unexplained difference once, reversible,
and the whole month to the cent."""
import csv
import io
import json
import threading
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from gateway.catalog import billed_model_matcher
from gateway.models import BilledModelName
from governance import roles
from governance.models import AuditEvent
from ledger.imports import cost_import
from ledger.models import DailyRollup, LedgerEntry, Reconciliation, RollupState, TrueUp
from ledger.reconciliation import reconcile, reconciliation_true_up, true_up_plan, true_up_reverse
from ledger.services import ledger_rollup
from tests.gateway.factories import ModelPriceFactory, ProviderFactory, ProviderModelFactory
from tests.governance.factories import PersonFactory, TeamFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db
MONTH = date(2026, 10, 1)
NAMES = json.loads((Path(__file__).parent / "fixtures" / "provider_files" / "model_names.json").read_text())
GENERIC = "date,provider,model,project,line_item,tokens,amount\n"


def utc(day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2026, 10, day, hour, minute, tzinfo=dt_timezone.utc)


def csv_file(provider, *rows) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows([(f"2026-10-{day:02d}", provider.name, model, "p", item, 0, amount) for day, model, item, amount in rows])
    return (GENERIC + out.getvalue()).encode()


@pytest.fixture
def openai():
    return ProviderFactory(name="OpenAI", kind="openai")


def catalog(provider, *names, suffix=BilledModelName.OPENAI_SNAPSHOT):
    models = []
    for name in names:
        model = ProviderModelFactory(provider=provider, name=name)
        BilledModelName.objects.create(provider_model=model, name=name, snapshot_suffix=suffix)
        models.append(model)
    return models


def test_billed_names_match_catalog_models_only_through_the_table(openai):
    """Reproduction: `_match` accepted any name starting with a catalog name and a dash, so
    gpt-4o-realtime-preview-2024-12-17 was gpt-4o and claude-sonnet-4-5-20250929 was claude-sonnet-4."""
    catalog(openai, "gpt-4o", "gpt-4o-mini", "gpt-4.1")
    match = billed_model_matcher(openai)
    matched = {name: match(name) for name in NAMES["openai"]}
    assert matched["gpt-4o-2024-08-06"] == "gpt-4o" and matched["gpt-4o-mini-2024-07-18"] == "gpt-4o-mini"
    assert matched["gpt-4.1-mini-2025-04-14"] is None and matched["gpt-4o-realtime-preview-2024-12-17"] is None
    for name, model in matched.items():  # every other name in OpenAI's list: its own line
        assert model is None or name == model or name[len(model):][:1] == "-" and name[len(model) + 1:].replace("-", "").isdigit()
    anthropic = ProviderFactory(name="Anthropic", kind="anthropic")
    catalog(anthropic, "claude-sonnet-4", "claude-opus-4-1", suffix=BilledModelName.ANTHROPIC_SNAPSHOT)
    match = billed_model_matcher(anthropic)
    matched = {name: match(name) for name in NAMES["anthropic"]}
    assert matched["claude-sonnet-4-20250514"] == "claude-sonnet-4" and matched["claude-opus-4-1-20250805"] == "claude-opus-4-1"
    assert matched["claude-sonnet-4-5-20250929"] is None and matched["claude-sonnet-4-5"] is None
    assert {m for m in matched.values() if m} == {"claude-sonnet-4", "claude-opus-4-1"}


def test_a_billed_model_outside_the_table_is_possible_bypass_not_drift(openai):
    (gpt4o,) = catalog(openai, "gpt-4o")
    LedgerEntryFactory(provider_model=gpt4o, created_at=utc(3), cost=Decimal("5"))
    ledger_rollup()
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(
        openai, (3, "gpt-4o-2024-08-06", "input", "5.00"), (3, "gpt-4o-realtime-preview-2024-12-17", "input", "2.00")))
    result = reconcile(provider=openai, month=MONTH)
    lines = {line.model: line for line in result.lines.all()}
    assert lines["gpt-4o"].flag == "ok" and lines["gpt-4o"].billed_as == "gpt-4o-2024-08-06"
    assert lines["gpt-4o-realtime-preview-2024-12-17"].flag == "bypass"
    assert (result.bypass, result.unexplained, result.status) == (Decimal("2"), Decimal("0"), "drift")


def test_ledger_days_are_utc_days_whatever_the_time_zone(openai, settings):
    """Reproduction: with TIME_ZONE east of UTC the ledger was bucketed by local day, providers bill by UTC
    day: days flagged as drift on a ledger that matches the invoice exactly."""
    settings.TIME_ZONE = "Europe/Berlin"
    (mini,) = catalog(openai, "gpt-4o-mini")
    rows = []
    for day in range(1, 8):  # late evening UTC: the next day in Berlin
        LedgerEntryFactory(provider_model=mini, created_at=utc(day, 23, 30), cost=Decimal(day))
        rows.append((day, "gpt-4o-mini", "input", f"{day}.00"))
    ledger_rollup()
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(openai, *rows))
    result = reconcile(provider=openai, month=MONTH)
    assert {line.flag for line in result.lines.all()} == {"ok"} and result.status == "ok"
    assert DailyRollup.objects.filter(day=date(2026, 10, 2), utc_day=date(2026, 10, 1)).exists()  # chargeback keeps local days


def test_cached_tokens_explain_drift_only_when_the_bill_shows_it(openai):
    """Reproduction: 'cached-token pricing differs' was said whenever any cached tokens existed that day."""
    (mini,) = catalog(openai, "gpt-4o-mini")
    ModelPriceFactory(provider_model=mini, effective_from=utc(1) - timedelta(days=60), input_per_mtok=Decimal("1"),
                      output_per_mtok=Decimal("1"), cached_input_per_mtok=Decimal("0.5"))
    for day in (3, 4):  # 2,000,000 cached tokens at 0.50 per million: 1.00 in the ledger
        LedgerEntryFactory(provider_model=mini, created_at=utc(day), cost=Decimal("10"), cached_tokens=2_000_000)
    ledger_rollup()
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(
        openai, (3, "gpt-4o-mini", "gpt-4o-mini, input", "12.00"), (3, "gpt-4o-mini", "gpt-4o-mini, cached input", "1.00"),
        (4, "gpt-4o-mini", "gpt-4o-mini, input", "9.00"), (4, "gpt-4o-mini", "gpt-4o-mini, cached input", "4.00")))
    result = reconcile(provider=openai, month=MONTH)
    day3, day4 = result.lines.get(day=date(2026, 10, 3)), result.lines.get(day=date(2026, 10, 4))
    assert day3.flag == day4.flag == "drift"
    assert day3.explanation == ""  # its cached line is what the ledger's cached tokens cost
    assert "cached-input lines are 4.0000" in day4.explanation and "make 1.0000" in day4.explanation
    assert (result.explained, result.unexplained) == (Decimal("3"), Decimal("3"))


def test_usage_files_give_a_token_level_comparison(openai):
    (mini,) = catalog(openai, "gpt-4o-mini")
    LedgerEntryFactory(provider_model=mini, created_at=utc(5), cost=Decimal("1"), input_tokens=1000, output_tokens=500)
    ledger_rollup()
    usage = {"object": "page", "data": [{"object": "bucket", "start_time": int(utc(5, 0).timestamp()), "end_time": int(utc(6, 0).timestamp()),
                                         "results": [{"object": "organization.usage.completions.result", "input_tokens": 1400,
                                                      "output_tokens": 500, "input_cached_tokens": 0, "num_model_requests": 2,
                                                      "model": "gpt-4o-mini-2024-07-18"}]}]}
    cost_import(provider=openai, file_name="usage.json", content=json.dumps(usage).encode())
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(openai, (5, "gpt-4o-mini", "input", "3.00")))
    line = reconcile(provider=openai, month=MONTH).lines.get()
    assert (line.billed_tokens, line.ledger_tokens, line.flag) == (1900, 1500, "drift")
    assert "the provider counted 1,900 tokens, the ledger 1,500" in line.explanation


class _CostApi(BaseHTTPRequestHandler):
    answers: dict = {}

    def do_GET(self):
        status, body = self.answers[self.server.server_port]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_one_providers_failing_cost_api_does_not_stop_the_others(django_capture_on_commit_callbacks):
    """Reproduction: one provider's cost API failing stopped the monthly task for every provider."""
    from ledger.tasks import reconcile_last_month

    servers = [HTTPServer(("127.0.0.1", 0), _CostApi) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    good_bucket = {"object": "bucket", "start_time": int(utc(2, 0).timestamp()), "end_time": int(utc(3, 0).timestamp()),
                   "results": [{"object": "organization.costs.result", "amount": {"value": 3.0, "currency": "usd"},
                                "line_item": "gpt-4o-mini, input", "project_id": "p"}]}
    _CostApi.answers = {servers[0].server_port: (500, {"error": "boom"}),
                        servers[1].server_port: (200, {"object": "page", "data": [good_bucket], "has_more": False})}
    broken, working = [ProviderFactory(name=name, kind="openai", base_url=f"http://127.0.0.1:{s.server_port}/v1")
                       for name, s in zip(("Broken", "Working"), servers)]
    for provider in (broken, working):
        provider.set_admin_key("sk-admin-reader")
        provider.save()
    finance = PersonFactory(roles=[roles.FINANCE])
    try:
        with time_machine.travel(datetime(2026, 11, 1, 6, 1, tzinfo=dt_timezone.utc)), \
                django_capture_on_commit_callbacks(execute=True) as callbacks:
            outcome = reconcile_last_month()
    finally:
        for server in servers:
            server.shutdown()
    assert outcome["Broken"].startswith("failed") and Reconciliation.objects.get(provider=working).billed == 3
    assert not Reconciliation.objects.filter(provider=broken).exists()
    assert AuditEvent.objects.filter(action="ledger.cost_fetch_failed").exists()
    from django.core import mail
    assert any("Broken 2026-10: cost API failed" in m.subject and finance.email in m.to for m in mail.outbox)
    assert callbacks is not None


def test_true_up_allocates_only_the_unexplained_difference_once(openai):
    """Reproduction: a true-up could be approved twice for one month (re-run, approve again), and it
    allocated billed minus ledger, bypass and explained drift included."""
    mini, big_model = catalog(openai, "gpt-4o-mini", "gpt-4o")
    a, b = TeamFactory(), TeamFactory()
    LedgerEntryFactory(provider_model=mini, team=a, cost_center=a.cost_center, created_at=utc(1), cost=Decimal("30"))
    LedgerEntryFactory(provider_model=mini, team=b, cost_center=b.cost_center, created_at=utc(1), cost=Decimal("10"))
    LedgerEntryFactory(provider_model=big_model, team=a, cost_center=a.cost_center, created_at=utc(2), cost=Decimal("10"))
    LedgerEntryFactory(provider_model=big_model, created_at=utc(2), cost=0, outcome="upstream_error", http_status=502)
    ledger_rollup()
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(
        openai, (1, "gpt-4o-mini", "input", "44.00"),  # 4.00 unexplained
        (2, "gpt-4o", "input", "12.00"),  # 2.00 explained: a failed call that day
        (2, "dall-e-3", "image", "7.00")))  # bypass
    finance = PersonFactory(roles=[roles.FINANCE])
    result = reconcile(provider=openai, month=MONTH)
    assert (result.bypass, result.explained, result.unexplained) == (Decimal("7"), Decimal("2"), Decimal("4"))
    plan = true_up_plan(result)
    assert sorted((p.team_id, p.amount) for p in plan) == sorted([(a.pk, Decimal("3")), (b.pk, Decimal("1"))])
    true_up = reconciliation_true_up(result=result, actor=finance)
    assert true_up.amount == Decimal("4") and true_up.entries == 2
    ledger_rollup()
    rerun = reconcile(provider=openai, month=MONTH)
    assert rerun.unexplained == 0 and rerun.lines.get(model="gpt-4o-mini").flag == "ok"
    with pytest.raises(ValidationError, match="already trued up"):
        reconciliation_true_up(result=rerun, actor=finance)
    with pytest.raises(IntegrityError), transaction.atomic():  # the database holds the rule too
        TrueUp.objects.create(provider=openai, month=MONTH, reconciliation=rerun, amount=1, created_by=finance)
    assert LedgerEntry.objects.filter(outcome="adjustment").count() == 2


def test_a_true_up_is_reversed_by_counter_entries(openai):
    (mini,) = catalog(openai, "gpt-4o-mini")
    team = TeamFactory()
    LedgerEntryFactory(provider_model=mini, team=team, cost_center=team.cost_center, created_at=utc(1), cost=Decimal("10"))
    ledger_rollup()
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(openai, (1, "gpt-4o-mini", "input", "15.00")))
    finance = PersonFactory(roles=[roles.FINANCE])
    true_up = reconciliation_true_up(result=reconcile(provider=openai, month=MONTH), actor=finance)
    assert true_up_reverse(true_up=true_up, actor=finance) == 1
    ledger_rollup()
    again = reconcile(provider=openai, month=MONTH)
    assert again.unexplained == Decimal("5") and sum(e.cost for e in LedgerEntry.objects.filter(outcome="adjustment")) == 0
    assert reconciliation_true_up(result=again, actor=finance).amount == Decimal("5")  # the month is free again


def test_the_true_up_page_shows_the_plan_and_asks_for_confirmation(client, openai):
    (mini,) = catalog(openai, "gpt-4o-mini")
    team = TeamFactory(slug="search")
    LedgerEntryFactory(provider_model=mini, team=team, cost_center=team.cost_center, created_at=utc(1), cost=Decimal("10"))
    ledger_rollup()
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(openai, (1, "gpt-4o-mini", "input", "12.50")))
    result = reconcile(provider=openai, month=MONTH)
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    page = client.get(f"/ledger/reconciliation/{result.pk}/true-up/").content.decode()
    assert team.name in page and "2.50" in page and "Write these 1 adjustment entries" in page
    assert not TrueUp.objects.exists()  # looking writes nothing
    assert client.post(f"/ledger/reconciliation/{result.pk}/true-up/").status_code == 302
    assert TrueUp.objects.get().amount == Decimal("2.5")
    auditor = PersonFactory(roles=[roles.SECURITY_AUDITOR])
    client.force_login(auditor)
    assert client.get(f"/ledger/reconciliation/{result.pk}/true-up/").status_code == 403


def test_rollups_are_upserted_on_their_grain(openai):
    """Reproduction: ledger_rollup loaded every rollup row of the touched days FOR UPDATE and saved them one
    by one; without a unique grain nothing stopped two rows for one grain."""
    (mini,) = catalog(openai, "gpt-4o-mini")
    key = VirtualKeyFactory()
    team = key.team
    for _ in range(3):
        LedgerEntryFactory(key=key, provider_model=mini, created_at=utc(9), cost=Decimal("1"))
        ledger_rollup()
    LedgerEntryFactory(key=key, provider_model=mini, created_at=utc(9), cost=0, outcome="refused", http_status=403)
    ledger_rollup()
    rows = DailyRollup.objects.filter(team=team)
    assert rows.count() == 1 and (rows[0].calls, rows[0].refused, rows[0].cost) == (3, 1, Decimal("3"))
    with pytest.raises(IntegrityError), transaction.atomic():
        DailyRollup.objects.create(day=rows[0].day, utc_day=rows[0].utc_day, grain=rows[0].grain)


def test_report_pages_never_fold_the_ledger(client, openai):
    """Reproduction: the chargeback and reconciliation views ran the rollup inside the request."""
    (mini,) = catalog(openai, "gpt-4o-mini")
    ledger_rollup()
    LedgerEntryFactory(provider_model=mini, created_at=utc(9), cost=Decimal("1"))
    before = RollupState.objects.get(pk=1).last_entry_id
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    assert client.get("/ledger/chargeback/", {"start": "2026-10-01", "end": "2026-10-31", "group_by": "team"}).status_code == 200
    assert client.get("/ledger/reconciliation/").status_code == 200
    assert RollupState.objects.get(pk=1).last_entry_id == before


def test_month_end_to_the_cent(openai, django_capture_on_commit_callbacks):
    """Finance's month end: a provider file with a restated day, a credit, a bypass and a snapshot rename;
    reconcile, true up, re-run; every figure to the cent."""
    mini, gpt4o = catalog(openai, "gpt-4o-mini", "gpt-4o")
    search, support = TeamFactory(slug="search"), TeamFactory(slug="support")
    for day in range(1, 31):
        LedgerEntryFactory(provider_model=mini, team=search, cost_center=search.cost_center, created_at=utc(day, 9), cost=Decimal("1.50"))
        LedgerEntryFactory(provider_model=gpt4o, team=support, cost_center=support.cost_center, created_at=utc(day, 23, 59),
                           cost=Decimal("2.25"))
    LedgerEntryFactory(provider_model=mini, created_at=utc(12), cost=0, outcome="refused", http_status=429)
    with time_machine.travel(datetime(2026, 11, 1, 5, tzinfo=dt_timezone.utc)):
        ledger_rollup()
    rows = [(day, "gpt-4o-mini-2024-07-18", "gpt-4o-mini, input", "1.50") for day in range(1, 31)]
    # Mid-month, OpenAI bills gpt-4o under its new snapshot (a rename the table's suffix covers).
    rows += [(day, "gpt-4o-2024-08-06" if day < 15 else "gpt-4o-2024-11-20", "gpt-4o, input", "2.25") for day in range(1, 31)]
    rows[9] = (10, "gpt-4o-mini-2024-07-18", "gpt-4o-mini, input", "1.60")  # 0.10 more on the 10th, first said
    rows += [(20, "gpt-4o-mini-2024-07-18", "credit", "-0.40"),  # a credit on a day with spend
             (31, "gpt-4o-mini-2024-07-18", "refund", "-1.00"),  # a refund on a day without
             (18, "o3-2025-04-16", "o3, input", "12.34")]  # spend that never went through Tollgate
    cost_import(provider=openai, file_name="oct.csv", content=csv_file(openai, *rows))
    restated = cost_import(provider=openai, file_name="oct-10.csv", content=csv_file(
        openai, (10, "gpt-4o-mini-2024-07-18", "gpt-4o-mini, input", "1.80"), (10, "gpt-4o-2024-08-06", "gpt-4o, input", "2.25")))
    assert restated.replaced == 2 and restated.report["days"][0]["amount_now"] == "4.05000000"
    result = reconcile(provider=openai, month=MONTH)
    ledger_total = 30 * Decimal("3.75")
    assert result.ledger == ledger_total == Decimal("112.50")
    assert result.billed == Decimal("112.50") + Decimal("0.30") - Decimal("0.40") - Decimal("1.00") + Decimal("12.34")
    assert (result.bypass, result.explained) == (Decimal("12.34"), Decimal("-1.00"))
    assert result.unexplained == Decimal("-0.10")  # +0.30 on the 10th, -0.40 on the 20th
    flags = {(line.day.day, line.model): line.flag for line in result.lines.all()}
    assert flags[(18, "o3-2025-04-16")] == "bypass" and flags[(31, "gpt-4o-mini")] == "drift"
    assert flags[(15, "gpt-4o")] == "ok"  # the renamed snapshot is still gpt-4o
    finance = PersonFactory(roles=[roles.FINANCE])
    true_up = reconciliation_true_up(result=result, actor=finance)
    assert true_up.amount == Decimal("-0.10")
    adjustments = LedgerEntry.objects.filter(outcome="adjustment")
    assert {(e.team_id, e.created_at.day, e.cost) for e in adjustments} == {(search.pk, 10, Decimal("0.30")),
                                                                             (search.pk, 20, Decimal("-0.40"))}
    ledger_rollup()
    rerun = reconcile(provider=openai, month=MONTH)
    assert (rerun.billed, rerun.ledger, rerun.bypass, rerun.explained, rerun.unexplained) == (
        result.billed, Decimal("112.40"), Decimal("12.34"), Decimal("-1.00"), Decimal("0"))
    from ledger.chargeback import chargeback
    report = chargeback(start=date(2026, 10, 1), end=date(2026, 10, 31), group_by=["team"])
    by_team = {line.groups[0]: line.amount for line in report.lines}
    assert by_team == {"search": Decimal("44.90"), "support": Decimal("67.50")} and report.total == Decimal("112.40")
