"""Self-tests of the loopback stub provider, driven through requests and the official SDKs."""
import base64
import json
import struct
import threading
import time

import anthropic
import openai
import pytest
import requests

from tests.support.stub_provider import StubProvider

AUTH = {"Authorization": "Bearer sk-test"}
MESSAGES = [
    {"role": "system", "content": "You are terse."},  # 3 words
    {"role": "user", "content": "one two three four five six seven eight nine ten"},  # 10
    {"role": "assistant", "content": [{"type": "text", "text": "an answer"}]},  # 2
    {"role": "user", "content": [{"type": "text", "text": "alpha beta"}, {"type": "text", "text": "gamma"}]},  # 3
]
P = 3 + 10 + 2 + 3
REPLY = "stub reply: alpha beta gamma"
C = 5


@pytest.fixture(scope="module")
def stub():
    with StubProvider() as s:
        yield s


@pytest.fixture
def fresh(stub):
    stub.reset()
    return stub


@pytest.fixture
def oai(stub):
    with openai.OpenAI(base_url=stub.openai_base_url, api_key="sk-test", max_retries=0, timeout=5) as c:
        yield c


@pytest.fixture
def claude(stub):
    with anthropic.Anthropic(base_url=stub.anthropic_base_url, api_key="sk-ant-test", max_retries=0, timeout=5) as c:
        yield c


def _chat(stub, model, stream=False, timeout=5, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": stream, **extra}
    return requests.post(f"{stub.openai_base_url}/chat/completions", json=body, headers=AUTH,
                         stream=stream, timeout=timeout)


def _anthropic(stub, model, stream=False, **extra):
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    return requests.post(f"{stub.base_url}/v1/messages", json=body, headers={"x-api-key": "k"}, stream=stream, timeout=5)


# ---------------------------------------------------------------- OpenAI


def test_urls(stub):
    assert stub.base_url.startswith("http://127.0.0.1:")
    assert stub.openai_base_url == stub.base_url + "/v1"
    assert stub.anthropic_base_url == stub.base_url


def test_openai_sdk_non_stream(fresh, oai):
    resp = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-stub-")
    assert resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (P, C, P + C)
    assert resp.usage.prompt_tokens_details.cached_tokens == 0

    (rec,) = fresh.requests
    assert (rec.method, rec.path) == ("POST", "/v1/chat/completions")
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.body["model"] == "gpt-4o-mini"


def test_openai_reply_uses_first_eight_words_of_last_user_message(oai):
    resp = oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a b c d e f g h i j k"}])
    assert resp.choices[0].message.content == "stub reply: a b c d e f g h"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (11, 10)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_openai_max_tokens_truncates(oai, param):
    resp = oai.chat.completions.create(model="m", messages=MESSAGES, **{param: 3})
    assert resp.choices[0].message.content == "stub reply: alpha"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_openai_sdk_stream_with_usage(oai):
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    content_chunks = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == C
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (P, C, P + C)


def test_openai_stream_raw_framing(stub):
    r = _chat(stub, "m", stream=True, stream_options={"include_usage": False})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers.get("transfer-encoding") == "chunked"
    raw = r.content.decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    # role, "stub ", "reply: ", "hi ", "there", finish — and no usage chunk
    assert [p["choices"][0]["delta"].get("content") for p in payloads] == ["", "stub ", "reply: ", "hi ", "there", None]
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all("usage" not in p for p in payloads)


def test_keep_alive_reuses_connection(stub):
    with requests.Session() as s:
        for _ in range(5):
            r = s.post(f"{stub.openai_base_url}/chat/completions", headers=AUTH,
                       json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, timeout=5)
            assert r.status_code == 200
            assert r.headers["content-length"] == str(len(r.content))
            assert "close" not in r.headers.get("connection", "")
        # and a stream on the same pooled connection, then a plain request again
        r = s.post(f"{stub.openai_base_url}/chat/completions", headers=AUTH, timeout=5,
                   json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
        assert r.text.endswith("data: [DONE]\n\n")
        r = s.post(f"{stub.openai_base_url}/embeddings", headers=AUTH, json={"model": "e", "input": "x"}, timeout=5)
        assert r.status_code == 200


def test_embeddings(fresh, oai):
    resp = oai.embeddings.create(model="text-embedding-3-small", input=["hello world", "one two three"])
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens == 5 and resp.usage.total_tokens == 5
    again = oai.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert again.data[0].embedding == resp.data[0].embedding  # deterministic
    assert again.usage.prompt_tokens == 2
    # asked for explicitly, the SDK hands base64 (little-endian float32) back undecoded
    b64 = oai.embeddings.create(model="e", input="hello world", encoding_format="base64")
    decoded = struct.unpack("<8f", base64.b64decode(b64.data[0].embedding))
    assert decoded == pytest.approx(resp.data[0].embedding, abs=1e-6)


# ---------------------------------------------------------------- Anthropic


def test_anthropic_sdk_non_stream(fresh, claude):
    msg = claude.messages.create(
        model="claude-x", max_tokens=100, system="Be brief please",
        messages=[{"role": "user", "content": "tell me a joke"}])
    assert msg.id.startswith("msg_stub_")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "claude-x"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "stub reply: tell me a joke"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (3 + 4, 6)
    assert msg.usage.cache_read_input_tokens == 0 and msg.usage.cache_creation_input_tokens == 0
    (rec,) = fresh.requests
    assert rec.path == "/v1/messages"
    # anthropic 2.x sends the key as "Authorization: Bearer", not x-api-key
    assert "sk-ant-test" in (rec.headers.get("x-api-key"), rec.headers.get("authorization", "").removeprefix("Bearer "))
    assert "anthropic-version" in rec.headers


def test_anthropic_max_tokens(claude):
    msg = claude.messages.create(
        model="claude-x", max_tokens=2, system=[{"type": "text", "text": "sys words"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "tell me a joke"}]}])
    assert msg.content[0].text == "stub reply:"
    assert msg.stop_reason == "max_tokens"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (6, 2)


