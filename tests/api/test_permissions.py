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
