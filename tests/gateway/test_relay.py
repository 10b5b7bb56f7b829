"""The relay end to end: the official SDKs against the live relay, a real stub provider behind it."""
from decimal import Decimal

import openai
import pytest
import requests

from gateway.models import Provider
from ledger.models import LedgerEntry
from tests.gateway.factories import ProviderFactory
from tests.support.relay_fixtures import PROVIDER_SECRET

pytestmark = pytest.mark.redis

HELLO = [{"role": "user", "content": "say hello to the whole wide world"}]  # 7 words


def entry() -> LedgerEntry:
    entries = list(LedgerEntry.objects.all())
    assert len(entries) == 1, f"expected one ledger entry, found {len(entries)}"
    return entries[0]


def client(relay, key) -> openai.OpenAI:
    return relay.openai(key.secret)


def test_chat_completion_is_forwarded_and_ledgered(relay, key, stub):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    reply = client(relay, key).chat.completions.create(model="fast", messages=HELLO)
    assert reply.choices[0].message.content == "stub reply: say hello to the whole wide world"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, 9)
    upstream = stub.requests[-1]
    assert upstream.headers["authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert upstream.body["model"] == "gpt-stub" and key.secret not in str(upstream.headers)
    row = entry()
    assert (row.outcome, row.http_status, row.key_id, row.person_id, row.team_id) == ("ok", 200, key.pk, key.person_id, key.team_id)
    assert row.cost_center_id == key.team.cost_center_id
    assert (row.model_requested, row.provider_model.name, row.input_tokens, row.output_tokens) == ("fast", "gpt-stub", 7, 9)
    assert row.cost == Decimal("0.00002500")  # 7 * $1/M + 9 * $2/M
    assert row.upstream_latency_ms is not None and row.latency_ms >= row.upstream_latency_ms


def test_streamed_chat_reports_usage_and_is_ledgered(relay, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    chunks = list(client(relay, key).chat.completions.create(
        model="fast", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stub reply: say hello to the whole wide world"
    assert chunks[-1].usage.completion_tokens == 9
    row = entry()
    assert (row.streamed, row.outcome, row.input_tokens, row.output_tokens) == (True, "ok", 7, 9)


def test_stream_without_usage_request_still_records_usage(relay, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    chunks = list(client(relay, key).chat.completions.create(model="fast", messages=HELLO, stream=True))
    assert all(c.usage is None for c in chunks)
    assert (entry().input_tokens, entry().output_tokens) == (7, 9)


def test_chat_completions_reach_an_anthropic_model(relay, key, stub):
    relay.alias("claude", (relay.anthropic_provider, "claude-stub"))
    reply = client(relay, key).chat.completions.create(
        model="claude", messages=[{"role": "system", "content": "be brief"}, *HELLO], max_tokens=50)
    assert reply.choices[0].message.content.startswith("stub reply: say hello")
    upstream = stub.requests[-1]
    assert upstream.path == "/v1/messages" and upstream.body["system"] == "be brief"
    assert upstream.headers["x-api-key"] == PROVIDER_SECRET
    assert (entry().input_tokens, entry().output_tokens) == (9, 9)

    stream = client(relay, key).chat.completions.create(
        model="claude", messages=HELLO, max_tokens=50, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("stub reply:")
    assert chunks[-1].usage.prompt_tokens == 7
    assert LedgerEntry.objects.filter(streamed=True, output_tokens=9).count() == 1


def test_anthropic_messages_reach_an_openai_model_and_an_anthropic_one(relay, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    relay.alias("claude", (relay.anthropic_provider, "claude-stub"))
    sdk = relay.anthropic(key.secret)
    for model in ("fast", "claude"):
        message = sdk.messages.create(model=model, max_tokens=100, messages=HELLO)
        assert message.content[0].text == "stub reply: say hello to the whole wide world"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 9)
        with sdk.messages.stream(model=model, max_tokens=100, messages=HELLO) as stream:
            started = next(event for event in stream if event.type == "message_start")
            final = stream.get_final_message()
        assert started.message.usage.input_tokens > 0  # translated streams too (OpenAI counts only at the end)
        assert final.content[0].text.startswith("stub reply:") and final.usage.output_tokens == 9
        assert final.usage.input_tokens == 7  # the provider's count, once it gave it
    rows = LedgerEntry.objects.order_by("id")
    assert [(r.model_requested, r.streamed, r.output_tokens) for r in rows] == [
        ("fast", False, 9), ("fast", True, 9), ("claude", False, 9), ("claude", True, 9)]


def test_embeddings(relay, key):
    from gateway.models import ModelAlias

    relay.alias("embed", (relay.openai_provider, "embed-stub"), kind=ModelAlias.Kind.EMBEDDING)
    result = client(relay, key).embeddings.create(model="embed", input=["one two three", "four"])
    assert len(result.data) == 2 and result.usage.prompt_tokens == 4
    assert (entry().input_tokens, entry().output_tokens, entry().outcome) == (4, 0, "ok")


def test_models_lists_only_what_the_key_may_use(relay, key):
    fast = relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    relay.alias("smart", (relay.openai_provider, "gpt-stub-2"))
    assert sorted(m.id for m in client(relay, key).models.list()) == ["fast", "smart"]
    key.allowed_models.set([fast])
    assert [m.id for m in client(relay, key).models.list()] == ["fast"]
    listings = LedgerEntry.objects.filter(key=key)  # every call to /v1 has its row, listings included
    assert listings.count() == 2 and {(e.outcome, e.http_status, e.cost) for e in listings} == {("ok", 200, 0)}


def test_azure_deployment_gets_its_path_api_version_and_header(relay, key, stub):
    azure = ProviderFactory(name="Azure", kind=Provider.Kind.AZURE_OPENAI, base_url=stub.base_url,
                            api_version="2024-06-01", api_key=PROVIDER_SECRET)
    relay.alias("az", (azure, "my-gpt-deployment"))
    client(relay, key).chat.completions.create(model="az", messages=HELLO)
    upstream = stub.requests[-1]
    assert upstream.path == "/openai/deployments/my-gpt-deployment/chat/completions"
    assert upstream.query["api-version"] == "2024-06-01" and upstream.headers["api-key"] == PROVIDER_SECRET


def test_tags_come_from_key_header_and_metadata_and_metadata_stays_home(relay, key, stub):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    key.default_tags = {"project": "default-project", "environment": "dev"}
    key.save()
    requests.post(f"{relay.v1}/chat/completions", headers={
        "Authorization": f"Bearer {key.secret}", "X-Tollgate-Tags": "feature=search, environment=prod, bogus=x"},
        json={"model": "fast", "messages": HELLO, "metadata": {"experiment": "exp-7"}}, timeout=10).raise_for_status()
    assert entry().tags == {"project": "default-project", "environment": "prod", "feature": "search", "experiment": "exp-7"}
    assert "metadata" not in stub.requests[-1].body


def test_fallback_to_the_next_deployment_on_upstream_failure(relay, key):
    relay.alias("fast", (relay.openai_provider, "fail-500"), (relay.openai_provider, "fail-429"),
                (relay.anthropic_provider, "claude-stub"))
    reply = client(relay, key).chat.completions.create(model="fast", messages=HELLO, max_tokens=20)
    assert reply.choices[0].message.content.startswith("stub reply:")
    row = entry()
    assert (row.outcome, row.provider_model.name) == ("ok", "claude-stub")


def test_prices_in_force_at_call_time_are_charged(relay, key):
    import time_machine
    from django.utils import timezone

    from gateway.models import ModelPrice

    alias = relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    model = alias.deployments.get().provider_model
    ModelPrice.objects.create(provider_model=model, effective_from=timezone.now() + timezone.timedelta(days=1),
                              input_per_mtok=Decimal("10"), output_per_mtok=Decimal("20"))
    client(relay, key).chat.completions.create(model="fast", messages=HELLO)
    with time_machine.travel(timezone.now() + timezone.timedelta(days=2)):
        client(relay, key).chat.completions.create(model="fast", messages=HELLO)
    assert [r.cost for r in LedgerEntry.objects.order_by("id")] == [Decimal("0.00002500"), Decimal("0.00025000")]


def test_the_built_in_mock_embeds_token_arrays_and_gives_the_same_vectors_in_every_process(relay, key):
    """Reproduction: the mock answered 500 to token arrays, and its vectors changed with each process's hash
    seed although it is described as deterministic."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gateway.models import ModelAlias

    mock = ProviderFactory(name="Mock", kind=Provider.Kind.MOCK, base_url="", api_key="")
    relay.alias("embed", (mock, "mock-embed"), kind=ModelAlias.Kind.EMBEDDING)
    sdk = client(relay, key)
    for given in ("hello world", ["hello world", "bye"], [15339, 1917], [[15339, 1917], [3]]):
        result = sdk.embeddings.create(model="embed", input=given)
        assert len(result.data) == (len(given) if isinstance(given, list) and not isinstance(given[0], int) else 1)
    first = sdk.embeddings.create(model="embed", input="hello world").data[0].embedding
    script = "import django; django.setup(); from gateway.providers import _mock_vector; print(_mock_vector('hello world'))"
    other = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], check=True,
                           capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345", "DEBUG": "true",
                                                                "DJANGO_SETTINGS_MODULE": "governance.settings"})
    assert [round(v, 6) for v in first] == [round(v, 6) for v in eval(other.stdout)]  # noqa: S307 (a list of floats)
    bad = requests.post(f"{relay.v1}/embeddings", headers={"Authorization": f"Bearer {key.secret}"},
                        json={"model": "embed", "input": [{}]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
