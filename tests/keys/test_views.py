"""The self-service pages, as an employee and an approver use them."""
import pytest

from gateway.models import ModelAlias
from governance.models import Membership
from keys.models import AccessRequest, VirtualKey
from keys.selectors import key_by_secret
from tests.gateway.factories import DeploymentFactory, ModelAliasFactory, ModelPriceFactory
from tests.governance.factories import MembershipFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def fast():
    alias = ModelAliasFactory(name="fast")
    ModelPriceFactory(provider_model=DeploymentFactory(alias=alias).provider_model)
    return alias


@pytest.fixture
def smart():
    return ModelAliasFactory(name="smart", tier=ModelAlias.Tier.PREMIUM)


@pytest.fixture
def member(client):
    membership = MembershipFactory()
    client.force_login(membership.person)
    return membership


def form_data(member, alias, **overrides):
    data = {"team": member.team.pk, "aliases": [alias.pk], "use_case": "draft release notes", "key_class": "experimentation",
            "environment": "development", "project": "notes", "duration_days": "30", "monthly_budget": ""}
    data.update(overrides)
    return data


def test_request_form_lists_only_my_teams_and_shows_prices(client, member, fast):
    elsewhere = MembershipFactory()  # someone else's team
    page = client.get("/keys/request/").content.decode()
    assert member.team.name in page and elsewhere.team.name not in page
    assert "fast — $1 in / $2 out per million tokens" in page


def test_field_errors_are_shown_and_nothing_is_created(client, member, fast):
    response = client.post("/keys/request/", form_data(member, fast, aliases=[], use_case=""))
    assert response.status_code == 400
    body = response.content.decode()
    assert body.count('class="errors"') >= 2 and "This field is required." in body
    assert not AccessRequest.objects.exists() and not VirtualKey.objects.exists()


def test_auto_approved_request_shows_the_key_once_with_snippets(client, member, fast):
    response = client.post("/keys/request/", form_data(member, fast))
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    body = response.content.decode()
    assert key_by_secret(secret).person == member.person
    assert body.count(secret) == 4  # the key, the curl snippet, the Python and the Node snippets
    assert "curl http://testserver/v1/chat/completions" in body and "OpenAI(base_url=" in body
    assert secret not in client.get("/keys/").content.decode()


def test_duplicate_request_is_a_field_error_naming_the_existing_key(client, member, fast):
    client.post("/keys/request/", form_data(member, fast))
    existing = VirtualKey.objects.get()
    response = client.post("/keys/request/", form_data(member, fast))
    assert response.status_code == 400 and existing.prefix in response.content.decode()


def test_premium_request_waits_for_an_approver(client, member, smart):
    response = client.post("/keys/request/", form_data(member, smart), follow=True)
    assert "needs an approver" in response.content.decode() and "premium models: smart" in response.content.decode()
    assert AccessRequest.objects.get().status == "pending" and not VirtualKey.objects.exists()


def test_an_employee_cannot_open_another_persons_key(client, member):
    other = VirtualKeyFactory()
    assert client.get(f"/keys/{other.pk}/").status_code == 404
    assert client.post(f"/keys/{other.pk}/revoke/", {"reason": "x"}).status_code == 404
    assert client.post(f"/keys/{other.pk}/rotate/").status_code == 404
    other.refresh_from_db()
    assert other.status == "active"
    assert other.prefix not in client.get("/keys/").content.decode()


def test_team_approver_sees_team_keys_but_cannot_rotate_them(client, member):
    colleague_key = VirtualKeyFactory(team=member.team)
    Membership.objects.filter(pk=member.pk).update(role=Membership.Role.APPROVER)
    assert client.get(f"/keys/{colleague_key.pk}/").status_code == 200
    assert client.post(f"/keys/{colleague_key.pk}/rotate/").status_code == 403


def test_my_keys_rotate_and_revoke(client, member):
    key = VirtualKeyFactory(person=member.person, team=member.team)
    assert key.prefix in client.get("/keys/").content.decode()
    response = client.post(f"/keys/{key.pk}/rotate/")
    assert response.status_code == 200 and key_by_secret(response.context["secret"]) == key
    client.post(f"/keys/{key.pk}/revoke/", {"reason": "project ended"})
    key.refresh_from_db()
    assert key.status == "revoked"
    history = client.get(f"/keys/{key.pk}/").content.decode()
    assert "key.rotate" in history and "project ended" in history


def test_approver_queue_approves_and_requester_collects(client, member, smart):
    client.post("/keys/request/", form_data(member, smart))
    request = AccessRequest.objects.get()
    approver = MembershipFactory(team=member.team, role=Membership.Role.APPROVER).person
    client.force_login(approver)
    assert member.person.username in client.get("/keys/approvals/").content.decode() or str(member.person) in client.get("/keys/approvals/").content.decode()
    client.post(f"/keys/approvals/{request.pk}/", {"decision": "approve", "reason": "ok for the launch"})
    client.force_login(member.person)
    response = client.post(f"/keys/requests/{request.pk}/collect/")
    assert key_by_secret(response.context["secret"]).person == member.person


def test_deny_needs_a_reason(client, member, smart):
    client.post("/keys/request/", form_data(member, smart))
    request = AccessRequest.objects.get()
    client.force_login(MembershipFactory(team=member.team, role=Membership.Role.OWNER).person)
    response = client.post(f"/keys/approvals/{request.pk}/", {"decision": "deny", "reason": ""}, follow=True)
    assert "Give a reason" in response.content.decode()
    client.post(f"/keys/approvals/{request.pk}/", {"decision": "deny", "reason": "not in scope"})
    request.refresh_from_db()
    assert request.status == "denied" and not VirtualKey.objects.exists()


def test_members_do_not_see_the_queue_of_their_team(client, member, smart):
    other = MembershipFactory(team=member.team)
    client.force_login(other.person)
    client.post("/keys/request/", form_data(other, smart))
    client.force_login(member.person)
    assert "Nothing is waiting for you." in client.get("/keys/approvals/").content.decode()
    request = AccessRequest.objects.get()
    assert client.post(f"/keys/approvals/{request.pk}/", {"decision": "approve"}).status_code == 404


def test_pages_need_a_login(client):
    for url in ["/keys/", "/keys/request/", "/keys/approvals/"]:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
