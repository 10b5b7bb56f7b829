"""Keys and access requests through the API: the same visibility, services, rules and audit events as the pages."""
import pytest
import requests
from rest_framework.test import APIClient

from gateway.models import ModelAlias, Provider
from governance.models import AuditEvent
from keys.models import AccessRequest, VirtualKey
from tests.api.conftest import token_client
from tests.gateway.factories import DeploymentFactory, ModelAliasFactory, ModelPriceFactory, ProviderFactory
from tests.keys.factories import VirtualKeyFactory


def mock_alias(name="fast", tier=ModelAlias.Tier.STANDARD) -> ModelAlias:
    mock = Provider.objects.filter(kind=Provider.Kind.MOCK).first() or ProviderFactory(
        name="Mock", kind=Provider.Kind.MOCK, base_url="", api_key="")
    alias = ModelAliasFactory(name=name, tier=tier)
    deployment = DeploymentFactory(alias=alias, provider_model__provider=mock, provider_model__name=f"mock-{name}")
    ModelPriceFactory(provider_model=deployment.provider_model)
    return alias


@pytest.mark.django_db
def test_an_employee_sees_only_their_own_keys_and_not_other_teams(org):
    own = VirtualKeyFactory(person=org.employee, team=org.team_a)
    other = VirtualKeyFactory(person=org.stranger, team=org.team_b)
    client = token_client(org.employee)
    listed = client.get("/api/v1/keys/").json()["results"]
    assert [k["id"] for k in listed] == [own.pk]
    assert "key_hash" not in listed[0] and "secret" not in listed[0]
    assert client.get(f"/api/v1/keys/{other.pk}/").status_code == 404
    assert client.get("/api/v1/keys/", {"team": "team-b"}).json()["results"] == []
    assert client.post(f"/api/v1/keys/{other.pk}/revoke/", {"reason": "x"}, format="json").status_code == 404


@pytest.mark.django_db
def test_it_revokes_any_key_and_the_audit_event_is_written(org):
    key = VirtualKeyFactory(person=org.stranger, team=org.team_b)
    response = token_client(org.it).post(f"/api/v1/keys/{key.pk}/revoke/", {"reason": "left the company"}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "revoked"
    event = AuditEvent.objects.get(action="key.revoke", object_id=str(key.pk))
    assert event.actor == org.it and event.after["reason"] == "left the company"


@pytest.mark.django_db
def test_finance_sees_every_key_but_cannot_revoke_one(org):
    key = VirtualKeyFactory(person=org.stranger, team=org.team_b)
    client = token_client(org.finance)
    assert client.get(f"/api/v1/keys/{key.pk}/").status_code == 200
    refused = client.post(f"/api/v1/keys/{key.pk}/revoke/", {"reason": "x"}, format="json")
    assert refused.status_code == 403 and "detail" in refused.json()
    key.refresh_from_db()
    assert key.status == "active"


@pytest.mark.django_db
def test_a_state_refusal_is_a_400_json_error(org):
    key = VirtualKeyFactory(person=org.employee, team=org.team_a, status=VirtualKey.Status.REVOKED)
    response = token_client(org.employee).post(f"/api/v1/keys/{key.pk}/suspend/", {"reason": "x"}, format="json")
    assert response.status_code == 400 and "revoked" in response.json()["detail"][0]


@pytest.mark.django_db
def test_only_it_issues_keys_directly(org):
    mock_alias()
    response = token_client(org.employee).post("/api/v1/keys/", {"name": "x", "team": "team-a"}, format="json")
    assert response.status_code == 403 and not VirtualKey.objects.exists()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_key_created_through_the_api_shows_its_secret_once_and_works_on_the_relay(relay, org):
    mock_alias("fast")
    client = token_client(org.it, {"keys": "write"})
    created = client.post("/api/v1/keys/", {"name": "ci bot", "team": "team-a", "models": ["fast"], "days": 30,
                                            "monthly_budget": "20.00"}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    secret = body["secret"]
    assert secret.startswith("tg_") and body["allowed_models"] == ["fast"] and created["Cache-Control"] == "no-store"
    assert "secret" not in client.get(f"/api/v1/keys/{body['id']}/").json()
    assert AuditEvent.objects.filter(action="key.issue", object_id=str(body["id"]), actor=org.it).exists()
    answer = requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                           json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert answer.status_code == 200, answer.text
    info = requests.get(f"{relay.v1}/key", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert info.status_code == 200 and info.json()["data"]["limit"] == "20.00000000"


@pytest.mark.django_db
def test_an_approver_approves_a_request_and_the_requester_collects_the_key_once(org):
    smart = mock_alias("smart", tier=ModelAlias.Tier.PREMIUM)  # premium: policy sends it to an approver
    employee = token_client(org.employee, {"access-requests": "write"})
    submitted = employee.post("/api/v1/access-requests/", {"team": "team-a", "models": [smart.name],
                                                           "use_case": "summaries", "project": "notes"}, format="json")
    assert submitted.status_code == 201, submitted.content
    assert submitted.json()["key"] is None and submitted.json()["request"]["status"] == "pending"
    pk = submitted.json()["request"]["id"]
    assert employee.post(f"/api/v1/access-requests/{pk}/approve/", {}, format="json").status_code == 403
    approved = token_client(org.approver).post(f"/api/v1/access-requests/{pk}/approve/", {"reason": "ok"}, format="json")
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    assert AuditEvent.objects.filter(action="access_request.approve", object_id=str(pk), actor=org.approver).exists()
    collected = employee.post(f"/api/v1/access-requests/{pk}/collect/")
    assert collected.status_code == 201 and collected.json()["secret"].startswith("tg_")
    again = employee.post(f"/api/v1/access-requests/{pk}/collect/")
    assert again.status_code == 400 and "secret" not in again.json()


@pytest.mark.django_db
def test_nobody_decides_their_own_request_it_included(org):
    smart = mock_alias("smart", tier=ModelAlias.Tier.PREMIUM)
    approver = token_client(org.approver)
    pk = approver.post("/api/v1/access-requests/", {"team": "team-a", "models": [smart.name], "use_case": "x"},
                       format="json").json()["request"]["id"]
    refused = approver.post(f"/api/v1/access-requests/{pk}/approve/", {}, format="json")
    assert refused.status_code == 403 and "own request" in refused.json()["detail"]
    assert AccessRequest.objects.get(pk=pk).status == "pending"
    assert not AuditEvent.objects.filter(action="access_request.approve").exists()
    # someone outside the team neither sees nor decides it
    assert token_client(org.stranger).post(f"/api/v1/access-requests/{pk}/deny/", {"reason": "no"},
                                           format="json").status_code == 404


@pytest.mark.django_db
def test_a_refused_request_is_a_400_naming_the_field(org):
    alias = mock_alias()
    response = token_client(org.stranger).post("/api/v1/access-requests/", {"team": "team-a", "models": [alias.name],
                                                                           "use_case": "x"}, format="json")
    assert response.status_code == 400 and "team" in response.json()
    assert not AccessRequest.objects.exists()


@pytest.mark.django_db
def test_a_session_is_enough_for_the_browser(org):
    client = APIClient()
    client.force_login(org.employee)
    assert client.get("/api/v1/teams/").json()["results"][0]["slug"] == "team-a"
