"""The usage dashboard (issue 15): scoped by role, every chart with its table and CSV, read from the rollups."""
import csv
import io
import re
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from budgets.models import IncreaseRequest
from governance import roles
from governance.models import Membership
from keys.models import AccessRequest, VirtualKey
from ledger.dashboard import Usage, month_end_forecast, usage_scope
from ledger.models import LedgerEntry
from ledger.services import ledger_rollup
from tests.budgets.factories import GrantFactory
from tests.gateway.factories import ModelAliasFactory
from tests.governance.factories import MembershipFactory, PersonFactory, TeamFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db
URL = "/ledger/usage/"


@pytest.fixture
def org():
    """Two teams: Emma and Frank in Apollo (owned by Olivia), Gina in Zephyr. Spend this month, rolled up."""
    olivia = PersonFactory(username="olivia")
    apollo, zephyr = TeamFactory(name="Apollo", owner=olivia), TeamFactory(name="Zephyr")
    emma, frank, gina = (PersonFactory(username=name) for name in ("emma", "frank", "gina"))
    for person, team in ((emma, apollo), (frank, apollo), (gina, zephyr)):
        MembershipFactory(person=person, team=team)
    keys = {"emma": VirtualKeyFactory(person=emma, team=apollo), "frank": VirtualKeyFactory(person=frank, team=apollo),
            "gina": VirtualKeyFactory(person=gina, team=zephyr)}
    fast = ModelAliasFactory(name="fast")
    now = timezone.now()
    LedgerEntryFactory(key=keys["emma"], cost=Decimal("1.50"), alias=fast, tags={"project": "search"}, created_at=now)
    LedgerEntryFactory(key=keys["frank"], cost=Decimal("2.25"), alias=fast, created_at=now)
    LedgerEntryFactory(key=keys["gina"], cost=Decimal("7.00"), alias=fast, tags={"project": "zephyr-secret"}, created_at=now)
    LedgerEntryFactory(key=keys["emma"], cost=0, input_tokens=0, output_tokens=0, outcome=LedgerEntry.Outcome.REFUSED, http_status=429,
                       error_code="budget_exceeded", created_at=now)
    LedgerEntryFactory(key=keys["frank"], cost=0, input_tokens=0, output_tokens=0, outcome=LedgerEntry.Outcome.UPSTREAM_ERROR,
                       http_status=502, error_code="upstream_timeout", created_at=now)
    LedgerEntryFactory(key=keys["gina"], cost=0, input_tokens=0, output_tokens=0, outcome=LedgerEntry.Outcome.REFUSED, http_status=429,
                       error_code="zephyr_only_reason", created_at=now)
    ledger_rollup()
    return {"olivia": olivia, "emma": emma, "frank": frank, "gina": gina, "apollo": apollo, "zephyr": zephyr, "keys": keys}


def _page(client, person, query=""):
    client.force_login(person)
    response = client.get(URL + query)
    assert response.status_code == 200
    return response, response.content.decode()


