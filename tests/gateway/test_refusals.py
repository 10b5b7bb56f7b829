"""Every refusal: an OpenAI-style JSON error with the right status and stable code, and a ledger entry."""
from decimal import Decimal

import anthropic
import openai
import pytest
import requests
from django.utils import timezone

from keys import keyformat
from keys.models import VirtualKey
from ledger.models import LedgerEntry

pytestmark = pytest.mark.redis
HELLO = [{"role": "user", "content": "hello there"}]


def post(relay, path="/chat/completions", secret=None, json=None, data=None, headers=None):
    headers = dict(headers or {})
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    return requests.post(relay.v1 + path, json=json, data=data, headers=headers, timeout=10)


def assert_refused(response, status, code, *, outcome="refused"):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    row = LedgerEntry.objects.latest("id")  # the refused call is the last one written
    assert (row.http_status, row.error_code, row.outcome, row.cost) == (status, code, outcome, Decimal(0))
    assert row.detail and row.request_id == response.headers["X-Request-ID"]
    return row


@pytest.fixture
def fast(relay):
    return relay.alias("fast", (relay.openai_provider, "gpt-stub"), max_output_tokens=1000)


def test_missing_key(relay, fast):
    row = assert_refused(post(relay, json={"model": "fast", "messages": HELLO}), 401, "missing_api_key")
    assert row.key is None and row.client_ip == "127.0.0.1"


@pytest.mark.parametrize("secret", ["not-a-key", keyformat.generate().secret[:-1] + "x", keyformat.generate().secret])
def test_malformed_or_unknown_key(relay, fast, secret):
    assert_refused(post(relay, secret=secret, json={"model": "fast", "messages": HELLO}), 401, "invalid_api_key")


@pytest.mark.parametrize("status, code", [
    (VirtualKey.Status.REVOKED, "key_revoked"), (VirtualKey.Status.SUSPENDED, "key_suspended"),
    (VirtualKey.Status.EXPIRED, "key_expired"), (VirtualKey.Status.PENDING, "key_inactive"),
])
def test_key_not_active(relay, fast, key, status, code):
    VirtualKey.objects.filter(pk=key.pk).update(status=status)
    row = assert_refused(post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}), 401, code)
    assert row.key_id == key.pk and row.person_id == key.person_id


def test_key_past_its_expiry_date(relay, fast, key):
    VirtualKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timezone.timedelta(seconds=1))
    assert_refused(post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}), 401, "key_expired")


def test_openai_sdk_sees_an_authentication_error(relay, fast):
    with pytest.raises(openai.AuthenticationError) as excinfo:
        relay.openai("tg_l_wrong").chat.completions.create(model="fast", messages=HELLO)
    assert excinfo.value.code == "invalid_api_key"


@pytest.mark.parametrize("holder", ["key", "team"])
def test_ip_outside_the_allowlist(relay, fast, key, holder):
    target = key if holder == "key" else key.team
    target.ip_allowlist = ["10.0.0.0/8"]
    target.save()
    assert_refused(post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}), 403, "ip_not_allowed")


def test_ip_inside_the_allowlist_is_served(relay, fast, key):
    key.ip_allowlist = ["10.0.0.0/8", "127.0.0.0/8"]
    key.save()
    assert post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}).status_code == 200


def test_model_outside_the_allowlists(relay, fast, key):
    smart = relay.alias("smart", (relay.openai_provider, "gpt-stub-2"))
    key.team.allowed_models.set([fast, smart])
    key.allowed_models.set([fast])
    assert post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}).status_code == 200
    assert_refused(post(relay, secret=key.secret, json={"model": "smart", "messages": HELLO}), 403, "model_not_allowed")


def test_unknown_model(relay, fast, key):
    assert_refused(post(relay, secret=key.secret, json={"model": "gpt-9", "messages": HELLO}), 404, "model_not_found")


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'{"messages": []}', "invalid_request"),
    (b'{"model": "fast"}', "invalid_request"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', "invalid_request"),
])
def test_malformed_requests(relay, fast, key, body, code):
    response = post(relay, secret=key.secret, data=body, headers={"Content-Type": "application/json"})
    assert_refused(response, 400, code)


