"""The relay under generated input: no input is a server error, and every call is ledgered exactly once.

Two generators, one oracle:
- schemathesis generates calls from the schema the project keeps (gateway/openapi/relay.yaml), valid ones
  and ones that break it (wrong types, missing fields, junk bodies and headers);
- hypothesis builds the hostile input a schema cannot express: bodies nested past any limit, NUL and lone
  surrogates in the model, tags and content, wrong types in fields the relay reads, conflicting output
  limits, to models served in both wire formats (translated or not) and by the built-in mock.
Each answer must be JSON (or an event stream) with a status under 500, save an upstream failure answered
as such (502/504 with its code), and each call's request id must have exactly one ledger row.

Examples are derandomized so CI is repeatable; TOLLGATE_FUZZ_EXAMPLES raises the count for a longer hunt
(`TOLLGATE_FUZZ_EXAMPLES=2000 make test PYTEST_ARGS="-k fuzz"`).
"""
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.models import ModelAlias, Provider
from ledger.models import LedgerEntry
from tests.gateway.factories import ProviderFactory

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

SCHEMA = schemathesis.openapi.from_path(Path(__file__).resolve().parents[2] / "gateway" / "openapi" / "relay.yaml")
EXAMPLES = int(os.environ.get("TOLLGATE_FUZZ_EXAMPLES", "60"))
UPSTREAM_CODES = {"upstream_error", "upstream_timeout", "upstream_unavailable"}
FUZZ = settings(max_examples=EXAMPLES, database=None, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))


class Oracle:
    """Sends calls and keeps what every answer must satisfy; `assert_all_ledgered` checks the ledger at the end."""

    def __init__(self, relay):
        self.relay, self.session = relay, requests.Session()
        self.request_ids: list[str] = []
        self.statuses: Counter = Counter()

    def check(self, response: requests.Response, what: str) -> None:
        self.statuses[response.status_code] += 1
        request_id = response.headers.get("X-Request-ID")
        assert request_id, f"no request id for {what}"
        self.request_ids.append(request_id)
        content_type = response.headers.get("Content-Type", "")
        assert content_type.startswith(("application/json", "text/event-stream")), f"{content_type} for {what}"
        if content_type.startswith("application/json"):
            body = response.json()
            if response.status_code >= 400:
                error = body["error"]
                assert error["code"] and error["message"], (what, body)
        if response.status_code >= 500:
            code = response.json()["error"]["code"]
            assert code in UPSTREAM_CODES, f"server error {response.status_code} {code} for {what}: {response.text[:300]}"

    def assert_all_ledgered(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            rows = Counter(LedgerEntry.objects.filter(request_id__in=self.request_ids)
                           .values_list("request_id", flat=True))
            missing = [rid for rid in self.request_ids if rid not in rows]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not missing, f"{len(missing)} of {len(self.request_ids)} calls not ledgered"
        assert all(count == 1 for count in rows.values()), "a call was ledgered twice"
        print(f"fuzz: {len(self.request_ids)} calls, each ledgered once; statuses {dict(sorted(self.statuses.items()))}")


@pytest.fixture
def fuzz_relay(relay):
    """Aliases on every kind of deployment: OpenAI format, Anthropic format (translated both ways), the
    built-in mock (chat and embeddings)."""
    mock = ProviderFactory(name="Mock", kind=Provider.Kind.MOCK, base_url="")
    relay.alias("gpt-fuzz", (relay.openai_provider, "gpt-stub"), max_output_tokens=2000)
    relay.alias("claude-fuzz", (relay.anthropic_provider, "claude-stub"), max_output_tokens=2000)
    relay.alias("mock-fuzz", (mock, "mock-chat"), max_output_tokens=2000)
    relay.alias("embed-fuzz", (relay.openai_provider, "text-embedding-stub"), kind=ModelAlias.Kind.EMBEDDING)
    relay.alias("mock-embed", (mock, "mock-embed"), kind=ModelAlias.Kind.EMBEDDING)
    return relay


MODELS = ["gpt-fuzz", "claude-fuzz", "mock-fuzz", "embed-fuzz", "mock-embed"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("operation", [op.ok() for op in SCHEMA.get_all_operations()], ids=lambda op: op.label)
def test_schema_fuzzing_never_errors_and_ledgers_every_call(fuzz_relay, key, operation, mode):
    oracle = Oracle(fuzz_relay)

    @given(case=operation.as_strategy(generation_mode=mode), use_key=st.booleans(), model=st.sampled_from(MODELS))
    @FUZZ
    def run(case, use_key, model):
        if use_key:  # most of the relay lies behind authentication: reach it with a real key half the time
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key.secret}"}
            if isinstance(case.body, dict) and mode == GenerationMode.POSITIVE:
                case.body["model"] = model
        request = case.as_transport_kwargs(base_url=fuzz_relay.url)
        response = oracle.session.request(**{**request, "timeout": 15})
        oracle.check(response, case.as_curl_command(headers={"Authorization": "Bearer ***"})[:400])

    run()
    oracle.assert_all_ledgered()


# --- Hostile bodies the schema cannot express --------------------------------------------------------------

NASTY_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\x00", "\ud800", "a\udfffb", "\x00\ud83d", "\u202e", "\ufeff", "x" * 5000]),
)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70) | st.floats(allow_nan=False)
    | NASTY_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(NASTY_TEXT, children, max_size=3),
    max_leaves=8,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CHAT_FIELDS = {
    "max_tokens": ANY_JSON, "max_completion_tokens": ANY_JSON, "n": ANY_JSON, "stream": ANY_JSON,
    "stream_options": ANY_JSON, "stop": ANY_JSON, "tools": ANY_JSON, "tool_choice": ANY_JSON,
    "response_format": ANY_JSON, "temperature": ANY_JSON, "metadata": ANY_JSON, "user": ANY_JSON,
    "seed": ANY_JSON, "logit_bias": ANY_JSON,
}
MESSAGES_FIELDS = {
    "max_tokens": ANY_JSON, "system": ANY_JSON, "stop_sequences": ANY_JSON, "tools": ANY_JSON,
    "tool_choice": ANY_JSON, "stream": ANY_JSON, "metadata": ANY_JSON, "thinking": ANY_JSON, "top_k": ANY_JSON,
}


