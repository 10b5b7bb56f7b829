"""API tokens: issued once, stored as a hash, expiring, revocable, and narrowed by their scopes."""
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from governance.api.tokens import api_token_revoke
from governance.models import AuditEvent
from keys import keyformat
from keys.models import ApiToken
from tests.api.conftest import token_client
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db


def test_a_token_created_from_a_session_is_shown_once_and_stored_as_a_hash(org):
    client = APIClient()
    client.force_login(org.employee)
    created = client.post("/api/v1/tokens/", {"name": "my script", "scopes": {"usage": "read"}}, format="json")
    assert created.status_code == 201 and created["Cache-Control"] == "no-store"
    secret = created.json()["secret"]
    assert secret.startswith("tg_api_")
    token = ApiToken.objects.get(pk=created.json()["id"])
    assert token.token_hash == keyformat.hash_key(secret) and secret not in str(token.__dict__)
    assert token.prefix == secret[:14] and token.expires_at > timezone.now()
    assert AuditEvent.objects.filter(action="api_token.issue", object_id=str(token.pk)).exists()
    listed = client.get("/api/v1/tokens/").json()["results"]
    assert [t["prefix"] for t in listed] == [token.prefix] and "secret" not in listed[0]
    assert "secret" not in client.get(f"/api/v1/tokens/{token.pk}/").json()


def test_a_token_authenticates_as_its_person(org):
    client = token_client(org.employee)
    assert client.get("/api/v1/keys/").status_code == 200
    assert ApiToken.objects.get(pk=client.token.token.pk).last_used_at is not None


def test_expired_revoked_unknown_and_relay_keys_are_refused_with_401(org):
    expired = token_client(org.employee)
    ApiToken.objects.filter(pk=expired.token.token.pk).update(expires_at=timezone.now() - timezone.timedelta(seconds=1))
    revoked = token_client(org.employee)
    api_token_revoke(token=revoked.token.token, actor=org.employee)
    forged = APIClient()
    forged.credentials(HTTP_AUTHORIZATION="Bearer tg_api_" + "A" * 49)
    relay_key = APIClient()
    relay_key.credentials(HTTP_AUTHORIZATION=f"Bearer {VirtualKeyFactory(person=org.employee).secret}")
    for client in (expired, revoked, forged, relay_key, APIClient()):
        response = client.get("/api/v1/keys/")
        assert response.status_code == 401, response.content
        assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_token_of_a_deactivated_person_is_refused(org):
    client = token_client(org.employee)
    org.employee.is_active = False
    org.employee.save()
    assert client.get("/api/v1/keys/").status_code == 401


def test_scopes_limit_reads_and_writes_per_resource(org):
    key = VirtualKeyFactory(person=org.employee, team=org.team_a)
    reader = token_client(org.employee, {"keys": "read"})
    assert reader.get("/api/v1/keys/").status_code == 200
    assert reader.get("/api/v1/usage/").status_code == 403  # no usage scope
    refused = reader.post(f"/api/v1/keys/{key.pk}/revoke/", {"reason": "leaked"}, format="json")
    assert refused.status_code == 403
    key.refresh_from_db()
    assert key.status == "active" and not AuditEvent.objects.filter(action="key.revoke").exists()
    writer = token_client(org.employee, {"keys": "write"})
    assert writer.post(f"/api/v1/keys/{key.pk}/revoke/", {"reason": "leaked"}, format="json").status_code == 200


def test_a_token_cannot_issue_tokens_so_a_narrow_token_cannot_mint_a_broad_one(org):
    client = token_client(org.employee, {"*": "write"})
    response = client.post("/api/v1/tokens/", {"name": "wider", "scopes": {"*": "write"}}, format="json")
    assert response.status_code == 403
    assert ApiToken.objects.count() == 1


def test_unknown_scopes_are_refused_and_nothing_is_written(org):
    client = APIClient()
    client.force_login(org.employee)
    response = client.post("/api/v1/tokens/", {"name": "x", "scopes": {"everything": "write"}}, format="json")
    assert response.status_code == 400 and "scopes" in response.json()
    assert not ApiToken.objects.exists()


def test_issue_api_token_command_prints_the_token_once(org):
    out = StringIO()
    call_command("issue_api_token", "--person", org.finance.email, "--name", "BI export",
                 "--scopes", '{"chargeback": "read", "usage": "read"}', "--service", stdout=out)
    secret = out.getvalue().strip()
    token = ApiToken.objects.get()
    assert token.token_hash == keyformat.hash_key(secret) and token.kind == "service"
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get("/api/v1/usage/").status_code == 200


def test_admin_issues_a_token_shows_it_once_and_lists_without_secrets(org, client):
    client.force_login(org.it)
    response = client.post("/admin/keys/apitoken/add/", {"name": "jira", "kind": "service", "person": org.it.pk,
                                                         "scopes": '{"access-requests": "write"}', "days": "30"},
                           follow=True)
    assert response.status_code == 200
    token = ApiToken.objects.get()
    shown = [str(m) for m in response.context["messages"]]
    secrets = [word.strip(".,:;'\"") for m in shown for word in m.split() if word.startswith("tg_api_") and "…" not in word]
    assert len(secrets) == 1 and len(secrets[0]) > len(token.prefix)
    listing = client.get("/admin/keys/apitoken/").content.decode()
    assert token.prefix in listing and token.token_hash not in listing and secrets[0] not in listing
