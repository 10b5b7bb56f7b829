"""Budget enforcement through the relay (in-process live server): class behaviour at the cap, downgrade,
paging, expired grants, model allowlists, crashed holds, and Redis outages."""
import time
from decimal import Decimal

import pytest
import requests
from django.core import mail
from django.utils import timezone

from budgets import enforcement
from budgets.models import Grant, GrantAlert
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory

pytestmark = pytest.mark.redis
HELLO = [{"role": "user", "content": "hello there"}]


def call(relay, key, model="pricey", **extra):
    return requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                         json={"model": model, "messages": HELLO, "max_tokens": 5, **extra}, timeout=10)


@pytest.fixture
def pricey(relay, fresh_state):
    # An OpenAI model name, so the hold counts the prompt with its tokenizer: 10 input tokens + max_tokens 5
    # = $0.02 held; the call costs $0.01 (the stub bills 2 words of input and 4 of output).
    return relay.alias("pricey", (relay.openai_provider, "gpt-4o-stub"), price=("1000", "2000", "0"))


@pytest.fixture
def team_grant(key):
    return GrantFactory(name="Team budget", scope=Grant.Scope.TEAM, team=key.team, limit_amount=Decimal("0.05"), owner=key.team.owner)


def test_experimentation_cap_refuses_naming_the_grant_and_owner(relay, pricey, key, team_grant):
    statuses = [call(relay, key).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]  # 0.04 spent + 0.02 worst case > 0.05
    refusal = call(relay, key).json()["error"]
    assert refusal["code"] == "budget_exceeded" and "Team budget" in refusal["message"] and str(team_grant.owner) in refusal["message"]
    row = LedgerEntry.objects.filter(error_code="budget_exceeded").first()
    assert row.cost == 0 and row.grant_id == team_grant.pk
    assert GrantAlert.objects.filter(grant=team_grant, kind="cap").count() == 1  # the owner hears once
    assert sum("is at its cap" in m.subject and team_grant.owner.email in m.to for m in mail.outbox) == 1


def test_every_call_names_its_most_specific_grant_and_all_it_was_charged_to(relay, pricey, key, team_grant):
    org = GrantFactory(name="Org", scope=Grant.Scope.ORG, team=None, limit_amount=Decimal("100"))
    team_grant.parent = org
    team_grant.save()
    personal = GrantFactory(name="Mine", scope=Grant.Scope.PERSON, person=key.person, team=None, parent=team_grant,
                            limit_amount=Decimal("0.05"))
    response = call(relay, key)
    assert response.status_code == 200, response.text
    row = LedgerEntry.objects.get()
    assert row.grant_id == personal.pk and row.grant_path == f",{personal.pk},{team_grant.pk},{org.pk},"


def test_thresholds_alert_once_each_per_period(relay, pricey, key, team_grant, django_capture_on_commit_callbacks):
    team_grant.limit_amount = Decimal("0.04")
    team_grant.alert_thresholds = [50, 80, 100]
    team_grant.save()
    for _ in range(4):
        call(relay, key)
    assert list(GrantAlert.objects.order_by("kind").values_list("kind", flat=True)) == ["50", "cap"]  # 0.03 spent, then refused
    assert any("reached 50%" in m.subject and team_grant.owner.email in m.to for m in mail.outbox)


def test_production_grant_can_downgrade_premium_calls(relay, pricey, key, team_grant):
    from gateway.models import ModelAlias

    pricey.tier = ModelAlias.Tier.PREMIUM
    pricey.save()
    cheap = relay.alias("cheap", (relay.openai_provider, "gpt-stub-mini"), price=("1", "2", "0"))
    team_grant.grant_class, team_grant.on_cap, team_grant.downgrade_to = "production", Grant.OnCap.DOWNGRADE, cheap
    team_grant.save()
    results = [call(relay, key) for _ in range(5)]
    assert [r.status_code for r in results] == [200] * 5
    assert [r.headers["x-tollgate-model"] for r in results][-1] == "gpt-stub-mini"
    downgraded = LedgerEntry.objects.filter(alias=cheap)
    assert downgraded.exists() and all("downgraded from 'pricey'" in e.detail for e in downgraded)


def test_production_grant_can_allow_and_page(relay, pricey, key, team_grant, django_capture_on_commit_callbacks):
    team_grant.grant_class, team_grant.on_cap = "production", Grant.OnCap.ALLOW_AND_PAGE
    team_grant.save()
    assert [call(relay, key).status_code for _ in range(7)] == [200] * 7
    assert GrantAlert.objects.filter(kind="page").count() == 1
    assert any("PAGE:" in m.subject for m in mail.outbox)


def test_expired_grant_refuses_with_grant_expired(relay, pricey, key, team_grant):
    team_grant.renews_at = timezone.localdate() - timezone.timedelta(days=1)
    team_grant.save()
    response = call(relay, key)
    assert response.status_code == 403 and response.json()["error"]["code"] == "grant_expired"


def test_grant_allowlist_narrows_the_models(relay, pricey, key, team_grant):
    other = relay.alias("other", (relay.openai_provider, "gpt-other"))
    team_grant.allowed_models.set([other])
    response = call(relay, key)
    assert response.status_code == 403 and response.json()["error"]["code"] == "model_not_allowed"
    assert call(relay, key, model="other").status_code == 200


def test_a_crashed_workers_hold_expires_and_the_call_that_fits_is_admitted(relay, pricey, key, team_grant, settings):
    settings.TOLLGATE_HOLD_SECONDS = 1
    grants = enforcement.covering_grants(key=key, person=key.person, team=key.team, tags={})
    enforcement.reserve(grants=grants, key=key, cost=Decimal("0.05"), tokens=0)  # reserved, then the worker died
    assert call(relay, key).json()["error"]["code"] == "budget_exceeded"
    time.sleep(1.2)
    assert call(relay, key).status_code == 200


def test_counters_roll_over_with_the_period(relay, pricey, key, team_grant):
    import time_machine

    for _ in range(4):
        call(relay, key)
    assert call(relay, key).status_code == 429
    next_month = (timezone.localtime().replace(day=28) + timezone.timedelta(days=5)).replace(day=2)
    with time_machine.travel(next_month):
        assert call(relay, key).status_code == 200


@pytest.mark.parametrize("grant_class, status, code", [("production", 200, None), ("experimentation", 503, "budget_unverifiable")])
def test_unreachable_counters_fail_open_or_closed_by_class(relay, pricey, key, team_grant, settings, grant_class, status, code,
                                                           django_capture_on_commit_callbacks):
    team_grant.grant_class = grant_class
    team_grant.save()
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = call(relay, key)
    assert response.status_code == status
    row = LedgerEntry.objects.get()
    if code:
        assert response.json()["error"]["code"] == code and row.error_code == code
    else:
        assert "budget unverified" in row.detail and GrantAlert.objects.filter(kind="unverified").count() == 1
