"""Monthly reconciliation against provider invoices."""
import json
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.core import mail
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from gateway.models import BilledModelName
from governance import roles
from ledger.imports import cost_import
from ledger.models import LedgerEntry, ProviderCostImport, ProviderCostLine, Reconciliation
from ledger.reconciliation import reconcile
from ledger.services import ledger_rollup
from tests.gateway.factories import ProviderFactory, ProviderModelFactory
from tests.governance.factories import PersonFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db
MONTH = date(2026, 10, 1)


def at(day: int) -> datetime:
    return timezone.make_aware(datetime(2026, 10, day, 12))


def openai_costs(*lines) -> bytes:
    buckets = {}
    for day, item, value in lines:
        start = int(datetime(2026, 10, day, tzinfo=dt_timezone.utc).timestamp())
        buckets.setdefault(start, []).append({"object": "organization.costs.result", "amount": {"value": value, "currency": "usd"},
                                              "line_item": item, "project_id": "proj_1"})
    return json.dumps({"object": "page", "data": [{"object": "bucket", "start_time": s, "end_time": s + 86400, "results": r}
                                                   for s, r in buckets.items()]}).encode()


@pytest.fixture
def provider():
    return ProviderFactory(name="OpenAI")


@pytest.fixture
def ledger(provider):
    mini = ProviderModelFactory(provider=provider, name="gpt-4o-mini")
    BilledModelName.objects.create(provider_model=mini, name="gpt-4o-mini", snapshot_suffix=BilledModelName.OPENAI_SNAPSHOT)
    for day, cost in [(1, "10.00"), (2, "5.00")]:
        LedgerEntryFactory(provider_model=mini, created_at=at(day), cost=Decimal(cost))
    LedgerEntryFactory(provider_model=mini, created_at=at(2), cost=0, outcome="upstream_error", http_status=502)
    ledger_rollup()
    return mini


def test_reimporting_the_same_file_changes_nothing(provider):
    content = openai_costs((1, "gpt-4o-mini-2024-07-18, input", 6.0), (1, "gpt-4o-mini-2024-07-18, output", 4.0))
    first = cost_import(provider=provider, source="openai_costs", file_name="oct.json", content=content)
    again = cost_import(provider=provider, source="openai_costs", file_name="oct-copy.json", content=content)
    assert first.pk == again.pk and ProviderCostLine.objects.count() == 2
    overlapping = openai_costs((1, "gpt-4o-mini-2024-07-18, input", 6.0), (3, "gpt-4o-mini-2024-07-18, input", 1.0))
    cost_import(provider=provider, source="openai_costs", file_name="oct-partial.json", content=overlapping)
    # The later file says what day 1 was (the output line is gone from it), and adds day 3.
    assert sorted((line.day.day, line.amount) for line in ProviderCostLine.objects.all()) == [(1, Decimal(6)), (3, Decimal(1))]


def test_a_matching_month_reconciles_clean(provider, ledger):
    cost_import(provider=provider, source="openai_costs", file_name="oct.json", content=openai_costs(
        (1, "gpt-4o-mini-2024-07-18, input", 6.0), (1, "gpt-4o-mini-2024-07-18, output", 4.0),
        (2, "gpt-4o-mini-2024-07-18, input", 5.0)))
    result = reconcile(provider=provider, month=MONTH)
    assert (result.billed, result.ledger, result.status) == (Decimal("15"), Decimal("15"), "ok")
    assert {line.flag for line in result.lines.all()} == {"ok"}


def test_drift_is_explained_and_finance_is_alerted(provider, ledger, django_capture_on_commit_callbacks):
    finance = PersonFactory(roles=[roles.FINANCE])
    cost_import(provider=provider, source="openai_costs", file_name="oct.json", content=openai_costs(
        (1, "gpt-4o-mini, input", 10.0), (2, "gpt-4o-mini, input", 9.0), (2, "gpt-image-1, image", 3.0)))
    with django_capture_on_commit_callbacks(execute=True):
        result = reconcile(provider=provider, month=MONTH)
    lines = {(line.day.day, line.model): line for line in result.lines.all()}
    assert lines[(2, "gpt-4o-mini")].flag == "drift" and "failed, timed-out or aborted" in lines[(2, "gpt-4o-mini")].explanation
    assert lines[(2, "gpt-image-1")].flag == "bypass"
    assert result.status == "drift" and any(finance.email in m.to for m in mail.outbox)


