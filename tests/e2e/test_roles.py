"""Each demo role walks its main story in headless Chromium (issue 15), through the console's navigation, and
saves screenshots (to TOLLGATE_SCREENSHOTS_DIR when set: the README's come from there)."""
import os
from pathlib import Path

import openai
import pytest

from budgets.models import Grant
from keys.models import AccessRequest, VirtualKey
from ledger.models import LedgerEntry
from ledger.services import ledger_rollup

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


def shoot(site, tmp_path: Path, name: str) -> None:
    for directory in filter(None, [tmp_path, os.environ.get("TOLLGATE_SCREENSHOTS_DIR")]):
        path = Path(directory) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert site.driver.save_screenshot(str(path)) and path.stat().st_size > 10_000


def nav(site) -> dict[str, str]:
    return {a.text.split("\n")[0].rstrip("0123456789 "): a.get_attribute("href")
            for a in site.find_all("header.top nav.console a")}


def go(site, label: str) -> None:
    """Follow the console's navigation, as a person does."""
    site.driver.get(nav(site)[label])


def request_key(site, model: str, project: str) -> None:
    go(site, "Request access")
    Select(site.wait_for("#id_team")).select_by_visible_text("Platform")
    [label for label in site.find_all("#id_aliases label") if label.text.split()[0] == model][0].click()
    site.find("#id_use_case").send_keys(f"The {project} story of the browser test.")
    site.find("#id_project").send_keys(project)
    for box in site.find_all("#id_accept_policy, input[name=accept_policy]"):
        if not box.is_selected():
            box.click()
    site.submit("#submit-request")


def test_an_employee_gets_started_gets_a_key_calls_and_sees_it_on_the_key_page(site, tmp_path):
    site.log_in("bob")
    assert {"My keys", "Request access", "Getting started", "Budgets", "Usage"} <= set(nav(site))
    assert "Chargeback" not in nav(site) and "Admin" not in nav(site)
    go(site, "Getting started")
    assert "chat/completions" in site.find("main").text
    request_key(site, "fast", "roles-e2e")
    secret = site.wait_for("#new-key").text.strip()
    with openai.OpenAI(base_url=site.url + "/v1", api_key=secret, max_retries=0, timeout=10) as sdk:
        reply = sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "mock reply: hello"
    key = VirtualKey.objects.get(prefix=secret[:12])
    ledger_rollup()
    site.open(f"/keys/{key.pk}/")
    page = site.wait_for("main").text
    assert "fast" in page and key.prefix in page and secret not in site.driver.page_source
    assert LedgerEntry.objects.filter(key=key).count() == 1
    shoot(site, tmp_path, "employee-key-page")
    go(site, "Usage")
    assert "Spend" in site.wait_for("main h1").text or "Usage" in site.find("main h1").text
    shoot(site, tmp_path, "employee-usage")


def test_an_approver_sees_the_waiting_count_and_decides(site, tmp_path):
    site.log_in("bob")
    request_key(site, "smart", "roles-premium")
    pending = AccessRequest.objects.get(project="roles-premium")
    site.log_out()
    site.log_in("carol")
    counts = [a.text for a in site.find_all("header.top nav.console a") if a.text.startswith("Approvals")]
    assert counts and counts[0].split()[-1].isdigit() and int(counts[0].split()[-1]) >= 1
    go(site, "Approvals")
    row = site.wait_for(f"#request-{pending.pk}")
    assert "roles-premium" in row.text and "smart" in row.text
    shoot(site, tmp_path, "approver-queue")
    row.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("fine")
    site.submit(f"#request-{pending.pk} button[value=approve]")
    assert "Approved" in site.message()
    pending.refresh_from_db()
    assert pending.status == "approved"


def test_an_owner_renews_a_grant_due_and_delegates_within_the_team(site, tmp_path):
    site.log_in("alice")
    go(site, "Budgets")
    grant = Grant.objects.get(name="Platform monthly")
    row = site.wait_for(f"#grant-{grant.pk}")
    assert "USD" in row.text and "per month" in row.text
    shoot(site, tmp_path, "owner-budgets")
    site.submit(f"#grant-{grant.pk} form button")
    assert "renewed until" in site.message()
    assert not site.find_all(f"#grant-{grant.pk} form button")  # not offered again
    site.open(f"/budgets/{grant.pk}/delegate/")
    people = [o.text for o in Select(site.wait_for("#id_person")).options if o.get_attribute("value")]
    assert people and not any("Finance" in p or "Auditor" in p for p in people)


def test_finance_reads_usage_chargeback_and_reconciliation(site, tmp_path):
    site.log_in("finance")
    assert {"Usage", "Chargeback", "Reconciliation"} <= set(nav(site))
    go(site, "Usage")
    Select(site.wait_for("select[name=period]")).select_by_value("30d")
    site.submit("main form button[type=submit]")
    assert site.find_all("main svg"), "no chart on the usage page"
    shoot(site, tmp_path, "finance-usage")
    go(site, "Chargeback")
    site.wait_for("#id_start")
    site.submit("main form button[type=submit]")
    assert "Amount" in site.find("main").text
    go(site, "Reconciliation")
    assert "Import provider costs" in site.wait_for("main").text


def test_it_opens_the_admin_from_the_console_and_sees_keys_with_spend(site, tmp_path):
    site.log_in("it")
    go(site, "Admin")
    site.open("/admin/keys/virtualkey/")
    header = site.wait_for("#result_list thead").text.lower()
    assert "spend" in header
    shoot(site, tmp_path, "it-admin-keys")


def test_an_auditor_reads_but_is_refused_a_true_up_with_the_consoles_page(site, tmp_path):
    site.log_in("auditor")
    go(site, "Usage")
    site.wait_for("main h1")
    site.open("/ledger/reconciliation/1/true-up/")
    assert "You are not allowed to do this" in site.wait_for("main").text
    assert site.find_all("header.top nav.console a")  # the console stays around the refusal
    site.open("/no-such-page/")
    assert "This page does not exist" in site.wait_for("main").text
    shoot(site, tmp_path, "auditor-404")
