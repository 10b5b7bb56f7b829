"""No secret in logs, access logs, answers or the ledger: keys sent in a URL, and provider keys echoed by an
upstream in a format no pattern knows."""
import io
import logging

import pytest
import requests

from gateway.models import Provider
from keys import keyformat
from ledger.models import LedgerEntry
from tests.gateway.factories import ProviderFactory

AZURE_KEY = "3f9a1c2b7d4e8f6a0b1c2d3e4f5a6b7c"  # Azure's format: 32 hex digits, like any id


@pytest.fixture
def json_log():
    """What the configured JSON log handler writes, captured."""
    from pythonjsonlogger.json import JsonFormatter

    handler = next(h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter))
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    yield buffer
    handler.setStream(previous)


@pytest.mark.django_db
def test_a_key_in_the_query_string_is_in_no_log_field(client, json_log):
    secret = keyformat.generate().secret
    client.get(f"/v1/models?api_key={secret}")
    client.get(f"/keys/nope/?key={secret}")
    written = json_log.getvalue()
    assert "django.request" in written or "Unauthorized" in written  # the lines were written
    assert secret not in written and secret[:20] not in written


@pytest.mark.redis
def test_an_upstream_echoing_its_key_reaches_no_client_ledger_or_log(relay, key, stub, json_log):
    azure = ProviderFactory(name="Azure", kind=Provider.Kind.AZURE_OPENAI, base_url=stub.base_url,
                            api_version="2024-06-01", api_key=AZURE_KEY)
    relay.alias("az", (azure, "fail-400-echo-key"))
    response = requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                             json={"model": "az", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert response.status_code == 400 and "rejected the request" in response.json()["error"]["message"]
    row = LedgerEntry.objects.get()
    for text in (response.text, row.detail, json_log.getvalue()):
        assert AZURE_KEY not in text and AZURE_KEY[-6:] not in text


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_gunicorn_access_log_never_carries_the_query_string(gunicorn, tmp_path):
    secret = keyformat.generate().secret
    requests.get(f"{gunicorn}/v1/models?api_key={secret}", headers={"Referer": f"https://x.example/?k={secret}"}, timeout=10)
    requests.get(f"{gunicorn}/healthz", timeout=10)  # a line after it, so the first is surely flushed
    import time

    deadline = time.monotonic() + 5
    while "/healthz" not in (written := (tmp_path / "gunicorn-access.log").read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "/v1/models" in written and secret not in written and secret[:12] not in written
