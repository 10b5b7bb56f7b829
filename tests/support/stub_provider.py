"""A real HTTP upstream provider on loopback that speaks the OpenAI and Anthropic wire formats.

Pure standard library: no Django imports. The test suite uses it as the upstream behind the
relay, and the benchmark (bench/relay) runs it standalone::

    python -m tests.support.stub_provider --port 9100

Endpoints
    POST /v1/chat/completions                               OpenAI chat (JSON or SSE)
    POST /v1/embeddings                                     OpenAI embeddings
    POST /v1/messages                                       Anthropic Messages (JSON or SSE)
    POST /openai/deployments/<dep>/chat/completions         Azure OpenAI chat (needs ?api-version=)
    POST /openai/deployments/<dep>/embeddings               Azure OpenAI embeddings (needs ?api-version=)
    anything else                                           404 JSON

Auth: any one of ``Authorization: Bearer <x>``, ``api-key: <x>`` or ``x-api-key: <x>``; none -> 401.
Every request, including rejected ones, is recorded in ``StubProvider.requests``.

Answers are deterministic:
    P     = whitespace-separated words across all message texts (plus Anthropic's ``system``)
    REPLY = "stub reply: " + the first 8 words of the last user message
    C     = words in REPLY; if max_tokens / max_completion_tokens < C the reply is cut to that
            many words and finish_reason is "length" (Anthropic: stop_reason "max_tokens").

Behaviour scripted by the model name (for Azure, the deployment name), on every endpoint:
    fail-500, fail-429 (Retry-After: 1), fail-400   error JSON in the endpoint's dialect
    fail-400-echo-key   400 whose message repeats the API key it was sent (and its last 6 characters)
    slow-<s>        sleep <s> seconds, then answer normally
    malformed       200 with the body ``{"this is": not json``
    truncated       stream: role chunk + two content chunks, then the connection is closed;
                    non-stream: Content-Length larger than the body, then closed
    drip-<s>        stream the reply (padded with "tick" to at least 10 words) evenly over <s>
                    seconds; non-stream: sleep <s>, then answer (same padded reply)
    refuse          read the request, then close the connection without any response
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

__all__ = ["RecordedRequest", "StubProvider", "count_words", "main"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

MALFORMED_BODY = b'{"this is": not json'
MIN_DRIP_WORDS = 10
REPLY_PREFIX = "stub reply:"
REPLY_WORDS_FROM_USER = 8

_AZURE_RE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")
_DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)

_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)  # lower-case keys
    body: dict | None = None


# ---------------------------------------------------------------- deterministic content rules


def count_words(text: str) -> int:
    return len(text.split())


def _text_of(content) -> str:
    """Text of a message content: a string, or a list of parts/blocks carrying "text"."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return " ".join(out)
    return ""


def _prompt_and_reply(messages, system=None) -> tuple[int, str]:
    """Return (P, untruncated REPLY)."""
    prompt_tokens = count_words(_text_of(system)) if system is not None else 0
    last_user = ""
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            text = _text_of(msg.get("content"))
            prompt_tokens += count_words(text)
            if msg.get("role") == "user":
                last_user = text
    words = last_user.split()[:REPLY_WORDS_FROM_USER]
    reply = " ".join([REPLY_PREFIX, *words])
    return prompt_tokens, reply


def _plan_reply(body: dict, model: str, system=None) -> tuple[int, list[str], bool]:
    """Return (P, REPLY words, truncated?) after drip padding and max_tokens truncation."""
    prompt_tokens, reply = _prompt_and_reply(body.get("messages"), system)
    words = reply.split()
    if _drip_seconds(model) is not None and len(words) < MIN_DRIP_WORDS:
        words += ["tick"] * (MIN_DRIP_WORDS - len(words))
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    truncated = False
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(words):
        words = words[:limit]
        truncated = True
    return prompt_tokens, words, truncated


def _seconds_after(model: str, prefix: str) -> float | None:
    if not model.startswith(prefix):
        return None
    try:
        value = float(model[len(prefix):])
    except ValueError:
        return None
    return value if value >= 0 else None


def _slow_seconds(model: str) -> float | None:
    return _seconds_after(model, "slow-")


def _drip_seconds(model: str) -> float | None:
    return _seconds_after(model, "drip-")


def _embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    # 8 floats in [-1, 1), 4 bytes of the digest each.
    return [round(int.from_bytes(digest[i:i + 4], "big") / 2**31 - 1.0, 6) for i in range(0, 32, 4)]


def _embedding_inputs(raw) -> list[tuple[str, int]]:
    """(text used for the vector, word/token count) per input item."""
    if isinstance(raw, str):
        return [(raw, count_words(raw))]
    if isinstance(raw, list):
        if raw and all(isinstance(x, int) for x in raw):  # one tokenised input
            return [(" ".join(map(str, raw)), len(raw))]
        items = []
        for item in raw:
            if isinstance(item, str):
                items.append((item, count_words(item)))
            elif isinstance(item, list):
                items.append((" ".join(map(str, item)), len(item)))
        return items
    return []


