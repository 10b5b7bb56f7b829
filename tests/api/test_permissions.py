"""The management API's role-by-resource table (the URL matrix in tests/governance/test_authorization_matrix.py
leaves /api/ to this file): every list, for anonymous and each role, with a token of full scope. What a role
may read inside a list (own keys, own teams) is tested per resource in the other files of tests/api."""
import pytest
from rest_framework.test import APIClient

from governance import roles
from tests.api.conftest import token_client
from tests.governance.factories import PersonFactory

pytestmark = pytest.mark.django_db
ROLES = ["anon", "employee", "it", "finance", "auditor"]

# resource -> expected status by role, in ROLES order
LISTS = {
    "departments": (401, 200, 200, 200, 200),
    "cost-centers": (401, 200, 200, 200, 200),
    "teams": (401, 200, 200, 200, 200),
    "memberships": (401, 200, 200, 200, 200),
    "models": (401, 200, 200, 200, 200),
    "grants": (401, 200, 200, 200, 200),
    "increases": (401, 200, 200, 200, 200),
    "keys": (401, 200, 200, 200, 200),
    "access-requests": (401, 200, 200, 200, 200),
    "usage": (401, 200, 200, 200, 200),
    "rollups": (401, 200, 200, 200, 200),
    "providers": (401, 403, 200, 200, 200),
    "cost-imports": (401, 403, 200, 200, 200),
    "reconciliations": (401, 403, 200, 200, 200),
    "alerts": (401, 403, 200, 200, 200),
    "audit-events": (401, 403, 200, 200, 200),  # as in the admin: governance.view_auditevent
}
CELLS = [(resource, role, status) for resource, statuses in LISTS.items() for role, status in zip(ROLES, statuses)]


def _client(role: str) -> APIClient:
    if role == "anon":
        return APIClient()
    person = PersonFactory(roles={"it": [roles.IT_ADMIN], "finance": [roles.FINANCE],
                                  "auditor": [roles.SECURITY_AUDITOR]}.get(role, []))
    return token_client(person)


@pytest.mark.parametrize("resource, role, status", CELLS, ids=[f"{r}-{role}" for r, role, _ in CELLS])
def test_list(resource, role, status):
    response = _client(role).get(f"/api/v1/{resource}/")
    assert response.status_code == status, (resource, role, response.content[:300])
    assert response["Content-Type"].startswith("application/json")


def test_every_resource_has_its_row():
    from governance.api.urls import router

    assert {prefix for prefix, _, _ in router.registry} - {"tokens"} == set(LISTS)


def test_chargeback_is_for_finance_it_and_auditors():
    query = {"start": "2026-10-01", "end": "2026-10-31", "group_by": "team"}
    assert [_client(role).get("/api/v1/chargeback/", query).status_code for role in ROLES] == [401, 403, 200, 200, 200]


def test_it_adds_and_changes_a_provider_whose_keys_are_write_only_and_audited():
    from gateway.models import Provider
    from governance.models import AuditEvent

    it = token_client(PersonFactory(roles=[roles.IT_ADMIN]))
    created = it.post("/api/v1/providers/", {"name": "Azure EU", "kind": "openai", "base_url": "https://eu.example.com/v1",
                                             "api_key": "sk-secret-provider-key-123"}, format="json")
    assert created.status_code == 201, created.content
    assert "sk-secret" not in created.content.decode() and created.json()["has_api_key"] is True
    provider = Provider.objects.get(name="Azure EU")
    assert provider.api_key == "sk-secret-provider-key-123" and "sk-secret" not in provider.api_key_encrypted
    changed = it.patch(f"/api/v1/providers/{provider.pk}/", {"read_timeout": 30}, format="json")
    assert changed.status_code == 200 and changed.json()["read_timeout"] == 30
    actions = list(AuditEvent.objects.filter(object_id=str(provider.pk)).values_list("action", flat=True))
    assert {"provider.create", "provider.api_key_set", "provider.update"} <= set(actions)
    assert not any("sk-secret" in str(e.after) + str(e.before) for e in AuditEvent.objects.all())


@pytest.mark.parametrize("role", ["employee", "finance", "auditor"])
def test_only_it_writes_providers(role):
    response = _client(role).post("/api/v1/providers/", {"name": "X", "kind": "openai"}, format="json")
    assert response.status_code == 403


def test_a_bad_provider_is_a_400_naming_the_field():
    it = token_client(PersonFactory(roles=[roles.IT_ADMIN]))
    response = it.post("/api/v1/providers/", {"name": "Bad", "kind": "nope"}, format="json")
    assert response.status_code == 400 and "kind" in response.content.decode()


def test_it_builds_the_organisation_through_the_api_audited():
    from governance.models import AuditEvent, Membership, Team

    it = token_client(PersonFactory(roles=[roles.IT_ADMIN]))
    owner, member = PersonFactory(username="olga"), PersonFactory(username="max")
    assert it.post("/api/v1/departments/", {"name": "Research", "slug": "research"}, format="json").status_code == 201
    department = it.get("/api/v1/departments/", {"slug": "research"}).json()["results"][0]["id"]
    assert it.post("/api/v1/cost-centers/", {"code": "CC-900", "name": "Research", "department": department},
                   format="json").status_code == 201
    team = it.post("/api/v1/teams/", {"name": "Vision", "slug": "vision", "department": "research",
                                      "cost_center": "CC-900", "owner": "olga", "rpm_limit": 60}, format="json")
    assert team.status_code == 201 and team.json()["owner"] == "olga"
    joined = it.post("/api/v1/memberships/", {"person": "max", "team": "vision", "role": "member"}, format="json")
    assert joined.status_code == 201
    again = it.post("/api/v1/memberships/", {"person": "max", "team": "vision", "role": "member"}, format="json")
    assert again.status_code == 400 and Membership.objects.filter(person=member).count() == 1
    assert it.patch(f"/api/v1/teams/{team.json()['id']}/", {"rpm_limit": 120}, format="json").json()["rpm_limit"] == 120
    assert Team.objects.get(slug="vision").rpm_limit == 120
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"department.create", "costcenter.create", "team.create", "membership.create", "team.update"} <= actions
    assert owner.owned_teams.filter(slug="vision").exists()


@pytest.mark.parametrize("role", ["employee", "finance", "auditor"])
def test_only_it_changes_the_organisation(role):
    response = _client(role).post("/api/v1/departments/", {"name": "X", "slug": "x"}, format="json")
    assert response.status_code == 403


def test_models_carry_prices_and_the_provider_name_mappings():
    from gateway.models import BilledModelName
    from tests.gateway.factories import DeploymentFactory

    deployment = DeploymentFactory()
    BilledModelName.objects.create(provider_model=deployment.provider_model, name=deployment.provider_model.name,
                                   snapshot_suffix=BilledModelName.OPENAI_SNAPSHOT)
    models = _client("employee").get("/api/v1/models/").json()["results"]
    mine = next(m for m in models if m["name"] == deployment.alias.name)
    assert mine["deployments"][0]["billed_names"] == [{"name": deployment.provider_model.name,
                                                      "snapshot_suffix": BilledModelName.OPENAI_SNAPSHOT}]
