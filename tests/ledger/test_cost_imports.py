"""Provider cost and usage files (issue 14): every kind read from a fixture written from the provider's
published shape, detected and checked against the provider and the currency; imports idempotent by the
provider's line identity, a re-imported day replacing that day, all or nothing, read by the worker."""
import json
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile

from governance import roles
from ledger.imports import cost_import
from ledger.models import ProviderCostImport, ProviderCostLine
from tests.gateway.factories import ProviderFactory
from tests.governance.factories import PersonFactory

pytestmark = pytest.mark.django_db
FILES = Path(__file__).parent / "fixtures" / "provider_files"
GENERIC = "date,provider,model,project,api_key,tokens,amount,currency\n"


@pytest.fixture
def openai():
    return ProviderFactory(name="OpenAI", kind="openai")


@pytest.fixture
def anthropic():
    return ProviderFactory(name="Anthropic", kind="anthropic")


def _import(provider, name, content=None, **kwargs):
    return cost_import(provider=provider, file_name=name, content=content if content is not None else (FILES / name).read_bytes(),
                       **kwargs)


def _total(**filters) -> Decimal:
    return sum((line.amount for line in ProviderCostLine.objects.filter(**filters)), Decimal(0))


@pytest.mark.parametrize("name, kind, measure", [
    ("openai_costs.json", "openai_costs", "cost"),
    ("openai_usage_completions.json", "openai_usage", "usage"),
    ("openai_dashboard_costs.csv", "openai_dashboard_csv", "cost"),
])
def test_openai_files_are_detected_and_read(openai, name, kind, measure):
    record = _import(openai, name)
    assert (record.status, record.source, record.rejected) == ("done", kind, 0)
    assert record.lines == record.read == ProviderCostLine.objects.filter(measure=measure).count() > 0
    lines = ProviderCostLine.objects.all()
    assert all(line.day.year == 2026 and line.day.month == 10 for line in lines)
    assert {line.model for line in lines} >= {"gpt-4o-2024-08-06"}
    if measure == "usage":
        assert sum(line.tokens for line in lines) > 0 and _total() == 0
    else:
        assert _total() > 0 and {line.currency for line in lines} == {"USD"}


def test_openai_costs_api_and_dashboard_export_of_the_same_month_agree_and_do_not_double(openai):
    _import(openai, "openai_costs.json")
    from_api = _total()
    record = _import(openai, "openai_dashboard_costs.csv")
    assert record.replaced > 0 and record.report["days"]
    assert _total() == from_api  # the export restates the days the API gave: not added to them


@pytest.mark.parametrize("name, kind", [("anthropic_cost_report.json", "anthropic_costs"),
                                        ("anthropic_console_costs.csv", "anthropic_console_csv")])
def test_anthropic_files_are_detected_and_read(anthropic, name, kind):
    record = _import(anthropic, name)
    assert (record.status, record.source) == ("done", kind)
    assert record.lines == ProviderCostLine.objects.count() > 0 and _total() > 0


def test_anthropic_report_amounts_are_cents_and_console_export_dollars(anthropic):
    _import(anthropic, "anthropic_cost_report.json")
    report = _total(day=date(2026, 10, 1))
    _import(anthropic, "anthropic_console_costs.csv")
    console = _total(day=date(2026, 10, 1))
    assert abs(report - console) < Decimal("0.50")  # the same day, rounded to cents by the console (and its web search)


def test_a_file_of_the_other_provider_is_refused(openai, anthropic):
    """Reproduction: an Anthropic file for an OpenAI provider was accepted."""
    with pytest.raises(ValidationError, match="does not send"):
        _import(openai, "anthropic_cost_report.json")
    with pytest.raises(ValidationError, match="does not send"):
        _import(anthropic, "openai_dashboard_costs.csv")
    assert not ProviderCostLine.objects.exists()
    assert ProviderCostImport.objects.filter(status="failed").count() == 2


def test_usage_json_is_not_imported_as_costs(openai):
    """Reproduction: OpenAI's usage API JSON uploaded as costs became zero-amount cost lines."""
    with pytest.raises(ValidationError, match="usage API.*not an OpenAI costs"):
        _import(openai, "openai_usage_completions.json", source="openai_costs")
    assert not ProviderCostLine.objects.exists()


def test_a_csv_without_data_rows_is_refused(openai):
    """Reproduction: a CSV with a header and no rows was accepted as an import of nothing."""
    with pytest.raises(ValidationError, match="no lines"):
        _import(openai, "empty.csv", GENERIC.encode())


