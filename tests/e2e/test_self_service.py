"""Self-service in a real browser: request a key, see it once, call the relay with it; a premium key goes to an
approver, who approves it in the browser, and the requester collects it. Headless Chromium against the live server."""
import re

import openai
import pytest

from keys.models import AccessRequest, VirtualKey
from ledger.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)  # the live server reads what the test writes

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

KEY_FORMAT = re.compile(r"tg_[lt]_[0-9A-Za-z]{49}")


def fill_request_form(site, *, model: str | None, use_case: str, project: str) -> None:
    site.open("/keys/request/")
    Select(site.wait_for("#id_team")).select_by_visible_text("Platform")
    if model is not None:
        labels = [label for label in site.find_all("#id_aliases label") if label.text.split()[0] == model]
        assert len(labels) == 1, f"no single checkbox for model {model!r}"
        labels[0].click()
    site.find("#id_use_case").send_keys(use_case)
    Select(site.find("#id_key_class")).select_by_value("experimentation")
    Select(site.find("#id_environment")).select_by_value("development")
    site.find("#id_project").send_keys(project)
    Select(site.find("#id_duration_days")).select_by_value("30")
    assert site.find("#id_monthly_budget").get_attribute("value") == ""
    site.submit("#submit-request")


def key_shown_once(site) -> str:
    secret = site.wait_for("#new-key").text.strip()
    assert KEY_FORMAT.fullmatch(secret), f"not a Tollgate key: {secret!r}"
    copy = site.find("button.copy[data-copy=new-key]")
    copy.click()  # exercised, not relied on: headless Chromium's clipboard is not read back
    site.wait_until(lambda d: copy.text == "Copied", "the Copy button did not react")
    return secret


def ask_relay(site, secret: str, model: str) -> str:
    # Closed on the way out: an open keep-alive connection would keep the live server's request thread, and
    # its database connection, alive past the test.
    with openai.OpenAI(base_url=site.url + "/v1", api_key=secret, max_retries=0, timeout=10) as sdk:
        reply = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": f"hello {model}"}])
    return reply.choices[0].message.content


@pytest.mark.redis  # the relay's limits and budget holds live in Redis
def test_a_person_gets_a_standard_key_at_once_and_a_premium_key_after_approval(site, tmp_path):
    # 1. bob asks for the standard model: policy provisions it and the page shows the key once.
    site.log_in("bob")
    fill_request_form(site, model="fast", use_case="End-to-end check of the self-service flow.", project="e2e-demo")
    assert site.find("h1").text == "Your key is ready"
    secret = key_shown_once(site)
    screenshot = tmp_path / "key-shown-once.png"
    assert site.driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 0
    key = VirtualKey.objects.get(prefix=secret[:12])
    assert (key.person.username, key.status) == ("bob", "active")
    assert key.default_tags == {"environment": "development", "project": "e2e-demo"}
    assert list(key.allowed_models.values_list("name", flat=True)) == ["fast"]

    # 2. The key works against the relay (the demo's mock provider) and the call is in the ledger.
    assert ask_relay(site, secret, "fast") == "mock reply: hello fast"
    assert LedgerEntry.objects.filter(key=key, outcome="ok").count() == 1

    # 3. A premium model needs an approver: no key yet, a message on My keys instead.
    keys_before = VirtualKey.objects.count()
    fill_request_form(site, model="smart", use_case="Premium model for the end-to-end check.", project="e2e-premium")
    assert site.driver.current_url == site.url + "/keys/"
    assert "needs an approver: premium models: smart" in site.message()
    assert VirtualKey.objects.count() == keys_before
    pending = AccessRequest.objects.get(requester__username="bob", project="e2e-premium")
    assert (pending.status, pending.key) == ("pending", None)

    # 4. carol, an approver for platform, approves it in her queue.
    site.log_out()
    site.log_in("carol")
    site.open("/keys/approvals/")
    row = site.wait_for(f"#request-{pending.pk}")
    assert "Bob Builder" in row.text and "smart" in row.text and "premium models: smart" in row.text
    row.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("fine for the e2e check")
    site.submit(f"#request-{pending.pk} button[value=approve]")
    assert "Approved the request from Bob Builder" in site.message()
    pending.refresh_from_db()
    assert (pending.status, pending.decided_by.username, pending.key) == ("approved", "carol", None)
    assert VirtualKey.objects.count() == keys_before  # approving never shows the secret to the approver

    # 5. bob collects the approved key; it is shown once and reaches the premium model.
    site.log_out()
    site.log_in("bob")
    site.open("/keys/")
    site.submit("#requests button.collect")
    assert site.find("h1").text == "Your approved key"
    premium_secret = key_shown_once(site)
    assert premium_secret != secret
    assert ask_relay(site, premium_secret, "smart") == "mock reply: hello smart"
    pending.refresh_from_db()
    assert pending.key.prefix == premium_secret[:12]
    assert LedgerEntry.objects.filter(key=pending.key, outcome="ok").count() == 1
    site.open("/keys/")
    assert not site.find_all("#requests button.collect")  # collected once, no second copy


def test_the_request_form_shows_field_errors_and_creates_nothing(site):
    keys_before = VirtualKey.objects.count()
    site.log_in("bob")
    fill_request_form(site, model=None, use_case="", project="e2e-errors")
    errors = {field.find_element(By.CSS_SELECTOR, "label").text: field.find_element(By.CSS_SELECTOR, ".errors").text
              for field in site.find_all(".field.has-error")}
    assert errors == {"Models": "This field is required.", "Business use case": "This field is required."}
    assert site.find("#id_project").get_attribute("value") == "e2e-errors"  # what was typed is kept
    assert not AccessRequest.objects.exists()
    assert VirtualKey.objects.count() == keys_before