def test_max_tokens_over_the_model_limit(relay, fast, key):
    response = post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO, "max_tokens": 1001})
    assert_refused(response, 400, "max_tokens_too_large")


def test_body_over_the_size_limit(relay, fast, key, settings):
    settings.TOLLGATE_MAX_BODY_BYTES = 1000
    response = post(relay, secret=key.secret, json={"model": "fast", "messages": [{"role": "user", "content": "x" * 2000}]})
    assert_refused(response, 413, "request_too_large")


@pytest.mark.usefixtures("one_rate_window")
def test_rate_limit_per_key_with_retry_after_and_headers(relay, fast, key):
    key.rpm_limit = 2
    key.save()
    for _ in range(2):
        ok = post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO})
        assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "2" and ok.headers["x-ratelimit-remaining-requests"] == "0"
    refused = post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO})
    assert_refused(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 61


def test_person_limit_binds_across_the_person_keys(relay, fast, key):
    from tests.keys.factories import VirtualKeyFactory

    other = VirtualKeyFactory(person=key.person, team=key.team)
    key.person.rpd_limit = 1
    key.person.save()
    assert post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}).status_code == 200
    assert_refused(post(relay, secret=other.secret, json={"model": "fast", "messages": HELLO}), 429, "rate_limit_exceeded")


@pytest.mark.usefixtures("one_rate_window")
def test_token_limit_refuses_once_the_window_is_spent(relay, fast, key):
    key.team.tpm_limit = 10
    key.team.save()
    assert post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}).status_code == 200  # 2 + 4 tokens
    assert post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}).status_code == 200  # 12 > 10 now
    assert_refused(post(relay, secret=key.secret, json={"model": "fast", "messages": HELLO}), 429, "rate_limit_exceeded")


def test_budget_cap_refuses_the_call_that_could_exceed_it(relay, key):
    relay.alias("pricey", (relay.openai_provider, "gpt-4o-stub"), price=("1000", "2000", "0"))
    # Each call costs $0.01 (2 input tokens at $1000/M, 4 output at $2000/M); its worst case, held before
    # forwarding, is $0.02 (10 input tokens by the model's tokenizer with message overhead, max_tokens 5).
    # With a $0.10 cap the 10th call could overshoot ($0.09 spent + $0.02) and is refused.
    key.monthly_budget = Decimal("0.10")
    key.save()
    statuses = [post(relay, secret=key.secret, json={"model": "pricey", "messages": HELLO, "max_tokens": 5}).status_code
                for _ in range(10)]
    assert statuses == [200] * 9 + [429]
    refused = LedgerEntry.objects.filter(error_code="budget_exceeded")
    assert refused.count() == 1 and all(e.cost == 0 for e in refused)
    assert sum(e.cost for e in LedgerEntry.objects.all()) == Decimal("0.09")


