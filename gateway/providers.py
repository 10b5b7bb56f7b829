"""Provider adapters: how one request reaches one provider model, in that provider's wire format.

OpenAI-compatible (OpenAI, vLLM, Ollama, any base URL), Azure OpenAI (deployments + api-version),
Anthropic, and the built-in mock. HTTP goes through one pooled `requests` session per process with
connect and read timeouts from the provider. Failures become UpstreamFailure with a code the relay
returns as is; no message ever carries the provider's key.
"""
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from gateway.catalog import Target
from gateway.models import Provider
from gateway.translate import parse_sse
from governance.logging import scrub

WIRE_OPENAI = "openai"
WIRE_ANTHROPIC = "anthropic"
ANTHROPIC_VERSION = "2023-06-01"


def wire_format(provider: Provider) -> str:
    return WIRE_ANTHROPIC if provider.kind == Provider.Kind.ANTHROPIC else WIRE_OPENAI


class UpstreamFailure(Exception):
    """`retryable` failures (429, 5xx, timeouts, refused connections) move on to the next deployment."""

    def __init__(self, code: str, message: str, *, retryable: bool):
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


@dataclass
class UpstreamStream:
    """Parsed SSE events (event name or None, data) in the provider's wire format."""

    events: Iterator[tuple[str | None, str]]
    close: callable


_session_lock = threading.Lock()
_shared_session: requests.Session | None = None


def _session() -> requests.Session:
    """One pooled session per process, shared by its threads: connections to a provider are kept at about
    the number of calls in flight (urllib3's pools are thread-safe; we never touch cookies or auth state)."""
    global _shared_session
    if _shared_session is None:
        with _session_lock:
            if _shared_session is None:
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=32, pool_maxsize=128, max_retries=0)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                session.trust_env = False
                _shared_session = session
    return _shared_session


def _endpoint(provider: Provider, model_name: str, endpoint: str) -> tuple[str, dict, dict]:
    base = provider.base_url.rstrip("/")
    if provider.kind == Provider.Kind.ANTHROPIC:
        return f"{base}/v1/messages", {"x-api-key": provider.api_key, "anthropic-version": ANTHROPIC_VERSION}, {}
    path = "chat/completions" if endpoint == "chat" else "embeddings"
    if provider.kind == Provider.Kind.AZURE_OPENAI:
        return f"{base}/openai/deployments/{model_name}/{path}", {"api-key": provider.api_key}, {"api-version": provider.api_version}
    return f"{base}/{path}", {"Authorization": f"Bearer {provider.api_key}"}, {}


def _upstream_message(response: requests.Response, provider: Provider) -> str:
    try:
        error = response.json().get("error", {})
        message = error.get("message") if isinstance(error, dict) else str(error)
    except ValueError:
        message = None
    # Providers sometimes echo their key, or part of it, in their messages: never pass one on (to the client,
    # the ledger or a log), by its value, not only by what keys usually look like.
    return scrub_upstream(message or response.reason or "no detail", provider)[:300]


def scrub_upstream(text: str, provider: Provider) -> str:
    """An upstream's words, safe to show: without the provider's own secrets (governance.logging.scrub)."""
    return scrub(str(text), provider.api_key, getattr(provider, "admin_key", "") or "")


def _raise_for_status(response: requests.Response, provider: Provider) -> None:
    status = response.status_code
    if status < 400:
        return
    if status == 429 or status >= 500:
        raise UpstreamFailure("upstream_error", f"{provider.name} answered {status}", retryable=True)
    if status in (401, 403):
        raise UpstreamFailure("upstream_error", f"{provider.name} refused Tollgate's credentials ({status})", retryable=False)
    raise UpstreamFailure("upstream_rejected", f"{provider.name} rejected the request: {_upstream_message(response, provider)}",
                          retryable=False)


