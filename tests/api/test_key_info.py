"""GET /v1/key: a relay key's own status, models, limits, spend and what is left this period."""
from decimal import Decimal

import pytest

from gateway.models import ModelAlias
from tests.api.test_keys_and_requests import mock_alias
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = [pytest.mark.redis, pytest.mark.django_db]


@pytest.fixture(autouse=True)
def _fresh(fresh_state):
    yield


def test_the_key_reads_its_status_models_limits_and_budget_left(client, org):
    fast = mock_alias("fast")
    mock_alias("smart", tier=ModelAlias.Tier.PREMIUM)
    key = VirtualKeyFactory(person=org.employee, team=org.team_a, monthly_budget=Decimal("10.00"), rpm_limit=60)
    key.allowed_models.set([fast])
    LedgerEntryFactory(key=key, cost=Decimal("2.50"))
    response = client.get("/v1/key", HTTP_AUTHORIZATION=f"Bearer {key.secret}")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    data = response.json()["data"]
    assert data["status"] == "active" and data["prefix"] == key.prefix and data["models"] == ["fast"]
    assert data["rate_limits"]["rpm"] == 60
    assert data["limit"] == "10.00000000" and data["limit_remaining"] == "7.50000000" and data["resets_on"]
    assert data["budgets"][0]["spent"] == "2.50000000"
    assert key.secret not in response.content.decode()


def test_a_suspended_key_reads_its_status(client, org):
    key = VirtualKeyFactory(person=org.employee, team=org.team_a, status="suspended")
    assert client.get("/v1/key", HTTP_X_API_KEY=key.secret).json()["data"]["status"] == "suspended"


def test_an_invalid_or_missing_key_gets_the_relay_s_401(client):
    for headers in ({"HTTP_AUTHORIZATION": "Bearer tg_l_" + "A" * 49}, {}):
        response = client.get("/v1/key", **headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] in {"invalid_api_key", "missing_api_key"}


def test_other_methods_get_the_relay_s_405(client):
    assert client.post("/v1/key").json()["error"]["code"] == "method_not_allowed"
