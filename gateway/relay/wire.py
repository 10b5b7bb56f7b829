"""Wire formats on the relay: the request in the provider's format, the response and the streamed events in
the client's, with usage tracked as events pass."""
import json
from collections.abc import Iterator

from gateway import providers, translate
from gateway.catalog import Target
from gateway.errors import RelayError
from gateway.relay.checks import estimate_input_tokens


def upstream_payload(payload: dict, target: Target, client_format: str, stream: bool) -> dict:
    wire = providers.wire_format(target.provider)
    try:
        if client_format == wire:
            body = dict(payload)
        elif wire == providers.WIRE_ANTHROPIC:
            body = translate.openai_request_to_anthropic(payload, default_max_tokens=target.provider_model.max_output_tokens)
        else:
            body = translate.anthropic_request_to_openai(payload)
    except translate.UnsupportedParameter as exc:
        raise RelayError("unsupported_parameter", f"{target.provider.name} cannot take this request: {exc}") from None
    except translate.TranslationError as exc:
        raise RelayError("invalid_request", f"{target.provider.name} cannot take this request: {exc}") from None
    body["model"] = target.provider_model.name
    if stream and wire == providers.WIRE_OPENAI:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


def client_response(body: dict, target: Target, client_format: str) -> tuple[dict, translate.Usage]:
    wire = providers.wire_format(target.provider)
    usage = translate.usage_from_anthropic(body.get("usage")) if wire == providers.WIRE_ANTHROPIC else translate.usage_from_openai(body.get("usage"))
    if client_format == wire:
        return body, usage
    if client_format == providers.WIRE_OPENAI:
        return translate.anthropic_response_to_openai(body, model=target.provider_model.name), usage
    return translate.openai_response_to_anthropic(body, model=target.provider_model.name), usage



class StreamConverter:
    """Turns the provider's SSE events into the client's, tracking usage and text as they pass."""

    def __init__(self, payload: dict, target: Target, client_format: str, request_id: str):
        self.wire = providers.wire_format(target.provider)
        self.client_format = client_format
        self.client_wants_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        self.estimated_input = estimate_input_tokens(payload)
        self.done = False
        self.text: list[str] = []
        self.reported: translate.Usage | None = None
        model = target.provider_model.name
        if client_format == providers.WIRE_OPENAI and self.wire == providers.WIRE_ANTHROPIC:
            self.translator = translate.AnthropicStreamToOpenAI(model=model, include_usage=self.client_wants_usage, request_id=request_id)
        elif client_format == providers.WIRE_ANTHROPIC and self.wire == providers.WIRE_OPENAI:
            self.translator = translate.OpenAIStreamToAnthropic(model=model, request_id=request_id,
                                                                input_tokens=self.estimated_input)
        else:
            self.translator = None
            self.passthrough_usage = translate.Usage()

    def feed(self, event: str | None, data: str) -> Iterator[bytes]:
        if self.wire == providers.WIRE_OPENAI:
            if data.strip() == "[DONE]":
                self.done = True
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise providers.UpstreamFailure("upstream_error", "the provider sent an error mid-stream", retryable=False)
            for choice in chunk.get("choices") or []:
                self.text.append((choice.get("delta") or {}).get("content") or "")
            if chunk.get("usage"):
                self.reported = translate.usage_from_openai(chunk["usage"])
            if self.translator is not None:
                for name, out in self.translator.feed(chunk):
                    yield translate.sse_anthropic(name, out)
            elif chunk.get("choices") or self.client_wants_usage:
                yield b"data: " + data.encode() + b"\n\n"
            return
        # Anthropic wire
        message = json.loads(data)
        event = event or message.get("type")
        if event == "error":
            raise providers.UpstreamFailure("upstream_error", "the provider sent an error mid-stream", retryable=False)
        if event == "content_block_delta":
            self.text.append((message.get("delta") or {}).get("text") or "")
        if event == "message_stop":
            self.done = True
            if self.translator is None:
                return  # held back: finish() sends it once the call is recorded
        if self.translator is not None:
            for out in self.translator.feed(event, message):
                yield translate.sse_openai(out)
            self.reported = self.translator.usage
        else:
            if event == "message_start":
                self.passthrough_usage = translate.usage_from_anthropic((message.get("message") or {}).get("usage"))
            elif event == "message_delta" and message.get("usage"):
                self.passthrough_usage.output_tokens = message["usage"].get("output_tokens", 0)
            self.reported = self.passthrough_usage
            yield translate.sse_anthropic(event, message)

    def finish(self) -> Iterator[bytes]:
        if self.translator is not None:
            for out in self.translator.finish():
                yield translate.sse_anthropic(*out) if self.client_format == providers.WIRE_ANTHROPIC else translate.sse_openai(out)
        elif self.client_format == providers.WIRE_ANTHROPIC:
            yield translate.sse_anthropic("message_stop", {"type": "message_stop"})
        if self.client_format == providers.WIRE_OPENAI:
            yield translate.SSE_OPENAI_DONE

    def usage(self) -> translate.Usage:
        """What the provider reported, or, when the stream was cut before it did, an estimate of what was used."""
        reported = self.reported
        if reported is not None and (reported.output_tokens or self.done):
            return translate.Usage(reported.input_tokens or self.estimated_input, reported.output_tokens, reported.cached_tokens,
                                   reported.cache_write_tokens)
        streamed = "".join(self.text)
        return translate.Usage(
            input_tokens=(reported.input_tokens if reported and reported.input_tokens else self.estimated_input),
            output_tokens=(len(streamed) + 3) // 4,
        )

    def error(self, error: RelayError) -> bytes:
        if self.client_format == providers.WIRE_ANTHROPIC:
            return translate.sse_anthropic("error", error.body(anthropic=True))
        return translate.sse_openai(error.body())