def send(target: Target, payload: dict, *, endpoint: str, stream: bool) -> dict | UpstreamStream:
    """POST the payload (already in the provider's wire format) and return the parsed body or the event stream."""
    provider = target.provider
    if provider.kind == Provider.Kind.MOCK:
        return mock_send(target, payload, endpoint=endpoint, stream=stream)
    url, headers, params = _endpoint(provider, target.provider_model.name, endpoint)
    try:
        response = _session().post(
            url, params=params, json=payload, headers=headers, stream=stream,
            timeout=(provider.connect_timeout, provider.read_timeout),
        )
    except requests.Timeout as exc:
        raise UpstreamFailure("upstream_timeout", f"{provider.name} did not answer in time", retryable=True) from exc
    except requests.RequestException as exc:
        raise UpstreamFailure("upstream_error", f"could not reach {provider.name} ({type(exc).__name__})", retryable=True) from exc
    try:
        _raise_for_status(response, provider)
    except UpstreamFailure:
        response.close()
        raise
    if stream:
        return UpstreamStream(events=_events(response, provider), close=response.close)
    try:
        body = response.json()
    except ValueError as exc:
        raise UpstreamFailure("upstream_error", f"{provider.name} sent a response that is not JSON", retryable=False) from exc
    if not isinstance(body, dict):
        raise UpstreamFailure("upstream_error", f"{provider.name} sent an unexpected response", retryable=False)
    return body


def _events(response: requests.Response, provider: Provider) -> Iterator[tuple[str | None, str]]:
    try:
        yield from parse_sse(response.iter_lines())
    except requests.Timeout as exc:
        raise UpstreamFailure("upstream_timeout", f"{provider.name} stalled mid-stream", retryable=False) from exc
    except requests.RequestException as exc:
        raise UpstreamFailure("upstream_error", f"{provider.name} broke the stream ({type(exc).__name__})", retryable=False) from exc


# --- The built-in mock: deterministic, real usage numbers, OpenAI wire format --------------------------

def _words(value) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for part in value if isinstance(part, dict) for w in str(part.get("text", "")).split()]
    return []


def mock_reply(payload: dict) -> tuple[str, int, int, str]:
    """(reply, prompt tokens, completion tokens, finish reason): one token per whitespace-separated word."""
    messages = payload.get("messages") or []
    prompt_tokens = sum(len(_words(m.get("content"))) for m in messages if isinstance(m, dict))
    last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    words = ["mock", "reply:", *_words(last_user.get("content"))[:8]]
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    finish = "stop"
    if limit and len(words) > limit:
        words, finish = words[:limit], "length"
    return " ".join(words), prompt_tokens, len(words), finish


def _mock_vector(item) -> list[float]:
    """The same vector for the same input in every process and run (hash() is salted per process)."""
    digest = hashlib.sha256(json.dumps(item, ensure_ascii=False).encode("utf-8", "replace")).digest()
    return [byte / 255 for byte in digest[:8]]


def mock_send(target: Target, payload: dict, *, endpoint: str, stream: bool) -> dict | UpstreamStream:
    model, created = target.provider_model.name, int(time.time())
    if endpoint == "embeddings":
        inputs = payload.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]  # one text, or one text as token ids
        inputs = list(inputs or [])
        data = [{"object": "embedding", "index": i, "embedding": _mock_vector(item)} for i, item in enumerate(inputs)]
        tokens = sum(len(item) if isinstance(item, list) else len(str(item).split()) for item in inputs)
        return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    reply, prompt_tokens, completion_tokens, finish = mock_reply(payload)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}
    base = {"id": f"chatcmpl-mock-{created}", "created": created, "model": model}
    if not stream:
        return {**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish}]}

    def chunk(delta, finish_reason=None):
        return json.dumps({**base, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    def events():
        yield None, chunk({"role": "assistant", "content": ""})
        words = reply.split(" ")
        for i, word in enumerate(words):
            yield None, chunk({"content": word + (" " if i < len(words) - 1 else "")})
        yield None, chunk({}, finish)
        yield None, json.dumps({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield None, "[DONE]"

    return UpstreamStream(events=events(), close=lambda: None)
