"""Single sign-on against a real OpenID provider on loopback (tests/governance/oidc_provider.py): the Django
test client starts the login at /oidc/authenticate/, follows the redirect to the provider over HTTP, and comes
back to /oidc/callback/ with the code; Tollgate then calls the provider's token, JWKS and userinfo endpoints
itself. Groups become roles and team memberships; a person the provider reports disabled is deactivated with
their keys suspended, as is a person deactivated in the admin; the password form stays for break-glass."""
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.test import Client
from django.urls import reverse

from governance import roles, sso
from governance.models import AuditEvent, Membership, Person
from keys.models import VirtualKey
from tests.governance.factories import MembershipFactory, PersonFactory, TeamFactory
from tests.governance.oidc_provider import OIDCProvider
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db
CLIENT_ID, CLIENT_SECRET = "tollgate", "tollgate-client-secret"
PASSWORD = "correct horse battery staple"
SSO_BACKENDS = ["axes.backends.AxesStandaloneBackend", "governance.sso.BreakGlassModelBackend",
                "governance.sso.TollgateOIDCBackend"]


@pytest.fixture(scope="module")
def provider():
    running = OIDCProvider(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    yield running
    running.stop()


@pytest.fixture
def sso_on(settings, provider):
    """SSO configured as the environment would (the settings module's own reading: test_settings_...)."""
    settings.OIDC_RP_CLIENT_ID = CLIENT_ID
    settings.OIDC_RP_CLIENT_SECRET = CLIENT_SECRET
    settings.TOLLGATE_OIDC_ISSUER = provider.issuer  # endpoints from its discovery document
    settings.TOLLGATE_OIDC_ROLE_GROUPS = {"tollgate-it": roles.IT_ADMIN, "tollgate-finance": roles.FINANCE,
                                          "tollgate-audit": roles.SECURITY_AUDITOR}
    settings.AUTHENTICATION_BACKENDS = SSO_BACKENDS
    return provider


def sso_login(client: Client, provider: OIDCProvider, next_url: str = "/keys/", **claims):
    """The browser's round trip: Tollgate -> provider -> Tollgate. Returns Tollgate's answer to the callback."""
    provider.sign_in_as(**claims)
    start = client.get(reverse("oidc_authentication_init"), {"next": next_url})
    assert start.status_code == 302 and start["Location"].startswith(f"{provider.issuer}/authorize?")
    at_provider = requests.get(start["Location"], allow_redirects=False, timeout=5)
    assert at_provider.status_code == 302, at_provider.text
    back = urlsplit(at_provider.headers["Location"])
    assert back.path == reverse("oidc_authentication_callback")
    return client.get(f"{back.path}?{back.query}")


def signed_in(client: Client):
    return Person.objects.filter(pk=client.session.get("_auth_user_id")).first()


def role_names(person) -> set[str]:
    return set(person.groups.values_list("name", flat=True))


def memberships(person) -> dict[str, str]:
    return dict(Membership.objects.filter(person=person).values_list("team__slug", "role"))


def sso_events(action: str):
    return AuditEvent.objects.filter(action=action, actor_label=sso.ACTOR_LABEL)


def test_a_person_signs_in_through_sso_with_roles_and_teams_from_their_groups(client, sso_on):
    TeamFactory(slug="platform")
    assert "Sign in with SSO" in client.get("/accounts/login/").content.decode()

    response = sso_login(client, sso_on, sub="u-1", email="ada@example.com", given_name="Ada", family_name="Lovelace",
                         groups=["tollgate-finance", "team-platform", "team-no-such-team", "everyone"])

    assert response.status_code == 302 and response["Location"] == "/keys/"
    person = signed_in(client)
    assert person is not None and person.email == "ada@example.com" and person.get_full_name() == "Ada Lovelace"
    assert not person.has_usable_password()  # SSO-managed
    assert role_names(person) == {roles.FINANCE} and person.is_staff
    assert memberships(person) == {"platform": Membership.Role.MEMBER}  # the unknown team is ignored
    assert client.get("/keys/").status_code == 200
    assert sso_events("person.create").filter(object_id=str(person.pk)).exists()
    assert sso_events("person.roles").get(object_id=str(person.pk)).after["roles"] == [roles.FINANCE]
    assert sso_events("membership.create").filter(after__group="team-platform").count() == 1
    assert sso_on.token_requests[-1]["client_secret"] == CLIENT_SECRET


def test_a_second_login_with_changed_groups_updates_roles_and_teams_audited(client, sso_on):
    platform, data, ops = TeamFactory(slug="platform"), TeamFactory(slug="data"), TeamFactory(slug="ops")
    # A person who had a local account: matched by email (case aside), linked, and from now on SSO-managed.
    dana = PersonFactory(username="dana", email="Dana@Example.com")
    MembershipFactory(person=dana, team=ops, role=Membership.Role.APPROVER)  # given in Tollgate: kept
    claims = {"sub": "u-2", "email": "dana@example.com"}
    assert sso_login(client, sso_on, **claims, groups=["tollgate-finance", "team-platform"]).status_code == 302
    dana.refresh_from_db()
    assert signed_in(client) == dana and not dana.has_usable_password()
    assert sso_events("person.sso_link").filter(object_id=str(dana.pk)).exists()
    assert role_names(dana) == {roles.FINANCE}
    assert memberships(dana) == {"platform": "member", "ops": "approver"}

    client.post("/accounts/logout/")
    assert sso_login(client, sso_on, **claims, groups=["tollgate-audit", "team-data"]).status_code == 302

    assert signed_in(client) == dana
    assert role_names(dana) == {roles.SECURITY_AUDITOR}
    assert memberships(dana) == {"data": "member", "ops": "approver"}
    change = sso_events("person.roles").filter(object_id=str(dana.pk)).order_by("-id").first()
    assert (change.before["roles"], change.after["roles"]) == ([roles.FINANCE], [roles.SECURITY_AUDITOR])
    removed = sso_events("membership.delete").get(after__group="team-platform")
    assert removed.before["team_id"] == platform.pk and removed.before["person_id"] == dana.pk
    assert sso_events("membership.create").filter(after__group="team-data", object_repr__contains=data.name).exists()


@pytest.mark.parametrize("case", ["inactive", "not_allowed"])
def test_a_person_the_provider_reports_disabled_is_deactivated_and_their_keys_suspended(client, sso_on, settings, case):
    person = PersonFactory(email="eve@example.com")
    own_key = VirtualKeyFactory(person=person)
    team_service_key = VirtualKeyFactory(person=None, team=own_key.team)
    claims = {"sub": "u-3", "email": "eve@example.com", "groups": ["tollgate-users"]}
    if case == "inactive":
        claims["active"] = False
    else:
        settings.TOLLGATE_OIDC_ALLOWED_GROUPS = ["tollgate-staff"]

    response = sso_login(client, sso_on, **claims)

    assert response.status_code == 302 and response["Location"] == settings.LOGIN_REDIRECT_URL_FAILURE
    assert signed_in(client) is None
    person.refresh_from_db()
    own_key.refresh_from_db()
    team_service_key.refresh_from_db()
    assert not person.is_active
    assert own_key.status == VirtualKey.Status.SUSPENDED and team_service_key.status == VirtualKey.Status.ACTIVE
    assert sso_events("person.deactivate").filter(object_id=str(person.pk)).exists()
    suspension = AuditEvent.objects.get(action="key.suspend", object_id=str(own_key.pk))
    assert suspension.after["reason"].startswith("single sign-on: ")
    assert "did not sign you in" in client.get(response["Location"]).content.decode()


def test_an_unknown_person_the_provider_reports_disabled_is_not_created(client, sso_on):
    response = sso_login(client, sso_on, sub="u-4", email="mallory@example.com", active=False)
    assert response["Location"].endswith("sso=failed")
    assert not Person.objects.filter(email="mallory@example.com").exists()


def test_an_id_token_issued_to_another_client_is_refused(client, sso_on):
    response = sso_login(client, sso_on, sub="u-5", email="oscar@example.com", aud="another-app")
    assert response["Location"].endswith("sso=failed") and signed_in(client) is None
    assert not Person.objects.filter(email="oscar@example.com").exists()


def _change_form_data(response) -> dict:
    """The admin change form's fields as the browser would post them unchanged."""
    data = {}
    for field in response.context["adminform"].form:
        value = field.value()
        widgets = getattr(field.field.widget, "widgets", None)
        if widgets:  # split date and time
            for i, part in enumerate(field.field.widget.decompress(value)):
                data[f"{field.html_name}_{i}"] = "" if part is None else part
        elif isinstance(value, bool):
            if value:
                data[field.html_name] = "on"
        elif isinstance(value, list | tuple):
            data[field.html_name] = [str(v) for v in value]
        elif value is not None:
            data[field.html_name] = value
    return data


def test_deactivating_in_the_admin_suspends_keys_at_once_audited(client):
    holder = PersonFactory()
    keys = [VirtualKeyFactory(person=holder), VirtualKeyFactory(person=holder)]
    holder_browser = Client()
    holder_browser.force_login(holder)
    it = PersonFactory(roles=[roles.IT_ADMIN])
    client.force_login(it)
    url = reverse("admin:governance_person_change", args=[holder.pk])
    data = _change_form_data(client.get(url))
    data.pop("is_active")

    response = client.post(url, data)

    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    holder.refresh_from_db()
    assert not holder.is_active
    assert {k.status for k in VirtualKey.objects.filter(pk__in=[k.pk for k in keys])} == {VirtualKey.Status.SUSPENDED}
    suspensions = AuditEvent.objects.filter(action="key.suspend", actor=it, object_id__in=[str(k.pk) for k in keys])
    assert suspensions.count() == 2 and all("deactivated in the admin" in e.after["reason"] for e in suspensions)
    assert AuditEvent.objects.filter(action="person.update", actor=it, after__is_active=False).exists()
    assert holder_browser.get("/keys/").status_code == 302  # their session ended: sent to log in


def test_the_admin_action_deactivates_and_suspends_keys(client):
    holder, superuser = PersonFactory(), PersonFactory(is_superuser=True, is_staff=True)
    key = VirtualKeyFactory(person=holder)
    it = PersonFactory(roles=[roles.IT_ADMIN])
    client.force_login(it)
    response = client.post(reverse("admin:governance_person_changelist"), {
        "action": "deactivate_and_suspend_keys", "_selected_action": [holder.pk, superuser.pk, it.pk]}, follow=True)

    assert "1 deactivated, 1 keys suspended." in response.content.decode()
    holder.refresh_from_db()
    key.refresh_from_db()
    superuser.refresh_from_db()
    it.refresh_from_db()
    assert not holder.is_active and key.status == VirtualKey.Status.SUSPENDED
    assert superuser.is_active and it.is_active  # IT neither deactivates a superuser nor itself
    assert AuditEvent.objects.filter(action="person.deactivate", actor=it, object_id=str(holder.pk)).exists()


def test_an_sso_session_ends_when_the_person_is_deactivated_in_the_admin(client, sso_on):
    assert sso_login(client, sso_on, sub="u-6", email="sam@example.com").status_code == 302
    sam = signed_in(client)
    key = VirtualKeyFactory(person=sam)
    it = Client()
    it.force_login(PersonFactory(roles=[roles.IT_ADMIN]), backend="governance.sso.TollgateOIDCBackend")
    it.post(reverse("admin:governance_person_changelist"), {"action": "deactivate_and_suspend_keys",
                                                            "_selected_action": [sam.pk]})
    key.refresh_from_db()
    assert key.status == VirtualKey.Status.SUSPENDED
    response = client.get("/keys/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_with_sso_on_only_a_superuser_may_use_the_password_form(sso_on):
    superuser = PersonFactory(is_superuser=True, is_staff=True)
    person = PersonFactory()
    page = Client().get("/accounts/login/").content.decode()
    assert "Sign in with SSO" in page and "break-glass" in page

    break_glass = Client()
    assert break_glass.post("/accounts/login/", {"username": superuser.username, "password": PASSWORD}).status_code == 302
    assert signed_in(break_glass) == superuser
    refused = Client()
    response = refused.post("/accounts/login/", {"username": person.username, "password": PASSWORD})
    assert response.status_code == 200 and signed_in(refused) is None
    admin_login = refused.post("/admin/login/", {"username": person.username, "password": PASSWORD})
    assert admin_login.status_code == 200 and signed_in(refused) is None


def test_with_sso_off_nothing_changes(client, settings):
    assert not settings.OIDC_RP_CLIENT_ID
    assert settings.AUTHENTICATION_BACKENDS == ["axes.backends.AxesStandaloneBackend",
                                                "django.contrib.auth.backends.ModelBackend"]
    assert "governance.sso.TollgateSessionRefresh" not in settings.MIDDLEWARE
    assert "Sign in with SSO" not in client.get("/accounts/login/").content.decode()
    assert client.get(reverse("oidc_authentication_init")).status_code == 404
    assert client.get(reverse("oidc_authentication_callback"), {"code": "x", "state": "y"}).status_code == 404
    person = PersonFactory()
    assert client.post("/accounts/login/", {"username": person.username, "password": PASSWORD}).status_code == 302
    assert signed_in(client) == person


def _settings_in_a_fresh_process(**environ) -> subprocess.CompletedProcess:
    code = ("import json, governance.settings as s; print(json.dumps({'backends': s.AUTHENTICATION_BACKENDS, "
            "'middleware': s.MIDDLEWARE[-1], 'roles': s.TOLLGATE_OIDC_ROLE_GROUPS}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OIDC_", "TOLLGATE_OIDC_"))}
    env.update(DEBUG="1", **environ)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