def test_unknown_endpoint_and_wrong_method_answer_in_json_and_are_ledgered(relay, key):
    response = requests.get(relay.v1 + "/nope", timeout=5, headers={"X-Request-ID": "unknown-path-1"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = requests.get(relay.v1 + "/chat/completions", timeout=5, headers={"X-Request-ID": "wrong-method-1"})
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    rows = {e.request_id: (e.outcome, e.http_status, e.error_code) for e in LedgerEntry.objects.all()}
    assert rows == {"unknown-path-1": ("refused", 404, "not_found"), "wrong-method-1": ("refused", 405, "method_not_allowed")}


def test_anthropic_endpoint_refusals_parse_in_the_anthropic_sdk(relay, fast):
    sdk = relay.anthropic("tg_l_bad")
    with pytest.raises(anthropic.AuthenticationError) as excinfo:
        sdk.messages.create(model="fast", max_tokens=10, messages=HELLO)
    assert excinfo.value.body["error"]["code"] == "invalid_api_key"


def test_nul_and_lone_surrogates_from_the_client_are_ledgered_not_lost(relay, fast, key):
    """Reproduction: a NUL in a tag or a lone surrogate in the model name made the ledger insert fail (the
    call was served and charged in Redis with no row), or the answer a Django HTML 500."""
    served = post(relay, secret=key.secret, headers={"Content-Type": "application/json", "X-Request-ID": "nul-in-tag-1"},
                  data='{"model": "fast", "messages": [{"role": "user", "content": "hi \\u0000 there"}], '
                       '"metadata": {"project": "a\\u0000b"}}')
    assert served.status_code == 200
    unknown = post(relay, secret=key.secret, headers={"Content-Type": "application/json", "X-Request-ID": "surrogate-1"},
                   data='{"model": "fast\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    rows = {e.request_id: e for e in LedgerEntry.objects.all()}
    assert set(rows) == {"nul-in-tag-1", "surrogate-1"}
    assert rows["nul-in-tag-1"].tags == {"project": "a\ufffdb"} and rows["nul-in-tag-1"].outcome == "ok"
    assert rows["surrogate-1"].model_requested == "fast\ufffd" and rows["surrogate-1"].error_code == "model_not_found"


_HI = '[{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("path, body, headers", [
    ("/chat/completions", '{"model": "fast", "messages": ' + _HI + ', "stream_options": [1]}', {}),
    ("/chat/completions", '{"model": "fast", "messages": ' + _HI + ', "stream": "yes"}', {}),
    ("/chat/completions", '{"model": "fast", "messages": ' + _HI + ', "max_tokens": true}', {}),
    ("/chat/completions", '{"model": "fast", "messages": [{"role": "user", "content": 5}]}', {}),
    ("/chat/completions", '{"model": "fast", "messages": ' + "[" * 5000 + "]" * 5000 + "}", {}),
    ("/chat/completions", '{"model": "fast", "messages": ' + _HI + ', "x": ' + "[" * 100 + "]" * 100 + "}", {}),
    ("/chat/completions", '{"model": "fast", "messages": ' + _HI + "}", {"X-Tollgate-Tags": '{"project": {"a": 1}}'}),
    ("/chat/completions", '{"model": "fast", "messages": ' + _HI + "}", {"X-Tollgate-Tags": "{" * 5000}),
    ("/messages", '{"model": "fast", "max_tokens": 5, "messages": ' + _HI + ', "system": 5}', {}),
    ("/messages", '{"model": "fast", "max_tokens": 5, "messages": ' + _HI + ', "tools": [1]}', {}),
    ("/messages", '{"model": "fast", "max_tokens": 5, "messages": ' + _HI + ', "stop_sequences": 5}', {}),
    ("/messages", '{"model": "fast", "max_tokens": 5, "messages": ' + _HI + ', "tool_choice": ["auto"]}', {}),
    ("/messages", '{"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": [1]}]}', {}),
], ids=["stream_options-list", "stream-string", "max_tokens-bool", "content-number", "nested-5000", "nested-100",
        "tags-nested", "tags-deep", "system-number", "tools-numbers", "stop_sequences-number", "tool_choice-list",
        "content-part-number"])
def test_wrong_types_and_deep_nesting_are_a_400_and_ledgered(relay, fast, key, path, body, headers):
    """Reproduction: each of these answered 500 (some with Django's HTML page)."""
    response = post(relay, path=path, secret=key.secret, data=body,
                    headers={"Content-Type": "application/json", **headers})
    assert_refused(response, 400, response.json()["error"]["code"])
    assert response.json()["error"]["code"] in ("invalid_request", "invalid_json")
    assert LedgerEntry.objects.count() == 1


def test_a_field_the_target_format_cannot_honour_is_a_400_naming_it(relay, key):
    """Reproduction: openai -> an Anthropic-format model silently dropped n (n=2 returned one choice)."""
    relay.alias("claude", (relay.anthropic_provider, "claude-stub"))
    response = post(relay, secret=key.secret, json={"model": "claude", "messages": HELLO, "max_tokens": 5, "n": 2})
    row = assert_refused(response, 400, "unsupported_parameter")
    assert "'n'" in response.json()["error"]["message"] and "'n'" in row.detail