def test_anthropic_sdk_stream(claude):
    with claude.messages.stream(
        model="claude-x", max_tokens=100, system="Be brief please",
        messages=[{"role": "user", "content": "tell me a joke"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "stub reply: tell me a joke"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 6)


def test_anthropic_stream_event_sequence(stub):
    r = _anthropic(stub, "claude-x", stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    datas = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert [d["type"] for d in datas] == names
    assert datas[0]["message"]["usage"]["input_tokens"] == 1
    assert datas[0]["message"]["usage"]["output_tokens"] == 1
    assert datas[0]["message"]["content"] == []
    assert datas[-2] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"output_tokens": 3}}


# ---------------------------------------------------------------- Azure


def test_azure_sdk(fresh):
    client = openai.AzureOpenAI(azure_endpoint=fresh.base_url, api_version="2024-06-01", api_key="x", max_retries=0)
    resp = client.chat.completions.create(model="my-deployment", messages=MESSAGES)
    assert resp.model == "my-deployment"
    assert resp.choices[0].message.content == REPLY
    assert resp.usage.prompt_tokens == P
    stream = client.chat.completions.create(
        model="my-deployment", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == C
    rec = fresh.requests[0]
    assert rec.path == "/openai/deployments/my-deployment/chat/completions"
    assert rec.query == {"api-version": "2024-06-01"}
    assert rec.headers["api-key"] == "x"
    client.close()


def test_azure_requires_api_version(stub):
    r = requests.post(f"{stub.base_url}/openai/deployments/d/chat/completions", headers={"api-key": "x"},
                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=5)
    assert r.status_code == 400
    assert "api-version" in r.json()["error"]["message"]


def test_azure_failure_selected_by_deployment(stub):
    r = requests.post(f"{stub.base_url}/openai/deployments/fail-500/chat/completions?api-version=2024-06-01",
                      headers={"api-key": "x"}, json={"model": "ignored", "messages": []}, timeout=5)
    assert r.status_code == 500


# ---------------------------------------------------------------- auth and routing


def test_missing_auth_is_401_and_recorded(fresh):
    r = requests.post(f"{fresh.openai_base_url}/chat/completions", json={"model": "m", "messages": []}, timeout=5)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json"
    assert "error" in r.json()
    r = requests.post(f"{fresh.base_url}/v1/messages", json={"model": "m", "messages": []}, timeout=5)
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    assert [rq.path for rq in fresh.requests] == ["/v1/chat/completions", "/v1/messages"]


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer a"}, {"api-key": "b"}, {"x-api-key": "c"}])
def test_each_auth_header_accepted(fresh, headers):
    r = requests.post(f"{fresh.openai_base_url}/chat/completions", headers=headers,
                      json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, timeout=5)
    assert r.status_code == 200
    (name, value), = headers.items()
    assert fresh.requests[-1].headers[name.lower()] == value


def test_unknown_route_404(stub):
    assert requests.post(f"{stub.base_url}/v1/nope", headers=AUTH, json={}, timeout=5).status_code == 404
    r = requests.get(f"{stub.openai_base_url}/chat/completions", headers=AUTH, timeout=5)
    assert r.status_code == 404 and "error" in r.json()


# ---------------------------------------------------------------- scripted failures


@pytest.mark.parametrize("model,status,etype", [
    ("fail-500", 500, "server_error"), ("fail-429", 429, "rate_limit_error"), ("fail-400", 400, "invalid_request_error"),
])
def test_fail_models_openai(stub, model, status, etype):
    r = _chat(stub, model)
    assert r.status_code == status
    assert r.json()["error"]["type"] == etype
    if status == 429:
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize("model,status,etype", [
    ("fail-500", 500, "api_error"), ("fail-429", 429, "rate_limit_error"), ("fail-400", 400, "invalid_request_error"),
])
def test_fail_models_anthropic(stub, model, status, etype):
    r = _anthropic(stub, model)
    assert r.status_code == status
    assert r.json() == {"type": "error", "error": {"type": etype, "message": r.json()["error"]["message"]}}


def test_fail_models_through_sdks(oai, claude):
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="fail-500", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="fail-429", messages=MESSAGES)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="fail-400", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_slow(stub):
    t0 = time.monotonic()
    r = _chat(stub, "slow-0.3")
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.3
    assert r.json()["model"] == "slow-0.3"


def test_malformed(stub):
    r = _chat(stub, "malformed")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == b'{"this is": not json'
    with pytest.raises(ValueError):
        r.json()


def test_truncated_stream_openai(stub, oai):
    r = _chat(stub, "truncated", stream=True)
    assert r.status_code == 200
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in r.iter_lines():
            received.append(line)
    events = [json.loads(item[6:]) for item in received if item.startswith(b"data: ")]
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["", "stub ", "reply: "]

    stream = oai.chat.completions.create(model="truncated", messages=MESSAGES, stream=True)
    partial = []
    with pytest.raises(openai.APIError):  # httpx's RemoteProtocolError surfaces through the SDK
        for chunk in stream:
            partial.append(chunk)
    assert len(partial) == 3 and all(c.choices[0].finish_reason is None for c in partial)


def test_truncated_stream_anthropic(stub):
    r = _anthropic(stub, "truncated", stream=True)
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in r.iter_lines():
            received.append(line)
    names = [item[7:].decode() for item in received if item.startswith(b"event: ")]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta"]


def test_truncated_non_stream(stub):
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # requests' name for IncompleteRead
        _chat(stub, "truncated")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _anthropic(stub, "truncated")


def test_refuse(fresh):
    with pytest.raises(requests.exceptions.ConnectionError):
        _chat(fresh, "refuse")
    with pytest.raises(requests.exceptions.ConnectionError):
        _anthropic(fresh, "refuse")
    assert [r.body["model"] for r in fresh.requests] == ["refuse", "refuse"]  # still recorded
    assert _chat(fresh, "m").status_code == 200  # server unharmed


def test_drip_stream_spreads_chunks(stub):
    t0 = time.monotonic()
    r = _chat(stub, "drip-0.5", stream=True, stream_options={"include_usage": True})
    arrivals = []
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            arrivals.append((time.monotonic() - t0, json.loads(line[6:])))
    content = [p for _, p in arrivals if p["choices"] and p["choices"][0]["delta"].get("content")]
    # "stub reply: hi there" padded with "tick" to 10 words
    assert len(content) == 10
    assert "".join(p["choices"][0]["delta"]["content"] for p in content) == "stub reply: hi there tick tick tick tick tick tick"
    assert arrivals[0][0] < 0.25  # role chunk comes at once
    assert arrivals[-1][0] >= 0.45
    assert arrivals[-1][1]["usage"]["completion_tokens"] == 10


def test_drip_concurrent_streams(stub):
    results = []

    def one():
        r = _chat(stub, "drip-0.5", stream=True)
        results.append(r.text.endswith("data: [DONE]\n\n"))

    t0 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20
    assert time.monotonic() - t0 < 2.0  # served concurrently, not one after another


def test_drip_non_stream_sleeps_then_answers(stub):
    t0 = time.monotonic()
    r = _anthropic(stub, "drip-0.3")
    assert time.monotonic() - t0 >= 0.3
    assert r.json()["usage"]["output_tokens"] == 10


def test_anthropic_slow_and_stream(claude):
    with claude.messages.stream(model="slow-0.1", max_tokens=100,
                                messages=[{"role": "user", "content": "one two"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "stub reply: one two"
    assert final.usage.output_tokens == 4


def test_stop_and_restart_on_same_port():
    s = StubProvider().start()
    port = s.port
    assert _chat(s, "m").status_code == 200
    s.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        _chat(s, "m", timeout=1)
    with StubProvider(port=port) as s2:
        assert _chat(s2, "m").status_code == 200
