"""Request bodies as real clients and proxies send them, against the production web tier (gevent workers).

Reproductions: a chunked body (no Content-Length) read as empty (400 invalid_json); a body shorter than its
Content-Length held the call indefinitely. What must hold: a chunked body is relayed; a body that does not
arrive within TOLLGATE_BODY_READ_SECONDS is refused 408 `request_timeout`, fast, and ledgered."""
import json
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from ledger.models import LedgerEntry

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]
BODY = {"model": "fast", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def _wait_for_rows(ids: set[str], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = {e.request_id: e for e in LedgerEntry.objects.filter(request_id__in=ids)}
        if set(rows) == ids:
            return rows
        time.sleep(0.1)
    return {e.request_id: e for e in LedgerEntry.objects.filter(request_id__in=ids)}


def test_a_chunked_body_is_relayed(relay, key, web_tier):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    tier = web_tier(workers=1)
    chunks = (part.encode() for part in (json.dumps(BODY)[:20], json.dumps(BODY)[20:]))  # a generator: chunked
    response = requests.post(f"{tier.v1}/chat/completions", data=chunks, timeout=10,
                             headers={"Authorization": f"Bearer {key.secret}", "Content-Type": "application/json",
                                      "X-Request-ID": "chunked-body-1"})
    assert response.status_code == 200, response.text
    assert _wait_for_rows({"chunked-body-1"})["chunked-body-1"].outcome == "ok"


def test_a_body_shorter_than_its_length_is_refused_in_time_and_ledgered(relay, key, web_tier):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    tier = web_tier(workers=1, TOLLGATE_BODY_READ_SECONDS=1)
    address = urlparse(tier.url)
    body = json.dumps(BODY).encode()
    with socket.create_connection((address.hostname, address.port), timeout=15) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + key.secret.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: short-body-1\r\nContent-Length: " + str(len(body) + 100).encode() + b"\r\n\r\n" + body)
        started = time.monotonic()
        answer = ""  # the rest of the body never comes: the relay must not wait for ever
        while "request_timeout" not in answer and time.monotonic() - started < 10:
            data = sock.recv(65536)
            if not data:
                break
            answer += data.decode(errors="replace")
        took = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer and took < 5, (took, answer[:300])
    row = _wait_for_rows({"short-body-1"})["short-body-1"]
    assert (row.http_status, row.error_code, row.outcome) == (408, "request_timeout", "refused")
