"""Pure translation between the OpenAI Chat Completions and Anthropic Messages wire formats."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SSE_OPENAI_DONE",
    "AnthropicStreamToOpenAI",
    "OpenAIStreamToAnthropic",
    "TranslationError",
    "UpstreamStreamError",
    "Usage",
    "anthropic_request_to_openai",
    "anthropic_response_to_openai",
    "openai_request_to_anthropic",
    "openai_response_to_anthropic",
    "parse_sse",
    "sse_anthropic",
    "sse_openai",
    "usage_from_anthropic",
    "usage_from_openai",
]


class TranslationError(ValueError):
    """The request uses something the other format cannot express; the relay should answer 400."""


class UnsupportedParameter(TranslationError):
    """A request field the other format has no equivalent for, which would change the answer: 400 naming it."""

    def __init__(self, param: str, why: str):
        super().__init__(f"'{param}' {why}")
        self.param = param


# Request fields with no equivalent on the other side, and what the relay does with each (README: "Calling
# a model in the other format"). Refused: they would change what the answer holds or how it is shaped.
# Ignored: they only tune sampling, caching or bookkeeping, and the answer keeps the shape the client asked.
OPENAI_TO_ANTHROPIC_REFUSED = {
    "logprobs": "has no equivalent on Anthropic models (no token log-probabilities)",
    "top_logprobs": "has no equivalent on Anthropic models (no token log-probabilities)",
    "logit_bias": "has no equivalent on Anthropic models",
    "response_format": "has no equivalent on Anthropic models (JSON modes are not enforced there)",
    "n": "must be 1 on Anthropic models (one answer a call)",
    "audio": "has no equivalent on Anthropic models",
    "modalities": "has no equivalent on Anthropic models",
}
OPENAI_TO_ANTHROPIC_IGNORED = ("seed", "presence_penalty", "frequency_penalty", "stream_options", "store",
                               "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort")
ANTHROPIC_TO_OPENAI_REFUSED = {
    "thinking": "(extended thinking) has no equivalent on OpenAI-format models",
}
ANTHROPIC_TO_OPENAI_IGNORED = ("top_k", "cache_control (on any block)", "service_tier")


def _refuse_unsupported(body: dict, refused: dict) -> None:
    for param, why in refused.items():
        value = body.get(param)
        if value is None or value is False:
            continue
        if param == "n" and value == 1:
            continue
        if param == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        if param == "thinking" and isinstance(value, dict) and value.get("type") == "disabled":
            continue
        raise UnsupportedParameter(param, why)


class UpstreamStreamError(Exception):
    """The provider reported an error in the middle of a stream."""

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type or "api_error"


@dataclass
class Usage:
    input_tokens: int = 0  # all input, cached and cache-written included
    output_tokens: int = 0
    cached_tokens: int = 0  # read from the provider's prompt cache
    cache_write_tokens: int = 0  # written to it (Anthropic bills them above the input price)


def _count(value: Any) -> int:
    # Providers send null for counters they do not track.
    return int(value or 0)


def usage_from_openai(usage: dict | None) -> Usage:
    if not usage:
        return Usage()
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        input_tokens=_count(usage.get("prompt_tokens")),
        output_tokens=_count(usage.get("completion_tokens")),
        cached_tokens=_count(details.get("cached_tokens")),
    )


def usage_from_anthropic(usage: dict | None) -> Usage:
    if not usage:
        return Usage()
    # Anthropic's input_tokens excludes cached tokens; OpenAI's prompt_tokens and our ledger include them.
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=_count(usage.get("input_tokens")) + cache_read + cache_write,
        output_tokens=_count(usage.get("output_tokens")),
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def _openai_usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _anthropic_usage(usage: Usage) -> dict:
    return {
        "input_tokens": max(usage.input_tokens - usage.cached_tokens, 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.output_tokens,
    }


# Anthropic has no "content_filter"; a filtered OpenAI answer still ended the turn.
_ANTHROPIC_STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "end_turn",
}
_OPENAI_FINISH_REASON = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _prefixed(prefix: str, value: str) -> str:
    return value if value.startswith(prefix) else prefix + value


def _tool_id(value: str | None) -> str:
    # Anthropic rejects tool ids outside [A-Za-z0-9_-]; some OpenAI-compatible servers use ids like
    # "functions.get_weather:0". Both the tool_use and its tool_result go through here, so they still match.
    return re.sub(r"[^A-Za-z0-9_-]", "_", value or "")


def _parse_arguments(arguments: Any) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        parsed = None
    # A truncated call (the model hit max_tokens mid-arguments) cannot be an Anthropic input object;
    # an empty one keeps the conversation replayable instead of failing the whole request.
    return parsed if isinstance(parsed, dict) else {}


def _openai_text(content: Any, sep: str = "\n\n") -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return sep.join(part.get("text") or part.get("refusal") or "" for part in content
                    if part.get("type") in ("text", "refusal"))


def _anthropic_text(content: Any, sep: str = "\n\n") -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return sep.join(block.get("text", "") for block in content if block.get("type") == "text")


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"data:(?P<media_type>[^;,]+)[^,]*;base64,(?P<data>.*)", re.DOTALL)


def _openai_image_to_block(part: dict) -> dict:
    image = part.get("image_url")
    url = image.get("url", "") if isinstance(image, dict) else (image or "")
    match = _DATA_URL.fullmatch(url)
    if match:
        return {"type": "image",
                "source": {"type": "base64", "media_type": match["media_type"], "data": match["data"]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _openai_content_to_blocks(content: Any) -> list[dict]:
    # Anthropic rejects empty text blocks, which OpenAI clients send freely (content: "").
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get("text") or part.get("refusal")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_openai_image_to_block(part))
        else:
            raise TranslationError(f"content part of type {kind!r} cannot be sent to an Anthropic model")
    return blocks


def _openai_tool_calls_to_blocks(tool_calls: list[dict] | None) -> list[dict]:
    blocks = []
    for call in tool_calls or []:
        if call.get("type", "function") != "function":
            raise TranslationError(f"tool call of type {call.get('type')!r} cannot be sent to an Anthropic model")
        function = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": _tool_id(call.get("id")), "name": function.get("name", ""),
                       "input": _parse_arguments(function.get("arguments"))})
    return blocks


def _openai_tool_result(message: dict) -> dict:
    content = message.get("content")
    result = {"type": "tool_result", "tool_use_id": _tool_id(message.get("tool_call_id"))}
    if isinstance(content, str) and content:
        result["content"] = content
    elif isinstance(content, list):
        text_blocks = [block for block in _openai_content_to_blocks(content) if block["type"] == "text"]
        if text_blocks:
            result["content"] = text_blocks
    return result


def _openai_tool_choice_to_anthropic(tool_choice: Any, parallel_tool_calls: bool | None) -> dict | None:
    if tool_choice is None:
        choice = {"type": "auto"} if parallel_tool_calls is False else None
    elif tool_choice == "auto":
        choice = {"type": "auto"}
    elif tool_choice == "required":
        choice = {"type": "any"}
    elif tool_choice == "none":
        return {"type": "none"}
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        choice = {"type": "tool", "name": (tool_choice.get("function") or {}).get("name", "")}
    else:
        raise TranslationError(f"tool_choice {tool_choice!r} cannot be sent to an Anthropic model")
    if choice is not None and parallel_tool_calls is False:
        choice["disable_parallel_tool_use"] = True
    return choice


def openai_request_to_anthropic(body: dict, *, default_max_tokens: int) -> dict:
    _refuse_unsupported(body, OPENAI_TO_ANTHROPIC_REFUSED)
    system_parts: list[str] = []
    messages: list[dict] = []
    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            # Anthropic has a single top-level system prompt; instructions given mid-conversation join it.
            text = _openai_text(message.get("content"))
            if text:
                system_parts.append(text)
            continue
        if role == "user":
            blocks = _openai_content_to_blocks(message.get("content"))
        elif role == "assistant":
            blocks = (_openai_content_to_blocks(message.get("content"))
                      + _openai_tool_calls_to_blocks(message.get("tool_calls")))
        elif role == "tool":
            role, blocks = "user", [_openai_tool_result(message)]
        else:
            raise TranslationError(f"message role {role!r} cannot be sent to an Anthropic model")
        if not blocks:
            continue
        # Anthropic requires user and assistant turns to alternate.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for message in messages:
        # Anthropic wants tool results at the start of the user turn that follows the tool calls.
        message["content"].sort(key=lambda block: block["type"] != "tool_result")
        if len(message["content"]) == 1 and message["content"][0]["type"] == "text":
            message["content"] = message["content"][0]["text"]

    out: dict[str, Any] = {}
    if "model" in body:
        out["model"] = body["model"]
    if system_parts:
        out["system"] = "\n\n".join(system_parts)
    out["messages"] = messages
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    # Anthropic requires max_tokens; OpenAI clients usually leave it out.
    out["max_tokens"] = max_tokens if max_tokens is not None else default_max_tokens
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}

    tools = body.get("tools")
    if tools:
        out["tools"] = []
        for tool in tools:
            if tool.get("type", "function") != "function":
                raise TranslationError(f"tool of type {tool.get('type')!r} cannot be sent to an Anthropic model")
            function = tool.get("function") or {}
            converted = {"name": function.get("name", "")}
            if function.get("description"):
                converted["description"] = function["description"]
            converted["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
            out["tools"].append(converted)
        # Anthropic refuses tool_choice without tools, which OpenAI clients sometimes send; so only here.
        choice = _openai_tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    return out


def _anthropic_image_to_part(block: dict) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise TranslationError(f"image source {source.get('type')!r} cannot be sent to an OpenAI model")
    return {"type": "image_url", "image_url": {"url": url}}


def _openai_user_message(parts: list[dict]) -> dict:
    if all(part["type"] == "text" for part in parts):
        return {"role": "user", "content": "\n\n".join(part["text"] for part in parts)}
    return {"role": "user", "content": parts}


def _anthropic_user_to_openai(content: list[dict]) -> list[dict]:
    tool_messages: list[dict] = []
    parts: list[dict] = []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_anthropic_image_to_part(block))
        elif kind == "tool_result":
            result = block.get("content")
            tool_messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                  "content": _anthropic_text(result)})
            if isinstance(result, list):
                # OpenAI tool messages carry text only; an image a tool returned goes to the user turn instead.
                parts.extend(_anthropic_image_to_part(b) for b in result if b.get("type") == "image")
        else:
            raise TranslationError(f"content block of type {kind!r} cannot be sent to an OpenAI model")
    # OpenAI wants tool messages right after the assistant message that called the tools.
    return tool_messages + ([_openai_user_message(parts)] if parts else [])


def _anthropic_assistant_to_openai(content: list[dict]) -> dict:
    texts: list[str] = []
    tool_calls: list[dict] = []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            tool_calls.append({"id": block.get("id"), "type": "function",
                               "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed for Anthropic only; an OpenAI model cannot use them
        else:
            raise TranslationError(f"content block of type {kind!r} cannot be sent to an OpenAI model")
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _anthropic_tool_choice_to_openai(tool_choice: dict) -> Any:
    kind = tool_choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"type": "function", "function": {"name": tool_choice.get("name")}}
    raise TranslationError(f"tool_choice of type {kind!r} cannot be sent to an OpenAI model")


def anthropic_request_to_openai(body: dict) -> dict:
    _refuse_unsupported(body, ANTHROPIC_TO_OPENAI_REFUSED)
    messages: list[dict] = []
    system = _anthropic_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or []:
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise TranslationError(f"message role {role!r} cannot be sent to an OpenAI model")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif role == "assistant":
            messages.append(_anthropic_assistant_to_openai(content or []))
        else:
            messages.extend(_anthropic_user_to_openai(content or []))

    out: dict[str, Any] = {}
    if "model" in body:
        out["model"] = body["model"]
    out["messages"] = messages
    for key in ("max_tokens", "temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        # Without it OpenAI streams carry no usage and the relay could not account for the call.
        out["stream_options"] = {"include_usage": True}
    user_id = (body.get("metadata") or {}).get("user_id")
    if user_id:
        out["user"] = user_id

    tools = body.get("tools")
    if tools:
        out["tools"] = []
        for tool in tools:
            if tool.get("type", "custom") != "custom":
                # Server tools (web search, code execution...) run inside Anthropic; an OpenAI model has none.
                raise TranslationError(f"tool of type {tool.get('type')!r} cannot be sent to an OpenAI model")
            function = {"name": tool.get("name")}
            if tool.get("description"):
                function["description"] = tool["description"]
            function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
            out["tools"].append({"type": "function", "function": function})
        tool_choice = body.get("tool_choice")
        if tool_choice:
            out["tool_choice"] = _anthropic_tool_choice_to_openai(tool_choice)
            if tool_choice.get("disable_parallel_tool_use"):
                out["parallel_tool_calls"] = False
    return out


# ---------------------------------------------------------------------------------------------------------------
# Non-streaming responses
# ---------------------------------------------------------------------------------------------------------------

def anthropic_response_to_openai(resp: dict, *, model: str) -> dict:
    texts: list[str] = []
    tool_calls: list[dict] = []
    for block in resp.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            tool_calls.append({"id": block.get("id"), "type": "function",
                               "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        # thinking and server-tool blocks have no Chat Completions equivalent
    # Claude's text blocks are pieces of one answer (split around citations or tool calls), not paragraphs.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-" + resp.get("id", ""),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _OPENAI_FINISH_REASON.get(resp.get("stop_reason"), "stop")}],
        "usage": _openai_usage(usage_from_anthropic(resp.get("usage"))),
    }


def openai_response_to_anthropic(resp: dict, *, model: str) -> dict:
    choices = resp.get("choices") or [{}]
    message = choices[0].get("message") or {}
    content: list[dict] = []
    text = _openai_text(message.get("content"), sep="") or message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    content.extend(_openai_tool_calls_to_blocks(message.get("tool_calls")))
    return {
        "id": "msg_" + resp.get("id", ""),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _ANTHROPIC_STOP_REASON.get(choices[0].get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": _anthropic_usage(usage_from_openai(resp.get("usage"))),
    }


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------

class AnthropicStreamToOpenAI:
    """Turns Anthropic stream events into OpenAI chat.completion.chunk dicts."""

    def __init__(self, *, model: str, include_usage: bool, request_id: str) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = _prefixed("chatcmpl-", request_id)
        self.created = int(time.time())
        self.usage = Usage()
        self._raw_usage: dict = {}
        self._tool_positions: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool_calls index
        self._started = False
        self._finish_sent = False
        self._usage_sent = False

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI marks every chunk but the last when include_usage is on
        return chunk

    def _start(self) -> list[dict]:
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _track_usage(self, usage: dict | None) -> None:
        # message_delta repeats counters cumulatively (and may add input counts), so newer values replace older.
        self._raw_usage.update({key: value for key, value in (usage or {}).items() if value is not None})
        self.usage = usage_from_anthropic(self._raw_usage)

    def _usage_chunk(self) -> list[dict]:
        if not self.include_usage or self._usage_sent:
            return []
        self._usage_sent = True
        return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [], "usage": _openai_usage(self.usage)}]

    def feed(self, event_type: str, data: dict) -> list[dict]:
        kind = event_type or data.get("type")
        if kind == "message_start":
            self._track_usage((data.get("message") or {}).get("usage"))
            return self._start()
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "text" and block.get("text"):
                return self._start() + [self._chunk({"content": block["text"]})]
            if block.get("type") == "tool_use":
                position = len(self._tool_positions)
                self._tool_positions[data.get("index")] = position
                arguments = json.dumps(block["input"]) if block.get("input") else ""
                call = {"index": position, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": arguments}}
                return self._start() + [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return self._start() + [self._chunk({"content": delta["text"]})]
            position = self._tool_positions.get(data.get("index"))
            if delta.get("type") == "input_json_delta" and delta.get("partial_json") and position is not None:
                call = {"index": position, "function": {"arguments": delta["partial_json"]}}
                return self._start() + [self._chunk({"tool_calls": [call]})]
            return []  # thinking, signatures, citations: nothing a Chat Completions client reads
        if kind == "message_delta":
            self._track_usage(data.get("usage"))
            stop_reason = (data.get("delta") or {}).get("stop_reason")
            if stop_reason and not self._finish_sent:
                self._finish_sent = True
                return self._start() + [self._chunk({}, _OPENAI_FINISH_REASON.get(stop_reason, "stop"))]
            return []
        if kind == "message_stop":
            return self._usage_chunk()
        if kind == "error":
            error = data.get("error") or {}
            raise UpstreamStreamError(error.get("message") or "upstream stream error", error_type=error.get("type"))
        return []  # ping, content_block_stop and event types Anthropic may add later

    def finish(self) -> list[dict]:
        chunks = []
        if self._started and not self._finish_sent:
            # OpenAI clients wait for a finish_reason; an upstream that ended without a stop reason still stopped.
            self._finish_sent = True
            chunks.append(self._chunk({}, "stop"))
        return chunks + self._usage_chunk()


class OpenAIStreamToAnthropic:
    """Turns OpenAI chat.completion.chunk dicts into Anthropic (event name, data) pairs."""

    def __init__(self, *, model: str, request_id: str, input_tokens: int = 0) -> None:
        self.model = model
        self.id = _prefixed("msg_", request_id)
        # OpenAI reports the input only at the end of a stream; message_start carries this estimate instead
        # of 0, and message_delta the provider's count.
        self.input_estimate = input_tokens
        self.usage = Usage()
        self._usage_reported = False
        self._started = False
        self._finish_reason: str | None = None
        self._next_index = 0
        self._open_key: Any = None  # "text" or an OpenAI tool_calls index: the block Anthropic has open
        self._open_index = 0
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic content block index

    def _start(self) -> list[tuple[str, dict]]:
        if self._started:
            return []
        self._started = True
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_estimate, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def _close_block(self) -> list[tuple[str, dict]]:
        if self._open_key is None:
            return []
        self._open_key = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._open_index})]

    def _open_block(self, key: Any, block: dict) -> list[tuple[str, dict]]:
        # Anthropic streams one content block at a time, so a new block closes the previous one.
        events = self._close_block()
        self._open_key, self._open_index = key, self._next_index
        self._next_index += 1
        events.append(("content_block_start",
                       {"type": "content_block_start", "index": self._open_index, "content_block": block}))
        return events

    def _text(self, text: str) -> list[tuple[str, dict]]:
        events = [] if self._open_key == "text" else self._open_block("text", {"type": "text", "text": ""})
        events.append(("content_block_delta", {"type": "content_block_delta", "index": self._open_index,
                                                "delta": {"type": "text_delta", "text": text}}))
        return events

    def _tool_call(self, call: dict) -> list[tuple[str, dict]]:
        position = call.get("index")
        if position is None:
            # Some OpenAI-compatible servers omit the index and send each call whole: a new id is a new call.
            last = max(self._tool_blocks, default=-1)
            position = last + 1 if call.get("id") or last < 0 else last
        function = call.get("function") or {}
        events: list[tuple[str, dict]] = []
        if position not in self._tool_blocks:
            tool_id = _tool_id(call.get("id")) or _tool_id(f"toolu_{self.id}_{position}")
            events += self._open_block(position, {"type": "tool_use", "id": tool_id,
                                                  "name": function.get("name") or "", "input": {}})
            self._tool_blocks[position] = self._open_index
        if function.get("arguments"):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": self._tool_blocks[position],
                                                    "delta": {"type": "input_json_delta",
                                                              "partial_json": function["arguments"]}}))
        return events

    def feed(self, chunk: dict) -> list[tuple[str, dict]]:
        if chunk.get("error"):
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamStreamError(error.get("message") or "upstream stream error", error_type=error.get("type"))
        events = self._start()
        if chunk.get("usage"):
            self.usage = usage_from_openai(chunk["usage"])
            self._usage_reported = True
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1 has no Anthropic equivalent; the client asked for one answer
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                events += self._text(text)
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[tuple[str, dict]]:
        events = self._start() + self._close_block()
        usage: dict[str, int] = {"output_tokens": self.usage.output_tokens}
        if self._usage_reported:
            # OpenAI reports input only at the end; Anthropic clients take cumulative input counts from message_delta.
            anthropic_usage = _anthropic_usage(self.usage)
            usage["input_tokens"] = anthropic_usage["input_tokens"]
            usage["cache_read_input_tokens"] = anthropic_usage["cache_read_input_tokens"]
        stop_reason = _ANTHROPIC_STOP_REASON.get(self._finish_reason, "end_turn")
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events


def _json(data: dict) -> str:
    # json.dumps escapes newlines, so each payload fits on a single SSE data line.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def sse_openai(chunk: dict) -> bytes:
    return f"data: {_json(chunk)}\n\n".encode()


SSE_OPENAI_DONE: bytes = b"data: [DONE]\n\n"


def sse_anthropic(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {_json(data)}\n\n".encode()


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def parse_sse(lines: Iterable[bytes]) -> Iterator[tuple[str | None, str]]:
    event: str | None = None
    data: list[str] = []
    first = True
    for raw in lines:
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else raw
        if first:
            text, first = text.removeprefix("\ufeff"), False
        # Each item is one line whose terminator is optional; an item holding several lines is split, so
        # callers may pass raw chunks that end on a line boundary too.
        for terminator in ("\r\n", "\n", "\r"):
            if text.endswith(terminator):
                text = text[: -len(terminator)]
                break
        for line in _LINE_BREAK.split(text):
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = None, []
            elif line.startswith(":"):
                continue  # comment, used as keep-alive
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "data":
                    data.append(value)
                elif field == "event":
                    event = value
                # id and retry serve browser reconnection, which a relay does not do
    # The spec drops an event left without its blank line, but some proxies cut the last one; the data is whole.
    if data:
        yield event, "\n".join(data)
