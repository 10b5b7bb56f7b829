"""Upstream trouble: errors, timeouts, refused connections, bad JSON, cut streams, and clients that leave."""
import socket
import time

import openai
import pytest
import requests

from gateway.models import Provider
from ledger.models import LedgerEntry
from tests.gateway.factories import ProviderFactory

pytestmark = pytest.mark.redis
HELLO = [{"role": "user", "content": "hello there"}]


def call(relay, key, model, **extra):
    return requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                         json={"model": model, "messages": HELLO, **extra}, timeout=15)


def assert_upstream_failure(response, status, code):
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    row = LedgerEntry.objects.get()
    assert (row.outcome, row.http_status, row.error_code, row.cost) == ("upstream_error", status, code, 0)
    return row


@pytest.mark.parametrize("model", ["fail-500", "fail-429"])
def test_upstream_error_status_is_a_502(relay, key, model):
    relay.alias("m", (relay.openai_provider, model))
    row = assert_upstream_failure(call(relay, key, "m"), 502, "upstream_error")
    assert row.provider_model.name == model


def test_upstream_400_is_passed_back_as_a_rejected_request(relay, key):
    relay.alias("m", (relay.openai_provider, "fail-400"))
    response = call(relay, key, "m")
    assert response.status_code == 400 and response.json()["error"]["code"] == "upstream_rejected"


def test_upstream_timeout_is_a_504(relay, key):
    slow = ProviderFactory(name="Slow", kind=Provider.Kind.OPENAI, base_url=relay.openai_provider.base_url, read_timeout=0.3)
    relay.alias("m", (slow, "slow-2"))
    assert_upstream_failure(call(relay, key, "m"), 504, "upstream_timeout")


def test_connection_refused_is_a_502(relay, key):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound but not listening: connections are refused
        dead = ProviderFactory(name="Dead", kind=Provider.Kind.OPENAI, base_url=f"http://127.0.0.1:{closed_port}/v1")
        relay.alias("m", (dead, "gpt"))
        assert_upstream_failure(call(relay, key, "m"), 502, "upstream_error")


def test_connection_dropped_without_answer_is_a_502(relay, key):
    relay.alias("m", (relay.openai_provider, "refuse"))
    assert_upstream_failure(call(relay, key, "m"), 502, "upstream_error")


def test_malformed_upstream_json_is_a_502(relay, key):
    relay.alias("m", (relay.openai_provider, "malformed"))
    assert_upstream_failure(call(relay, key, "m"), 502, "upstream_error")


def test_secrets_never_appear_in_upstream_errors(relay, key):
    relay.alias("m", (relay.openai_provider, "fail-500"))
    response = call(relay, key, "m")
    assert relay.openai_provider.api_key not in response.text and key.secret not in response.text
    assert relay.openai_provider.api_key not in LedgerEntry.objects.get().detail


def test_truncated_stream_ends_with_an_error_and_records_partial_usage(relay, key):
    relay.alias("m", (relay.openai_provider, "truncated"))
    sdk = relay.openai(key.secret)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in sdk.chat.completions.create(model="m", messages=HELLO, stream=True):
            received += [c.delta.content or "" for c in chunk.choices]
    assert "".join(received)  # what arrived before the cut was relayed
    row = LedgerEntry.objects.get()
    assert (row.outcome, row.error_code, row.streamed) == ("upstream_error", "upstream_error", True)
    assert row.input_tokens > 0 and row.output_tokens > 0 and row.cost > 0


def test_stream_fallback_happens_before_the_first_byte(relay, key):
    relay.alias("m", (relay.openai_provider, "fail-500"), (relay.anthropic_provider, "claude-stub"))
    sdk = relay.openai(key.secret)
    text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model="m", messages=HELLO, stream=True, max_tokens=20) if c.choices)
    assert text.startswith("stub reply:")
    assert LedgerEntry.objects.get().provider_model.name == "claude-stub"


def test_client_disconnect_mid_stream_records_what_was_used(relay, key):
    relay.alias("m", (relay.openai_provider, "drip-3"))
    response = requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                             json={"model": "m", "messages": HELLO, "stream": True}, stream=True, timeout=10)
    lines = response.iter_lines()
    data_lines = [line for line in (next(lines) for _ in range(8)) if line.startswith(b"data:")]
    assert len(data_lines) >= 3
    response.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    response.close()
    deadline = time.monotonic() + 8
    while not LedgerEntry.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    row = LedgerEntry.objects.get()
    assert (row.outcome, row.error_code, row.streamed) == ("client_abort", "client_disconnected", True)
    assert row.input_tokens > 0 and 0 < row.output_tokens < 20


def test_a_fallback_is_on_the_ledger_row(relay, key):
    """Reproduction: a fallback left no trace on the ledger row, only a log line."""
    relay.alias("m", (relay.openai_provider, "fail-500"), (relay.openai_provider, "fail-429"),
                (relay.openai_provider, "gpt-stub"))
    assert call(relay, key, "m").status_code == 200
    row = LedgerEntry.objects.get()
    assert row.outcome == "ok" and row.provider_model.name == "gpt-stub"
    assert row.detail == "served by gpt-stub after fail-500 (upstream_error), fail-429 (upstream_error) failed"


def test_when_every_deployment_fails_the_answer_names_the_last_failure_and_all_it_tried(relay, key):
    slow = ProviderFactory(name="Slow", kind=Provider.Kind.OPENAI, base_url=relay.openai_provider.base_url, read_timeout=0.3)
    relay.alias("m", (relay.openai_provider, "fail-500"), (slow, "slow-2"))
    row = assert_upstream_failure(call(relay, key, "m"), 504, "upstream_timeout")
    assert "tried fail-500 (upstream_error), slow-2 (upstream_timeout)" in row.detail