def test_the_csv_provider_column_must_name_the_provider(openai):
    """Reproduction: the generic CSV's provider column was ignored."""
    content = (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,,10,1.00,USD\n2026-10-03,Anthropic,claude-sonnet-4,p,,10,2.00,USD\n").encode()
    with pytest.raises(ValidationError, match="1 of 2 lines were rejected.*line 3.*Anthropic"):
        _import(openai, "mixed.csv", content)
    assert not ProviderCostLine.objects.exists()
    record = ProviderCostImport.objects.get()
    assert (record.status, record.read, record.rejected, record.lines) == ("failed", 2, 1, 0)
    assert record.report["rejections"] == [{"line": 3, "why": "the line is for provider 'Anthropic', not OpenAI"}]


def test_mixed_currencies_are_refused(openai):
    """Reproduction: lines in EUR and USD were summed."""
    content = (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,,10,1.00,USD\n2026-10-04,OpenAI,gpt-4o-mini,p,,10,2.00,EUR\n").encode()
    with pytest.raises(ValidationError, match="in EUR; Tollgate's currency is USD"):
        _import(openai, "eur.csv", content)
    assert not ProviderCostLine.objects.exists()


def test_lines_with_the_same_amount_for_different_api_keys_are_both_kept(openai):
    """Reproduction: two lines with the same amount for different API keys became one."""
    content = (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,key_a,10,1.00,USD\n2026-10-03,OpenAI,gpt-4o-mini,p,key_b,10,1.00,USD\n").encode()
    record = _import(openai, "keys.csv", content)
    assert record.lines == 2 and _total() == Decimal("2.00")


def test_a_restated_day_replaces_the_day_and_the_report_says_what_changed(openai):
    """Reproduction: a provider restating a day (10.00, then 14.00) gave 24.00."""
    _import(openai, "first.csv", (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,,10,10.00,USD\n"
                                            "2026-10-04,OpenAI,gpt-4o-mini,p,,10,1.00,USD\n").encode())
    restated = _import(openai, "restated.csv", (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,,12,14.00,USD\n").encode())
    assert _total(day=date(2026, 10, 3)) == Decimal("14.00") and _total() == Decimal("15.00")
    assert (restated.read, restated.lines, restated.replaced, restated.rejected) == (1, 1, 1, 0)
    assert restated.report["days"] == [{"day": "2026-10-03", "measure": "cost", "lines_before": 1, "lines_now": 1,
                                        "amount_before": "10.00000000", "amount_now": "14.00000000",
                                        "tokens_before": 10, "tokens_now": 12}]


def test_every_line_of_a_large_csv_is_imported_and_counted(openai):
    """Reproduction: a 1,000,000-row CSV imported 291,000 lines (the key had the amount, not the tokens or
    the key) and said so as success. Rows repeating a day, model and amount are all kept."""
    rows = "".join(f"2026-10-{1 + i % 28:02d},OpenAI,gpt-4o-mini,proj_{i % 3},key_{i % 7},{i},{(i % 5) / 100:.2f},USD\n"
                   for i in range(12_000))
    record = _import(openai, "big.csv", (GENERIC + rows).encode())
    assert record.read == record.lines == ProviderCostLine.objects.count() == 12_000
    assert _total() == sum(Decimal(f"{(i % 5) / 100:.2f}") for i in range(12_000))


def test_an_upload_is_accepted_by_the_page_and_read_by_the_worker(client, openai, django_capture_on_commit_callbacks):
    """Reproduction: a 60 MB upload was parsed inside the web request, blocking the worker that also serves
    the relay. Now the request stores the file and queues it; the page shows its progress, then its report."""
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    content = (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,,10,1.00,USD\n").encode()
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = client.post("/ledger/reconciliation/", {"upload-provider": openai.pk,
                                                           "upload-file": SimpleUploadedFile("oct.csv", content)})
    record = ProviderCostImport.objects.get()
    assert response.status_code == 302 and record.status == "pending" and not ProviderCostLine.objects.exists()
    page = client.get(f"/ledger/cost-import/{record.pk}/").content.decode()
    assert "Waiting to be read" in page and 'http-equiv="refresh"' in page
    for callback in queued:
        callback()
    record.refresh_from_db()
    assert (record.status, record.lines) == ("done", 1)
    page = client.get(f"/ledger/cost-import/{record.pk}/").content.decode()
    assert "Imported" in page and 'http-equiv="refresh"' not in page


def test_an_upload_over_the_size_limit_is_a_field_error(client, openai, settings):
    settings.TOLLGATE_COST_IMPORT_MAX_BYTES = 100
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    response = client.post("/ledger/reconciliation/", {"upload-provider": openai.pk,
                                                       "upload-file": SimpleUploadedFile("big.csv", b"x" * 101)})
    assert response.status_code == 400 and "the limit is 100" in response.content.decode()
    assert not ProviderCostImport.objects.exists()


def test_a_refused_file_can_be_fixed_and_imported(openai, settings):
    content = (GENERIC + "2026-10-03,OpenAI,gpt-4o-mini,p,,10,1.00,EUR\n").encode()
    with pytest.raises(ValidationError):
        _import(openai, "eur.csv", content)
    settings.TOLLGATE_CURRENCY = "EUR"
    assert _import(openai, "eur.csv", content).status == "done"


def test_json_pages_of_the_cost_api_are_read_with_their_fields(openai):
    _import(openai, "openai_costs.json")
    document = json.loads((FILES / "openai_costs.json").read_text())
    results = [r for bucket in document["data"] for r in bucket["results"]]
    assert ProviderCostLine.objects.count() == len(results)
    cached = ProviderCostLine.objects.filter(description__contains="cached input").first()
    assert cached is not None and cached.project.startswith("proj_")


def test_a_fault_while_reading_fails_the_import_instead_of_leaving_it_running(openai):
    from django.core.files.base import ContentFile

    from ledger.imports import cost_import_accept, cost_import_run

    record = cost_import_accept(provider=openai, file=ContentFile(b"date,model,amount\n2026-10-01,m,1\n", name="a.csv"),
                                file_name="a.csv")
    record.file.storage.delete(record.file.name)  # the shared volume lost it
    record = cost_import_run(record.pk)
    assert record.status == "failed" and "FileNotFoundError" in record.error and not ProviderCostLine.objects.exists()