def test_settings_turn_sso_on_from_the_environment_and_name_a_bad_variable():
    on = _settings_in_a_fresh_process(
        OIDC_RP_CLIENT_ID="tollgate", OIDC_RP_CLIENT_SECRET="s", TOLLGATE_OIDC_ISSUER="https://idp.example.com/",
        TOLLGATE_OIDC_ROLE_GROUPS="IT admin=tollgate-it,Finance=tollgate-finance,Security auditor=tollgate-audit")
    assert on.returncode == 0, on.stderr
    loaded = json.loads(on.stdout.strip().splitlines()[-1])
    assert loaded["backends"] == SSO_BACKENDS
    assert loaded["middleware"] == "governance.sso.TollgateSessionRefresh"
    assert loaded["roles"] == {"tollgate-it": "IT admin", "tollgate-finance": "Finance", "tollgate-audit": "Security auditor"}

    bad_role = _settings_in_a_fresh_process(TOLLGATE_OIDC_ROLE_GROUPS="Owner=tollgate-owners")
    assert bad_role.returncode != 0 and "ImproperlyConfigured: TOLLGATE_OIDC_ROLE_GROUPS" in bad_role.stderr
    no_endpoints = _settings_in_a_fresh_process(OIDC_RP_CLIENT_ID="tollgate", OIDC_RP_CLIENT_SECRET="s")
    assert "ImproperlyConfigured: OIDC_OP_AUTHORIZATION_ENDPOINT" in no_endpoints.stderr
    no_secret = _settings_in_a_fresh_process(OIDC_RP_CLIENT_ID="tollgate", TOLLGATE_OIDC_ISSUER="https://idp.example.com")
    assert "ImproperlyConfigured: OIDC_RP_CLIENT_SECRET" in no_secret.stderr