def test_anthropic_cost_report_amounts_are_cents():
    provider = ProviderFactory(name="Anthropic", kind="anthropic")
    report = {"data": [{"starting_at": "2026-10-05T00:00:00Z", "ending_at": "2026-10-06T00:00:00Z",
                        "results": [{"amount": "1234.5", "currency": "USD", "model": "claude-sonnet-4", "workspace_id": "ws_1",
                                     "description": "Claude Sonnet 4 Usage - Input Tokens", "cost_type": "tokens"}]}]}
    cost_import(provider=provider, source="anthropic_costs", file_name="a.json", content=json.dumps(report).encode())
    line = ProviderCostLine.objects.get()
    assert (line.day, line.model, line.amount, line.project) == (date(2026, 10, 5), "claude-sonnet-4", Decimal("12.345"), "ws_1")


def test_generic_csv_and_a_bad_file(provider):
    csv_text = b"date,provider,model,project,tokens,amount\n2026-10-03,OpenAI,gpt-4o-mini,search,1200,0.42\n"
    cost_import(provider=provider, source="csv", file_name="generic.csv", content=csv_text)
    assert ProviderCostLine.objects.get().amount == Decimal("0.42")
    with pytest.raises(ValidationError, match="not valid JSON"):
        cost_import(provider=provider, source="openai_costs", file_name="junk.json", content=b"{nope")


def test_finance_uploads_and_reconciles_from_the_page(client, provider, ledger, django_capture_on_commit_callbacks):
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    upload = SimpleUploadedFile("oct.json", openai_costs((1, "gpt-4o-mini, input", 10.0), (2, "gpt-4o-mini, input", 5.0)))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/ledger/reconciliation/", {"upload-provider": provider.pk, "upload-file": upload})
    record = ProviderCostImport.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/ledger/cost-import/{record.pk}/"
    assert (record.status, record.source, record.read, record.lines) == ("done", "openai_costs", 2, 2)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/ledger/reconciliation/", {"run-provider": provider.pk, "run-month": "2026-10"})
    assert response.status_code == 302
    result = Reconciliation.objects.get()
    csv_text = client.get(f"/ledger/reconciliation/{result.pk}/", {"format": "csv"}).content.decode()
    assert "Billed,15.00,Ledger,15.00,Drift,0.00" in csv_text


def test_auditors_see_reconciliations_but_cannot_run_them(client, provider):
    client.force_login(PersonFactory(roles=[roles.SECURITY_AUDITOR]))
    assert client.get("/ledger/reconciliation/").status_code == 200
    assert client.post("/ledger/reconciliation/", {"run-provider": provider.pk, "run-month": "2026-10"}).status_code == 403


def test_monthly_task_reconciles_last_month(provider, ledger):
    import time_machine

    from ledger.tasks import reconcile_last_month

    cost_import(provider=provider, source="openai_costs", file_name="oct.json", content=openai_costs((1, "gpt-4o-mini", 10.0)))
    with time_machine.travel(datetime(2026, 11, 1, 6, tzinfo=dt_timezone.utc) + timedelta(minutes=1)):
        outcome = reconcile_last_month()
    assert Reconciliation.objects.get(pk=outcome["OpenAI"]).month == MONTH


