"""The key page: models with prices, limits, spend and what is left this period with the holds of calls in flight,
the reset date, the last calls with why they were refused, rotation grace, usage over time, and history with the
approval."""
import re
from datetime import date
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets import enforcement
from budgets.models import Grant
from gateway.models import ModelAlias
from governance.models import Membership
from keys import services
from keys.models import AccessRequest
from ledger.models import DailyRollup, LedgerEntry
from tests.budgets.factories import GrantFactory
from tests.gateway.factories import DeploymentFactory, ModelAliasFactory, ModelPriceFactory
from tests.governance.factories import MembershipFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def holder(client):
    membership = MembershipFactory()
    client.force_login(membership.person)
    return membership


@pytest.fixture
def key(holder):
    fast = ModelAliasFactory(name="fast")
    ModelPriceFactory(provider_model=DeploymentFactory(alias=fast).provider_model,
                      input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    key = VirtualKeyFactory(person=holder.person, team=holder.team, rpm_limit=60, tpd_limit=200_000,
                            monthly_budget=Decimal("10.00"), default_tags={"project": "notes"})
    key.allowed_models.set([fast])
    return key


def section(body: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}"(.*?)</(table|dl)>', body, re.S).group(1)


def test_key_page_shows_its_models_with_prices_and_its_limits(client, key):
    body = client.get(f"/keys/{key.pk}/").content.decode()
    models = section(body, "models")
    assert "fast" in models and "$0.15" in models and "$0.6" in models
    limits = section(body, "limits")
    assert "60" in limits and "200000" in limits and "no key limit" in limits


@pytest.mark.redis
def test_key_page_shows_spend_holds_in_flight_budget_left_and_reset_date(client, key, fresh_state):
    LedgerEntryFactory(key=key, cost=Decimal("2.50000000"))
    team_grant = GrantFactory(team=key.team, limit_amount=Decimal("100.00"), period=Grant.Period.MONTHLY)
    grants = enforcement.covering_grants(key=key, person=key.person, team=key.team, tags=key.default_tags)
    assert grants == [team_grant]
    in_flight = enforcement.reserve(grants=grants, key=key, cost=Decimal("1.25"), tokens=0)  # a call in flight
    try:
        budgets = section(client.get(f"/keys/{key.pk}/").content.decode(), "budgets")
    finally:
        enforcement.release(in_flight)  # the call ends: no hold outlives the test
    rows = re.findall(r"<tr>(.*?)</tr>", budgets, re.S)
    own = next(row for row in rows if "This key" in row)
    assert "$2.50" in own and "$1.25" in own and "$10.00" in own and "$6.25" in own  # spent, held, limit, left
    next_month = (timezone.localdate().replace(day=28) + timezone.timedelta(days=4)).replace(day=1)
    assert f"{next_month:%Y-%m-%d}" in own
    grant_row = next(row for row in rows if team_grant.name in row)
    assert "$1.25" in grant_row and "$98.75" in grant_row  # the ledger row above was charged to no grant


def test_key_page_lists_the_last_50_calls_of_30_days_with_refusal_reasons(client, key):
    LedgerEntryFactory(key=key, created_at=timezone.now() - timezone.timedelta(days=31), model_requested="ancient")
    for _ in range(50):
        LedgerEntryFactory(key=key, input_tokens=120, output_tokens=30)
    LedgerEntryFactory(key=key, outcome=LedgerEntry.Outcome.REFUSED, http_status=429, error_code="budget_exceeded",
                       detail="key budget: 9.99 of 10.00 spent or held", cost=Decimal(0), input_tokens=0, output_tokens=0)
    LedgerEntryFactory(model_requested="someone-elses")
    calls = section(client.get(f"/keys/{key.pk}/").content.decode(), "calls")
    rows = re.findall(r"<tr>(.*?)</tr>", calls, re.S)[1:]
    assert len(rows) == 50
    assert "budget_exceeded" in rows[0] and "9.99 of 10.00 spent or held" in rows[0] and "429" in rows[0]
    assert "120 / 30" in rows[1] and "$0.000125" in rows[1]
    assert "ancient" not in calls and "someone-elses" not in calls


def test_key_page_says_the_previous_secret_works_until_the_grace_period_ends(client, key):
    """Reproduction: after a rotation nothing said the old secret keeps working for 24 hours."""
    rotated = client.post(f"/keys/{key.pk}/rotate/").content.decode()
    key.refresh_from_db()
    until = timezone.localtime(key.previous_key_expires_at)
    assert key.previous_key_expires_at - timezone.now() > timezone.timedelta(hours=23, minutes=59)
    assert 'id="rotation-grace"' in rotated and f"{until:%Y-%m-%d %H:%M}" in rotated
    page = client.get(f"/keys/{key.pk}/").content.decode()
    assert "previous secret keeps working until" in page and f"{until:%Y-%m-%d %H:%M}" in page


def test_key_page_says_nothing_of_grace_once_it_is_over(client, key):
    services.key_rotate(key=key, actor=key.person, grace_hours=0)
    assert 'id="rotation-grace"' not in client.get(f"/keys/{key.pk}/").content.decode()


def test_approved_key_history_shows_the_approval_and_who_gave_it(client, holder):
    smart = ModelAliasFactory(name="smart", tier=ModelAlias.Tier.PREMIUM)
    submitted = services.request_submit(
        requester=holder.person, team=holder.team, aliases=[smart], use_case="agents", key_class="experimentation",
        environment="development", project="agents", duration_days=30, monthly_budget=None)
    approver = MembershipFactory(team=holder.team, role=Membership.Role.APPROVER).person
    services.request_approve(access_request=submitted.request, actor=approver, reason="for the pilot")
    key = services.request_collect(access_request=submitted.request, requester=holder.person).key
    body = client.get(f"/keys/{key.pk}/").content.decode()
    approval = re.search(r'<dd id="approval">(.*?)</dd>', body, re.S).group(1)
    assert f"Approved by {approver}" in approval and "for the pilot" in approval
    history = section(body, "history")
    assert "access_request.submit" in history and "access_request.approve" in history and approver.username in history
    assert "key.issue" in history
    assert AccessRequest.objects.get().decided_by == approver


def test_policy_provisioned_key_says_so(client, holder):
    fast = ModelAliasFactory(name="fast")
    submitted = services.request_submit(
        requester=holder.person, team=holder.team, aliases=[fast], use_case="notes", key_class="experimentation",
        environment="development", project="", duration_days=30, monthly_budget=None)
    approval = re.search(r'<dd id="approval">(.*?)</dd>', client.get(f"/keys/{submitted.issued.key.pk}/").content.decode(), re.S)
    assert "Approved by the provisioning policy" in approval.group(1)


def test_key_page_charts_the_holders_usage_by_day(client, key):
    today = timezone.localdate()
    DailyRollup.objects.create(day=today - timezone.timedelta(days=3), utc_day=today - timezone.timedelta(days=3),
                               key=key, team=key.team, person=key.person, grain="k-3", calls=7, input_tokens=700,
                               output_tokens=70, cost=Decimal("0.42"))
    LedgerEntryFactory(key=key, cost=Decimal("0.10"))  # today's, not folded into a rollup yet
    body = client.get(f"/keys/{key.pk}/").content.decode()
    assert '<svg class="chart" id="key-usage"' in body
    usage = section(body, "usage")
    assert f"{today - timezone.timedelta(days=3):%Y-%m-%d}" in usage and "$0.4200" in usage and "770" in usage
    assert f"{today:%Y-%m-%d}" in usage and "$0.1000" in usage


def test_a_colleague_without_a_role_cannot_open_the_key_page(client, key):
    client.force_login(MembershipFactory(team=key.team).person)
    assert client.get(f"/keys/{key.pk}/").status_code == 404


def test_reset_date_of_each_period(key):
    from keys.selectors import _next_period

    monday = timezone.make_aware(timezone.datetime(2026, 3, 2))
    assert _next_period(monday, Grant.Period.DAILY, None) == date(2026, 3, 3)
    assert _next_period(monday, Grant.Period.WEEKLY, None) == date(2026, 3, 9)
    assert _next_period(monday, Grant.Period.MONTHLY, None) == date(2026, 4, 1)
    assert _next_period(monday, Grant.Period.TOTAL, date(2026, 6, 30)) == date(2026, 7, 1)
    assert _next_period(monday, Grant.Period.TOTAL, None) is None


def test_my_keys_filters_with_the_apis_filterset(client):
    """One FilterSet per model, shared by the API and the list pages (issue 16): ?status= on My keys."""
    from tests.governance.factories import PersonFactory
    from tests.keys.factories import VirtualKeyFactory

    person = PersonFactory()
    active = VirtualKeyFactory(person=person, name="still-active")
    VirtualKeyFactory(person=person, name="long-gone", status="revoked")
    client.force_login(person)
    page = client.get("/keys/", {"status": "active"}).content.decode()
    assert "still-active" in page and "long-gone" not in page
    assert "long-gone" in client.get("/keys/").content.decode() and active.prefix in page