# ---------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address, handler, stub: "StubProvider"):
        self.stub = stub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = super().get_request()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (*_DISCONNECT_ERRORS, OSError)):
            return  # clients going away (and our own abrupt closes) are expected here
        super().handle_error(request, client_address)


class _Abort(Exception):
    """Stop handling this request and drop the connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tollgate-stub/1"
    sys_version = ""
    server: _Server

    # ---- quiet
    def log_message(self, format, *args):  # noqa: A002 - signature from the stdlib
        pass

    def log_request(self, code="-", size="-"):
        pass

    # ---- methods
    def do_POST(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def _dispatch(self):
        try:
            self._route()
        except _Abort:
            self._drop()
        except _DISCONNECT_ERRORS:
            self.close_connection = True

    # ---- request side
    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = 0
            return self.rfile.read(n) if n > 0 else b""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        return b""

    def _route(self):
        stub = self.server.stub
        path, _, qs = self.path.partition("?")
        query = dict(parse_qsl(qs, keep_blank_values=True)) if qs else {}
        raw = self._read_body()
        body = None
        bad_json = False
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                bad_json = True
            else:
                body = parsed if isinstance(parsed, dict) else None
                bad_json = body is None
        headers = {k.lower(): v for k, v in self.headers.items()}
        if stub.record:
            stub._record(RecordedRequest(self.command, path, query, headers, body))

        azure = _AZURE_RE.match(path) if path.startswith("/openai/") else None
        if self.command != "POST" or not (
            azure or path in ("/v1/chat/completions", "/v1/embeddings", "/v1/messages")
        ):
            anthropic = path.startswith("/v1/messages")
            return self._error(404, f"no route for {self.command} {path}", anthropic)
        anthropic = path == "/v1/messages"

        auth = headers.get("authorization", "")
        has_bearer = auth[:7].lower() == "bearer " and auth[7:].strip() != ""
        if not (has_bearer or headers.get("api-key") or headers.get("x-api-key")):
            return self._error(401, "missing API key (Authorization: Bearer, api-key or x-api-key)", anthropic)

        if azure and not query.get("api-version"):
            return self._error(400, "missing required query parameter 'api-version'", False)
        if bad_json or body is None:
            return self._error(400, "request body must be a JSON object", anthropic)

        if azure:
            model = azure.group(1)
            kind = "chat" if azure.group(2) == "chat/completions" else "embeddings"
        else:
            model = body.get("model")
            kind = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}.get(path, "messages")
        if not isinstance(model, str) or not model:
            return self._error(400, "'model' is required", anthropic)

        stream = body.get("stream") is True and kind != "embeddings"

        # ---- scripted behaviours
        if model.startswith("fail-"):
            if model == "fail-500":
                return self._error(500, "stub failure", anthropic)
            if model == "fail-429":
                return self._error(429, "stub rate limit", anthropic, extra=(("Retry-After", "1"),))
            if model == "fail-400":
                return self._error(400, "stub invalid request", anthropic)
            if model == "fail-400-echo-key":  # as some providers do: the key it was sent, in the message
                sent = headers.get("api-key") or headers.get("x-api-key") or auth[7:]
                return self._error(400, f"invalid request for key {sent} (ends in {sent[-6:]})", anthropic)
        elif model == "refuse":
            raise _Abort
        elif model == "malformed":
            return self._send(200, MALFORMED_BODY)
        else:
            delay = _slow_seconds(model)
            if delay is None and not stream:
                delay = _drip_seconds(model)
            if delay:
                time.sleep(delay)

        truncated = model == "truncated"
        if kind == "embeddings":
            payload = self._embeddings(body, model)
        elif kind == "chat":
            n = next(stub._ids)
            prompt, words, cut = _plan_reply(body, model)
            if stream:
                return self._stream_openai(body, model, n, prompt, words, cut, truncated)
            payload = _openai_completion(n, model, prompt, words, cut)
        else:
            n = next(stub._ids)
            prompt, words, cut = _plan_reply(body, model, body.get("system"))
            if stream:
                return self._stream_anthropic(model, n, prompt, words, cut, truncated)
            payload = _anthropic_message(n, model, prompt, words, cut)

        data = _dumps(payload).encode("utf-8")
        if truncated:
            head = self._head(200, "application/json", len(data) + 64)
            self.wfile.write(head + data[: len(data) // 2])
            raise _Abort
        return self._send(200, data)

    # ---- response side
    def _head(self, status: int, content_type: str, length: int | None, extra=()) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Date: {_http_date()}",
            f"Server: {self.server_version}",
        ]
        if length is None:
            if self.request_version == "HTTP/1.0":
                self.close_connection = True
            else:
                lines.append("Transfer-Encoding: chunked")
            lines.append("Cache-Control: no-cache")
        else:
            lines.append(f"Content-Length: {length}")
        lines.extend(f"{k}: {v}" for k, v in extra)
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status: int, data: bytes, extra=()):
        self.wfile.write(self._head(status, "application/json", len(data), extra) + data)

    def _error(self, status: int, message: str, anthropic: bool, extra=()):
        if anthropic:
            payload = {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES[status], "message": message}}
        else:
            payload = {
                "error": {
                    "message": message,
                    "type": _OPENAI_ERROR_TYPES[status],
                    "param": None,
                    "code": {401: "invalid_api_key", 404: "not_found"}.get(status),
                }
            }
        self._send(status, _dumps(payload).encode("utf-8"), extra)

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _start_stream(self):
        self._chunked = self.request_version != "HTTP/1.0"
        self.wfile.write(self._head(200, "text/event-stream; charset=utf-8", None))

    def _event(self, data: bytes):
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)  # the socket writer is unbuffered: this is the flush

    def _end_stream(self):
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _pace(self, model: str, words: list[str]):
        """Per-word sleep for drip-<s> models (None otherwise)."""
        total = _drip_seconds(model)
        if total and words:
            return total / len(words)
        return None

    def _stream_openai(self, body, model, n, prompt, words, cut, truncated):
        created = int(time.time())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": f"chatcmpl-stub-{n}", "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta, finish=None) -> bytes:
            obj = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
            if include_usage:
                obj["usage"] = None
            return b"data: " + _dumps(obj).encode("utf-8") + b"\n\n"

        self._start_stream()
        self._event(chunk({"role": "assistant", "content": ""}))
        pace = self._pace(model, words)
        last = len(words) - 1
        for i, word in enumerate(words):
            if truncated and i == 2:
                raise _Abort
            if pace:
                time.sleep(pace)
            self._event(chunk({"content": word if i == last else word + " "}))
        if truncated:
            raise _Abort
        self._event(chunk({}, "length" if cut else "stop"))
        if include_usage:
            obj = dict(base, choices=[], usage=_openai_usage(prompt, len(words)))
            self._event(b"data: " + _dumps(obj).encode("utf-8") + b"\n\n")
        self._event(b"data: [DONE]\n\n")
        self._end_stream()

    def _stream_anthropic(self, model, n, prompt, words, cut, truncated):
        def event(name: str, obj: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _dumps(obj).encode("utf-8") + b"\n\n"

        message = {
            "id": f"msg_stub_{n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _anthropic_usage(prompt, 1),
        }
        self._start_stream()
        self._event(event("message_start", {"type": "message_start", "message": message}))
        self._event(event("content_block_start", {
            "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""},
        }))
        self._event(event("ping", {"type": "ping"}))
        pace = self._pace(model, words)
        last = len(words) - 1
        for i, word in enumerate(words):
            if truncated and i == 2:
                raise _Abort
            if pace:
                time.sleep(pace)
            self._event(event("content_block_delta", {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": word if i == last else word + " "},
            }))
        if truncated:
            raise _Abort
        self._event(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        self._event(event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens" if cut else "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": len(words)},
        }))
        self._event(event("message_stop", {"type": "message_stop"}))
        self._end_stream()

    def _embeddings(self, body: dict, model: str) -> dict:
        items = _embedding_inputs(body.get("input"))
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, (text, _) in enumerate(items):
            vector = _embedding_of(text)
            if as_base64:
                vector = base64.b64encode(struct.pack("<8f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": vector})
        prompt = sum(count for _, count in items)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def _openai_usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _anthropic_usage(prompt: int, output: int) -> dict:
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


def _openai_completion(n: int, model: str, prompt: int, words: list[str], cut: bool) -> dict:
    return {
        "id": f"chatcmpl-stub-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": " ".join(words)},
            "finish_reason": "length" if cut else "stop",
        }],
        "usage": _openai_usage(prompt, len(words)),
    }


def _anthropic_message(n: int, model: str, prompt: int, words: list[str], cut: bool) -> dict:
    return {
        "id": f"msg_stub_{n}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": " ".join(words)}],
        "stop_reason": "max_tokens" if cut else "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(prompt, len(words)),
    }


_date_cache = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = formatdate(now, usegmt=True)
        _date_cache[0] = now
    return _date_cache[1]


# ---------------------------------------------------------------- public API


class StubProvider:
    """A loopback upstream. ``with StubProvider() as stub: ...`` or ``stub = StubProvider().start()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True):
        self.host = host
        self.port = port
        self.record = record
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "StubProvider":
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"stub-provider:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "StubProvider":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback OpenAI/Anthropic-compatible stub provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--record", action="store_true",
                        help="keep every request in memory (off by default: it grows without bound)")
    args = parser.parse_args(argv)
    stub = StubProvider(args.host, args.port, record=args.record).start()
    print(stub.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