@st.composite
def hostile_call(draw):
    endpoint = draw(st.sampled_from(["chat/completions", "messages", "embeddings"]))
    model = draw(st.sampled_from(MODELS) | NASTY_TEXT)
    content = draw(NASTY_TEXT | ANY_JSON)
    if endpoint == "embeddings":
        body = {"model": model, "input": draw(st.sampled_from([content, [content], [[1, 2]], [{}], [], [[]]]) | ANY_JSON)}
        fields = {}
    else:
        role = draw(st.sampled_from(["user", "system", "assistant", "tool", 5, None]))
        body = {"model": model, "messages": draw(st.sampled_from([[{"role": role, "content": content}], content]))}
        if endpoint == "messages":
            body["max_tokens"] = draw(st.integers(min_value=1, max_value=100))
        fields = CHAT_FIELDS if endpoint == "chat/completions" else MESSAGES_FIELDS
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)) if fields else ():
        body[name] = draw(fields[name])
    raw = json.dumps(body)
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # now and then, nested far past any limit
        raw = raw[:-1] + ', "deep": ' + nested(draw(st.sampled_from([65, 1000, 5000]))) + "}"
    tags = draw(st.none() | st.sampled_from(['{"project": "\\u0000"}', '{"project": "\\ud800"}', nested(5000),
                                             '{"project": 5}', "not json", '{"feature": "checkout"}']))
    return endpoint, raw.encode("utf-8", "surrogatepass"), tags


def test_hostile_bodies_never_error_and_are_ledgered_once(fuzz_relay, key):
    oracle = Oracle(fuzz_relay)

    @given(call=hostile_call())
    @settings(FUZZ, max_examples=EXAMPLES * 3)
    def run(call):
        endpoint, raw, tags = call
        headers = {"Authorization": f"Bearer {key.secret}", "Content-Type": "application/json"}
        if tags is not None:
            headers["X-Tollgate-Tags"] = tags
        response = oracle.session.post(f"{fuzz_relay.v1}/{endpoint}", data=raw, headers=headers, timeout=15)
        oracle.check(response, f"{endpoint} {raw[:300]!r} tags={tags!r}")

    run()
    oracle.assert_all_ledgered()
    assert oracle.statuses[200] > 0, f"nothing got through to a provider: {oracle.statuses}"