def test_true_up_allocates_the_difference_to_teams_pro_rata_once(provider):
    from ledger.reconciliation import reconciliation_true_up
    from tests.governance.factories import TeamFactory

    mini = ProviderModelFactory(provider=provider, name="gpt-4o-mini")
    big, small = TeamFactory(), TeamFactory()
    LedgerEntryFactory(provider_model=mini, team=big, cost_center=big.cost_center, created_at=at(1), cost=Decimal("30"))
    LedgerEntryFactory(provider_model=mini, team=small, cost_center=small.cost_center, created_at=at(1), cost=Decimal("10"))
    ledger_rollup()
    cost_import(provider=provider, source="openai_costs", file_name="oct.json", content=openai_costs((1, "gpt-4o-mini", 44.0)))
    result = reconcile(provider=provider, month=MONTH)
    finance = PersonFactory(roles=[roles.FINANCE])
    true_up = reconciliation_true_up(result=result, actor=finance)
    entries = LedgerEntry.objects.filter(outcome="adjustment")
    assert {e.team_id: e.cost for e in entries} == {big.pk: Decimal("3"), small.pk: Decimal("1")}
    assert all(e.created_at.month == 10 and e.provider_model_id == mini.pk for e in entries) and true_up.amount == 4
    with pytest.raises(ValidationError, match="already"):
        reconciliation_true_up(result=result, actor=finance)


def test_costs_are_fetched_from_the_providers_cost_api_with_the_admin_key(provider):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import parse_qs, urlparse

    from ledger.imports import fetch_costs

    pages = {None: {"data": [json.loads(openai_costs((1, "gpt-4o-mini", 2.0)))["data"][0]], "has_more": True, "next_page": "p2"},
             "p2": {"data": [json.loads(openai_costs((2, "gpt-4o-mini", 3.0)))["data"][0]], "has_more": False, "next_page": None}}
    seen = []

    class CostApi(BaseHTTPRequestHandler):
        def do_GET(self):
            query = parse_qs(urlparse(self.path).query)
            seen.append((urlparse(self.path).path, self.headers["Authorization"]))
            body = json.dumps(pages[(query.get("page") or [None])[0]]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), CostApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        provider.base_url = f"http://127.0.0.1:{server.server_port}/v1"
        provider.set_admin_key("sk-admin-cost-reader")
        provider.save()
        record = fetch_costs(provider=provider, month=MONTH)
    finally:
        server.shutdown()
    assert record.lines == 2 and sum(line.amount for line in ProviderCostLine.objects.all()) == Decimal("5")
    assert seen == [("/v1/organization/costs", "Bearer sk-admin-cost-reader")] * 2


def test_a_credit_on_a_day_without_ledger_spend_reconciles_as_drift(provider, ledger):
    """Reproduction (issue 14): a negative line on a model/day with no ledger spend divided by zero."""
    cost_import(provider=provider, source="openai_costs", file_name="credit.json",
                content=openai_costs((1, "gpt-4o-mini-2024-07-18, input", 10.0), (2, "gpt-4o-mini-2024-07-18, input", 5.0),
                                     (9, "gpt-4o-mini-2024-07-18, input", -3.0)))
    result = reconcile(provider=provider, month=MONTH)
    credit = result.lines.get(day=date(2026, 10, 9))
    assert (credit.billed, credit.ledger, credit.flag) == (Decimal("-3"), Decimal("0"), "drift")
    assert "credit" in credit.explanation


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity", "1e20", "sNaN"])
def test_amounts_that_are_not_money_are_a_field_error(provider, amount):
    csv_text = f"date,provider,model,project,tokens,amount\n2026-10-03,OpenAI,gpt-4o-mini,search,1200,{amount}\n".encode()
    with pytest.raises(ValidationError, match="amount"):
        cost_import(provider=provider, source="csv", file_name="bad.csv", content=csv_text)
    assert not ProviderCostLine.objects.exists()


def test_an_over_long_csv_field_is_a_field_error(provider):
    csv_text = b"date,provider,model,project,tokens,amount\n2026-10-03,OpenAI," + b"x" * 200_000 + b",p,1,0.42\n"
    with pytest.raises(ValidationError, match="file"):
        cost_import(provider=provider, source="csv", file_name="long.csv", content=csv_text)
    assert not ProviderCostLine.objects.exists()
