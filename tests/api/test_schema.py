"""The OpenAPI schema at /api/schema/: served, real responses conform to it, and a schemathesis run against it
(derandomized, a few examples per operation, authenticated with an API token) meets no server error."""
import json
import os
from collections import Counter
from decimal import Decimal

import pytest
import schemathesis
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from werkzeug.test import Client

from governance.wsgi import application
from ledger.services import ledger_rollup
from tests.api.conftest import token_client
from tests.api.test_keys_and_requests import mock_alias
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db
EXAMPLES = int(os.environ.get("TOLLGATE_FUZZ_EXAMPLES", "5"))
FUZZ = settings(max_examples=EXAMPLES, database=None, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _keep_the_test_connection():
    """Calls go to the WSGI application in this thread, inside the test's transaction: the connection must not
    be closed at the end of each request (Django's test client disconnects the same handlers)."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def _schema():
    return schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)


def test_the_schema_and_the_docs_page_are_served(client):
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    body = json.loads(schema.content)
    assert body["openapi"].startswith("3.") and "/api/v1/keys/{id}/revoke/" in body["paths"]
    assert not any(path.startswith("/v1/") for path in body["paths"])  # the relay has its own schema
    assert body["components"]["securitySchemes"]["apiToken"]["scheme"] == "bearer"
    assert client.get("/api/docs/").status_code == 200


def test_real_responses_conform_to_the_schema(org):
    key = VirtualKeyFactory(person=org.employee, team=org.team_a, monthly_budget=Decimal("5"))
    LedgerEntryFactory(key=key, tags={"project": "notes"})
    ledger_rollup()
    mock_alias("fast")
    it = token_client(org.it).token.secret
    schema = _schema()
    http = Client(application)
    today = timezone.localdate().isoformat()
    checked = [
        ("/api/v1/keys/", "GET", "/api/v1/keys/", None),
        ("/api/v1/keys/{id}/", "GET", f"/api/v1/keys/{key.pk}/", None),
        ("/api/v1/usage/", "GET", "/api/v1/usage/", None),
        ("/api/v1/teams/", "GET", "/api/v1/teams/", None),
        ("/api/v1/grants/", "GET", "/api/v1/grants/", None),
        ("/api/v1/models/", "GET", "/api/v1/models/", None),
        ("/api/v1/audit-events/", "GET", "/api/v1/audit-events/", None),
        ("/api/v1/chargeback/", "GET", f"/api/v1/chargeback/?start={today}&end={today}&group_by=team,model", None),
        ("/api/v1/keys/", "POST", "/api/v1/keys/", {"name": "n", "team": "team-a", "models": ["fast"]}),
        ("/api/v1/keys/{id}/suspend/", "POST", f"/api/v1/keys/{key.pk}/suspend/", {"reason": "checking"}),
    ]
    for template, method, url, body in checked:
        response = http.open(url, method=method, headers={"Authorization": f"Bearer {it}"},
                             json=body if body is not None else None)
        assert response.status_code < 300, (url, response.get_data(as_text=True)[:300])
        schema[template][method].validate_response(response)  # raises on any mismatch


def test_schemathesis_finds_no_server_error(org, capsys):
    VirtualKeyFactory(person=org.employee, team=org.team_a)
    LedgerEntryFactory(key=VirtualKeyFactory(person=org.stranger, team=org.team_b))
    mock_alias("fast")
    secret = token_client(org.it).token.secret
    schema = _schema()
    statuses, server_errors, operations = Counter(), [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @FUZZ
            def run(case):
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {secret}"}
                response = case.call()
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

            run()
    calls = sum(statuses.values())
    with capsys.disabled():
        print(f"\nschemathesis: {operations} operations, {calls} calls, {len(server_errors)} server errors; "
              f"statuses {dict(sorted(statuses.items()))}")
    assert operations >= 40 and calls >= operations
    assert not server_errors, "\n".join(server_errors[:10])


def test_the_docs_page_serves_swagger_ui_itself_not_from_a_cdn(client):
    html = client.get("/api/docs/").content.decode()
    assert "drf_spectacular_sidecar" in html and "cdn." not in html