def _table(html: str, name: str) -> list[list[str]]:
    """The body rows of one section's table, as the page shows them."""
    body = re.search(rf'<table class="list" id="{name}-table">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    return [re.findall(r"<td>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_anonymous_is_sent_to_login(client):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_employee_sees_only_their_own_spend(client, org):
    response, html = _page(client, org["emma"])
    assert usage_scope(org["emma"]).kind == "own"
    assert [row[0] for row in _table(html, "by_person")] == [str(org["emma"])]
    assert _table(html, "by_team") == [["Apollo", "1", "150", "1.50"]]
    assert "Zephyr" not in html and "frank" not in html.lower() and "zephyr_only_reason" not in html
    assert _table(html, "refused_by_reason") == [["budget_exceeded", "1"]]


def test_owner_sees_their_teams_and_never_another_teams_numbers(client, org):
    response, html = _page(client, org["olivia"])
    assert usage_scope(org["olivia"]).kind == "teams"
    assert _table(html, "by_team") == [["Apollo", "3", "300", "3.75"]]  # a failed call counts, a refused one not
    assert {row[0] for row in _table(html, "by_person")} == {str(org["emma"]), str(org["frank"])}
    for leak in ("Zephyr", "zephyr-secret", "zephyr_only_reason", "7.00", str(org["gina"])):
        assert leak not in html
    assert _table(html, "failed_by_error") == [["upstream_timeout", "1"]]


def test_an_approver_of_a_team_sees_it_like_its_owner(client, org):
    MembershipFactory(person=org["frank"], team=org["zephyr"], role=Membership.Role.APPROVER)
    response, html = _page(client, org["frank"])
    assert {row[0] for row in _table(html, "by_team")} == {"Apollo", "Zephyr"}  # own spend in Apollo, Zephyr managed
    assert {row[0] for row in _table(html, "by_person")} == {str(org["frank"]), str(org["gina"])}


@pytest.mark.parametrize("role", [roles.FINANCE, roles.IT_ADMIN, roles.SECURITY_AUDITOR])
def test_finance_it_and_auditors_see_everything(client, org, role):
    response, html = _page(client, PersonFactory(roles=[role]))
    assert _table(html, "by_team") == [["Zephyr", "1", "150", "7.00"], ["Apollo", "3", "300", "3.75"]]
    assert _table(html, "refused_by_reason") == [["budget_exceeded", "1"], ["zephyr_only_reason", "1"]]
    assert _table(html, "by_project") == [["zephyr-secret", "1", "150", "7.00"], ["(untagged)", "2", "150", "2.25"],
                                          ["search", "1", "150", "1.50"]]


def test_each_chart_is_svg_with_a_title_and_followed_by_its_table(client, org):
    response, html = _page(client, PersonFactory(roles=[roles.FINANCE]))
    assert "<script" not in html
    for name in ("over_time", "forecast", "by_team", "by_alias", "by_provider", "by_cost_center", "by_key",
                 "failed_by_error", "refused_by_reason"):
        section = re.search(rf'<section class="dashboard-section" id="{name}".*?</section>', html, re.S).group(0)
        svg = re.search(r"<svg [^>]*>", section).group(0)
        assert 'role="img"' in svg and "aria-label=" in svg
        assert "<title" in section
        assert section.index("</svg>") < section.index(f'id="{name}-table"')
        assert f"table={name}&amp;format=csv" in section


def test_csv_has_the_same_cells_as_the_table(client, org):
    response, html = _page(client, PersonFactory(roles=[roles.FINANCE]), "?period=30d&granularity=week")
    for name in ("by_team", "over_time", "refused_by_reason"):
        download = client.get(URL, {"period": "30d", "granularity": "week", "table": name, "format": "csv"})
        assert download["Content-Type"] == "text/csv"
        header, *rows = list(csv.reader(io.StringIO(download.content.decode())))
        assert rows == _table(html, name)
        assert header[-1] in ("Spend (USD)", "Calls")


def test_csv_of_an_employee_leaks_no_other_team(client, org):
    client.force_login(org["gina"])
    download = client.get(URL, {"table": "by_team", "format": "csv"})
    assert list(csv.reader(io.StringIO(download.content.decode())))[1:] == [["Zephyr", "1", "150", "7.00"]]
    assert client.get(URL, {"table": "nothing", "format": "csv"}).status_code == 404


def test_month_end_forecast_is_linear_from_month_to_date():
    april_11 = datetime(2026, 4, 11, tzinfo=dt_timezone.utc)  # 10 days of April's 30 elapsed
    assert month_end_forecast(Decimal("100"), april_11) == Decimal("300.00")
    assert month_end_forecast(Decimal("5"), datetime(2026, 2, 1, 6, tzinfo=dt_timezone.utc)) == Decimal("140.00")  # >= 1 day


def test_page_shows_the_forecast_of_this_month(client, org):
    finance = PersonFactory(roles=[roles.FINANCE])
    response, html = _page(client, finance)
    report = Usage(scope=usage_scope(finance))
    assert report.month_spent == Decimal("10.75")
    expected = month_end_forecast(Decimal("10.75"), report.now)
    last = _table(html, "forecast")[-1]
    assert last[3] == "forecast" and Decimal(last[2]) >= Decimal("10.75")
    assert abs(Decimal(last[2]) - expected) <= Decimal("0.05")  # a few seconds passed between the two readings
    assert 'stroke-dasharray' in html


def test_attention_sections_show_their_rows(client, org):
    olivia, apollo, now = org["olivia"], org["apollo"], timezone.now()
    grant = GrantFactory(name="Apollo budget", owner=olivia, team=apollo, limit_amount=Decimal("4.00"))
    LedgerEntryFactory(key=org["keys"]["emma"], cost=Decimal("3.50"), grant_path=f",{grant.pk},")
    ledger_rollup()
    VirtualKeyFactory(name="soon gone", person=org["emma"], team=apollo, expires_at=now + timedelta(days=5))
    GrantFactory(name="Apollo lapsing", owner=olivia, team=apollo, limit_amount=Decimal("1"),
                 renews_at=timezone.localdate() + timedelta(days=20))
    idle = VirtualKeyFactory(name="idle", person=org["frank"], team=apollo)
    VirtualKey.objects.filter(pk=idle.pk).update(last_used_at=now - timedelta(days=40), created_at=now - timedelta(days=90))
    AccessRequest.objects.create(requester=org["frank"], team=apollo, use_case="summaries")
    IncreaseRequest.objects.create(grant=grant, requester=olivia, new_limit=Decimal("10"), reason="launch")
    response, html = _page(client, olivia)
    assert _table(html, "grants_near_limit")[0][:1] + _table(html, "grants_near_limit")[0][4:] == [
        "Apollo budget", "3.50", "4.00", "88%", "near"]
    expiring = _table(html, "expiring")
    assert [row[1].split(" (")[0] for row in expiring] == ["soon gone", "Apollo lapsing"]
    assert [row[5] for row in expiring] == ["within 7 days", "within 30 days"]
    assert [row[0].split(" (")[0] for row in _table(html, "unused_keys")] == ["idle"]
    assert _table(html, "pending_requests")[0][1:3] == [str(org["frank"]), "Apollo"]
    assert _table(html, "pending_increases")[0][2:5] == ["Apollo budget", "4.00", "10.00"]
    assert _table(html, "expensive_calls")[0][6] == "3.50"  # Gina's 7.00 is another team's
    response, html = _page(client, org["gina"])  # none of it is Gina's
    for name in ("grants_near_limit", "expiring", "unused_keys", "pending_requests", "pending_increases"):
        assert f'id="{name}-table"' not in html


def test_a_person_with_no_usage_sees_empty_states(client, db):
    response, html = _page(client, PersonFactory())
    for text in ("No usage in this period.", "No spend this month yet: nothing to forecast.",
                 "No failed calls in this period.", "No refused calls in this period.", "No calls in the last 7 days.",
                 "No grant is at 80% of its limit.", "Nothing expires within 30 days.", "No access request is waiting.",
                 "No increase request is waiting."):
        assert text in html
    assert "<svg" not in html


def test_a_bad_period_is_refused_and_the_default_shown(client, org):
    client.force_login(org["emma"])
    assert client.get(URL, {"period": "forever"}).status_code == 400
