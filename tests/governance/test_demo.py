from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from gateway.models import ModelAlias, Provider
from governance.demo import DEMO_PASSWORD
from governance.models import Membership, Person, Team

pytestmark = pytest.mark.django_db(transaction=True)


def _counts():
    return [m.objects.count() for m in (Person, Team, Membership, Provider, ModelAlias)]


def test_load_demo_is_safe_to_run_twice_and_prints_the_logins():
    out = StringIO()
    call_command("load_demo", stdout=out)
    first = _counts()
    call_command("load_demo", stdout=StringIO())
    assert _counts() == first
    assert "alice" in out.getvalue() and DEMO_PASSWORD in out.getvalue()
    assert Provider.objects.get().kind == Provider.Kind.MOCK
    assert ModelAlias.objects.get(name="smart").deployments.get().provider_model.price_at() is not None


def test_provider_url_points_the_demo_at_a_real_server():
    call_command("load_demo", stdout=StringIO())
    call_command("load_demo", "--provider-url", "http://127.0.0.1:9999/v1", stdout=StringIO())
    provider = Provider.objects.get()
    assert (provider.kind, provider.base_url) == (Provider.Kind.OPENAI, "http://127.0.0.1:9999/v1")


def test_bad_provider_url_is_refused():
    with pytest.raises(CommandError, match="--provider-url"):
        call_command("load_demo", "--provider-url", "not a url")
    assert Provider.objects.count() == 0


def test_demo_people_log_in_through_the_form(client):
    call_command("load_demo", stdout=StringIO())
    page = client.get("/accounts/login/")
    assert b"csrfmiddlewaretoken" in page.content
    response = client.post("/accounts/login/", {"username": "it", "password": DEMO_PASSWORD})
    assert response.status_code == 302
    assert client.get("/admin/").status_code == 200


def test_wrong_password_shows_an_error_on_the_form(client):
    call_command("load_demo", stdout=StringIO())
    response = client.post("/accounts/login/", {"username": "it", "password": "wrong"})
    assert response.status_code == 200 and b"errors" in response.content


def _demo_key(out: str) -> str:
    return out.split("Demo relay key for bob (shown once, valid 30 days): ")[1].split()[0]


def test_each_load_issues_a_fresh_demo_key_and_revokes_the_last():
    from keys.models import VirtualKey

    first, second = StringIO(), StringIO()
    call_command("load_demo", stdout=first)
    call_command("load_demo", stdout=second)
    assert _demo_key(first.getvalue()) != _demo_key(second.getvalue())
    demo_keys = VirtualKey.objects.filter(name__startswith="Demo key")
    assert sorted(demo_keys.values_list("status", flat=True)) == ["active", "revoked"]


@pytest.mark.redis
def test_demo_key_works_against_the_built_in_mock_provider(live_server, request):
    import openai

    from governance import runtime
    from ledger.models import LedgerEntry

    out = StringIO()
    call_command("load_demo", stdout=out)
    runtime.drop()
    sdk = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=_demo_key(out.getvalue()), max_retries=0)
    # An open client would hold the live server's thread (and its database connection) past the test.
    request.addfinalizer(sdk.close)
    reply = sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "ping the mock"}])
    assert reply.choices[0].message.content == "mock reply: ping the mock"
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "stream please"}], stream=True) if c.choices)
    assert streamed == "mock reply: stream please"
    assert len(sdk.embeddings.create(model="embed", input="vector me").data[0].embedding) == 8
    calls = LedgerEntry.objects.exclude(request_id__startswith="demo-")  # not the demo's made-up month of traffic
    assert calls.filter(outcome="ok").count() == 3
    assert all(e.tags == {"project": "demo", "environment": "dev"} for e in calls)
