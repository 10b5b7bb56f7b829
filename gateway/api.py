"""The relay's HTTP surface: OpenAI- and Anthropic-compatible endpoints. Parsing and responses only;
everything else is gateway.relay."""
import contextlib
import json

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.views import APIView

from gateway import relay
from gateway.errors import RelayError
from governance.context import client_ip


def _response(result: relay.RelayResult) -> HttpResponse:
    if result.stream is not None:
        response = StreamingHttpResponse(result.stream, status=result.status, content_type="text/event-stream")
    else:
        response = HttpResponse(_json_bytes(result.body), status=result.status, content_type="application/json")
    for name, value in result.headers.items():
        response[name] = value
    return response


def _json_bytes(body) -> bytes:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (in a model name the client sent, say): escaped, valid JSON
        return json.dumps(body, separators=(",", ":")).encode()


class RelayView(APIView):
    """Hands the raw call to the relay and returns what it says."""

    endpoint = ""
    authentication_classes = ()
    permission_classes = ()

    def relay(self, request, body: bytes = b"", content_length: int = 0) -> HttpResponse:
        return _response(relay.handle(_call(request._request, self.endpoint, body, content_length)))

    def http_method_not_allowed(self, request, *args, **kwargs):
        error = RelayError("method_not_allowed", f"{request.method} is not allowed on this endpoint")
        return _response(relay.refuse_unrouted(_call(request, self.endpoint), error))


def _call(raw, endpoint: str, body: bytes = b"", content_length: int = 0) -> relay.RelayCall:
    return relay.RelayCall(endpoint=endpoint, headers=raw.headers, body=body, content_length=content_length,
                           client_ip=client_ip(raw.META), request_id=raw.request_id)


class InferenceView(RelayView):
    def post(self, request):
        raw = request._request
        try:
            content_length = int(raw.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            content_length = 0
        # A body over the limit is never read; the relay refuses it (request_too_large) with a ledger entry.
        if content_length > settings.TOLLGATE_MAX_BODY_BYTES:
            return self.relay(request, b"", content_length)
        try:
            body = _read_body(raw)
        except _BodyTimeout:
            error = RelayError("request_timeout", f"the request body did not arrive within "
                               f"{settings.TOLLGATE_BODY_READ_SECONDS:g}s")
            return _response(relay.refuse_unrouted(_call(raw, self.endpoint), error))
        except Exception:  # the client closed before sending all it announced, or sent broken chunks
            error = RelayError("invalid_request", "the request body ended before its announced length")
            return _response(relay.refuse_unrouted(_call(raw, self.endpoint), error))
        return self.relay(request, body, max(content_length, len(body)))


class _BodyTimeout(Exception):
    pass


def _read_body(raw) -> bytes:
    """The body, read within TOLLGATE_BODY_READ_SECONDS (a client that announces more than it sends must not
    hold a worker's call slot for ever). A chunked body (no Content-Length) is read from the server's
    decoded stream, which Django would read as empty, up to one byte over the limit."""
    with _deadline(settings.TOLLGATE_BODY_READ_SECONDS):
        if "chunked" in raw.META.get("HTTP_TRANSFER_ENCODING", "").lower() and not raw.META.get("CONTENT_LENGTH"):
            return raw.META["wsgi.input"].read(settings.TOLLGATE_MAX_BODY_BYTES + 1)
        return raw.body


def _deadline(seconds: float):
    """gevent workers (production): a timeout around the read. Threaded servers (the SQLite default, tests)
    read under the server's own socket timeout."""
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return contextlib.nullcontext()
    if not monkey.is_module_patched("socket"):
        return contextlib.nullcontext()
    return Timeout(seconds, _BodyTimeout)


class ChatCompletionsView(InferenceView):
    endpoint = relay.CHAT


class MessagesView(InferenceView):
    endpoint = relay.MESSAGES


class EmbeddingsView(InferenceView):
    endpoint = relay.EMBEDDINGS


class ModelsView(RelayView):
    endpoint = relay.MODELS

    def get(self, request):
        return self.relay(request)


@csrf_exempt
def not_found(request, rest: str = ""):
    """Unknown /v1 paths get the same JSON error shape as every refusal, never an HTML page."""
    error = RelayError("not_found", f"no such endpoint: {request.method} /v1/{rest}")
    return _response(relay.refuse_unrouted(_call(request, ""), error))
