"""Translation between the OpenAI and Anthropic wire formats, checked against the official SDKs' types."""
import json

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from gateway.translate import (
    SSE_OPENAI_DONE,
    AnthropicStreamToOpenAI,
    OpenAIStreamToAnthropic,
    TranslationError,
    UnsupportedParameter,
    UpstreamStreamError,
    Usage,
    anthropic_request_to_openai,
    anthropic_response_to_openai,
    openai_request_to_anthropic,
    openai_response_to_anthropic,
    parse_sse,
    sse_anthropic,
    sse_openai,
    usage_from_anthropic,
    usage_from_openai,
)

anthropic_event = TypeAdapter(RawMessageStreamEvent)


def sse_lines(raw: bytes) -> list[bytes]:
    """Split a captured stream the way requests' iter_lines hands it over."""
    return raw.splitlines()


def anthropic_events(raw: bytes) -> list[tuple[str, dict]]:
    return [(event, json.loads(data)) for event, data in parse_sse(sse_lines(raw))]


def openai_chunks(raw: bytes) -> list[dict]:
    return [json.loads(data) for _, data in parse_sse(sse_lines(raw)) if data != "[DONE]"]


def mock_http(body: bytes) -> httpx2.Client:
    def respond(request):
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    return httpx2.Client(transport=httpx2.MockTransport(respond))


# --- usage --------------------------------------------------------------------------------------------------------

def test_openai_usage_counts_cached_tokens_inside_prompt_tokens():
    usage = usage_from_openai({"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280,
                               "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0}})
    assert usage == Usage(input_tokens=1200, output_tokens=80, cached_tokens=1024)


def test_anthropic_usage_adds_cache_reads_and_writes_to_input():
    usage = usage_from_anthropic({"input_tokens": 50, "cache_creation_input_tokens": 300,
                                  "cache_read_input_tokens": 1000, "output_tokens": 20})
    assert usage == Usage(input_tokens=1350, output_tokens=20, cached_tokens=1000, cache_write_tokens=300)


def test_missing_or_null_usage_counts_as_zero():
    assert usage_from_openai(None) == Usage()
    assert usage_from_anthropic({}) == Usage()
    assert usage_from_openai({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}) == Usage(5, 1, 0)
    assert usage_from_anthropic({"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": None}) == Usage(5, 1, 0)


# --- OpenAI request -> Anthropic ------------------------------------------------------------------------------------

def test_system_and_developer_messages_become_the_system_prompt():
    body = {"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hello"},
    ]}
    out = openai_request_to_anthropic(body, default_max_tokens=4096)
    assert out["system"] == "You are terse.\n\nAnswer in French."
    assert out["messages"] == [{"role": "user", "content": "Hello"}]


def test_consecutive_same_role_messages_are_merged_in_order():
    body = {"messages": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "reply"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "third"},
    ]}
    out = openai_request_to_anthropic(body, default_max_tokens=100)
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "third"},
    ]


def test_sampling_fields_map_and_openai_only_fields_that_cannot_change_the_answer_are_dropped():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 256,
            "temperature": 0.2, "top_p": 0.9, "stream": True, "stop": "END", "user": "alice@example.com",
            "n": 1, "logprobs": False, "stream_options": {"include_usage": True}, "seed": 7,
            "response_format": {"type": "text"}, "metadata": {"trace": "x"}, "presence_penalty": 0.5}
    out = openai_request_to_anthropic(body, default_max_tokens=4096)
    assert out == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256,
                   "temperature": 0.2, "top_p": 0.9, "stream": True, "stop_sequences": ["END"],
                   "metadata": {"user_id": "alice@example.com"}}


def test_max_tokens_falls_back_to_the_default_and_stop_lists_pass_through():
    out = openai_request_to_anthropic({"messages": [], "stop": ["\n\n", "###"]}, default_max_tokens=4096)
    assert out["max_tokens"] == 4096
    assert out["stop_sequences"] == ["\n\n", "###"]
    assert openai_request_to_anthropic({"messages": [], "max_tokens": 10}, default_max_tokens=1)["max_tokens"] == 10


def test_images_become_base64_or_url_blocks():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare these"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]}
    out = openai_request_to_anthropic(body, default_max_tokens=100)
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "Compare these"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_unsupported_content_part_is_refused():
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}
    with pytest.raises(TranslationError, match="input_audio"):
        openai_request_to_anthropic(body, default_max_tokens=100)


WEATHER_TOOL_OPENAI = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_TOOL_ANTHROPIC = {"name": "get_weather", "description": "Current weather for a city",
                          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                           "required": ["city"]}}


def test_tool_conversation_becomes_tool_use_and_tool_result_blocks():
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "4C rain"}]},
        {"role": "user", "content": "Which is warmer?"},
    ], "tools": [WEATHER_TOOL_OPENAI], "tool_choice": "auto"}
    out = openai_request_to_anthropic(body, default_max_tokens=100)
    assert out["tools"] == [WEATHER_TOOL_ANTHROPIC]
    assert out["tool_choice"] == {"type": "auto"}
    assert out["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Oslo"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "4C rain"}]},
            {"type": "text", "text": "Which is warmer?"},
        ]},
    ]


@pytest.mark.parametrize(("tool_choice", "expected"), [
    ("auto", {"type": "auto"}),
    ("required", {"type": "any"}),
    ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
])
def test_tool_choice_maps_to_anthropic(tool_choice, expected):
    body = {"messages": [], "tools": [WEATHER_TOOL_OPENAI], "tool_choice": tool_choice}
    assert openai_request_to_anthropic(body, default_max_tokens=1)["tool_choice"] == expected


def test_parallel_tool_calls_false_disables_parallel_tool_use():
    body = {"messages": [], "tools": [WEATHER_TOOL_OPENAI], "parallel_tool_calls": False}
    out = openai_request_to_anthropic(body, default_max_tokens=1)
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_tool_choice_without_tools_is_not_sent():
    out = openai_request_to_anthropic({"messages": [], "tool_choice": "none"}, default_max_tokens=1)
    assert "tool_choice" not in out and "tools" not in out


def test_tool_ids_anthropic_would_reject_are_sanitised_consistently():
    body = {"messages": [
        {"role": "assistant", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{\"city\": \"Par"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"},
    ]}
    out = openai_request_to_anthropic(body, default_max_tokens=1)
    tool_use, tool_result = out["messages"][0]["content"][0], out["messages"][1]["content"][0]
    assert tool_use["id"] == tool_result["tool_use_id"] == "functions_get_weather_0"
    assert tool_use["input"] == {}  # truncated arguments cannot be an input object


# --- Anthropic request -> OpenAI ------------------------------------------------------------------------------------

def test_anthropic_system_blocks_become_a_leading_system_message():
    body = {"model": "gpt-4o", "max_tokens": 1024, "system": [
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Answer in French."},
    ], "messages": [{"role": "user", "content": "Hello"}]}
    out = anthropic_request_to_openai(body)
    assert out["messages"] == [{"role": "system", "content": "You are terse.\n\nAnswer in French."},
                               {"role": "user", "content": "Hello"}]
    assert out["max_tokens"] == 1024


def test_anthropic_text_only_blocks_join_and_mixed_blocks_become_parts():
    body = {"max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        ]},
    ]}
    assert anthropic_request_to_openai(body)["messages"] == [
        {"role": "user", "content": "one\n\ntwo"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]},
    ]


def test_anthropic_tools_and_results_become_tool_calls_and_tool_messages():
    body = {"model": "gpt-4o", "max_tokens": 512, "tools": [WEATHER_TOOL_ANTHROPIC],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Need the tool.", "signature": "EqQBCkgIARABGAIiQ..."},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": [{"type": "text", "text": "18C sunny"}]},
            {"type": "text", "text": "Thanks"},
        ]},
    ]}
    out = anthropic_request_to_openai(body)
    assert out["tools"] == [WEATHER_TOOL_OPENAI]
    assert out["tool_choice"] == "required"
    assert out["parallel_tool_calls"] is False
    assert out["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_01A", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C sunny"},
        {"role": "user", "content": "Thanks"},
    ]


@pytest.mark.parametrize(("tool_choice", "expected"), [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_maps_to_openai(tool_choice, expected):
    body = {"max_tokens": 1, "messages": [], "tools": [WEATHER_TOOL_ANTHROPIC], "tool_choice": tool_choice}
    assert anthropic_request_to_openai(body)["tool_choice"] == expected


def test_anthropic_server_tools_are_refused():
    body = {"max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    with pytest.raises(TranslationError, match="web_search_20250305"):
        anthropic_request_to_openai(body)


def test_streaming_anthropic_request_asks_openai_for_usage():
    body = {"model": "gpt-4o", "max_tokens": 100, "stream": True, "temperature": 0.5, "top_p": 0.8, "top_k": 40,
            "stop_sequences": ["END"], "metadata": {"user_id": "u-42"}, "messages": [{"role": "user", "content": "hi"}]}
    assert anthropic_request_to_openai(body) == {
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0.5,
        "top_p": 0.8, "stream": True, "stop": ["END"], "stream_options": {"include_usage": True}, "user": "u-42"}


def test_request_round_trip_openai_to_anthropic_and_back():
    original = {"model": "m", "max_tokens": 300, "temperature": 0.3, "stop": ["END"], "user": "bob",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "call_9", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_9", "content": "18C"},
                    {"role": "assistant", "content": "It is 18C."},
                ],
                "tools": [WEATHER_TOOL_OPENAI], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    back = anthropic_request_to_openai(openai_request_to_anthropic(original, default_max_tokens=1))
    assert back == original


# --- non-streaming responses ----------------------------------------------------------------------------------------

ANTHROPIC_TOOL_RESPONSE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll check the weather."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 120, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2048,
              "output_tokens": 45, "service_tier": "standard"},
}


def test_anthropic_response_becomes_a_chat_completion():
    out = anthropic_response_to_openai(ANTHROPIC_TOOL_RESPONSE, model="claude-sonnet")
    ChatCompletion.model_validate(out)
    assert out["id"] == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert out["object"] == "chat.completion" and isinstance(out["created"], int) and out["model"] == "claude-sonnet"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the weather."
    assert choice["message"]["tool_calls"] == [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert out["usage"] == {"prompt_tokens": 2168, "completion_tokens": 45, "total_tokens": 2213,
                            "prompt_tokens_details": {"cached_tokens": 2048}}


def test_anthropic_response_without_text_has_null_content():
    resp = dict(ANTHROPIC_TOOL_RESPONSE, content=ANTHROPIC_TOOL_RESPONSE["content"][1:])
    assert anthropic_response_to_openai(resp, model="m")["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize(("stop_reason", "finish_reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
])
def test_anthropic_stop_reasons_map_to_finish_reasons(stop_reason, finish_reason):
    resp = dict(ANTHROPIC_TOOL_RESPONSE, stop_reason=stop_reason)
    assert anthropic_response_to_openai(resp, model="m")["choices"][0]["finish_reason"] == finish_reason


OPENAI_TOOL_RESPONSE = {
    "id": "chatcmpl-BGkz3kMZ2vHxQn",
    "object": "chat.completion",
    "created": 1743000000,
    "model": "gpt-4o-2024-08-06",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": None, "refusal": None, "annotations": [], "tool_calls": [
            {"id": "call_abc123", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }],
    "usage": {"prompt_tokens": 1500, "completion_tokens": 18, "total_tokens": 1518,
              "prompt_tokens_details": {"cached_tokens": 1280, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default",
    "system_fingerprint": "fp_6ec83003ad",
}


def test_openai_response_becomes_an_anthropic_message():
    out = openai_response_to_anthropic(OPENAI_TOOL_RESPONSE, model="gpt-4o")
    Message.model_validate(out)
    assert out["id"] == "msg_chatcmpl-BGkz3kMZ2vHxQn"
    assert out["model"] == "gpt-4o" and out["stop_reason"] == "tool_use"
    assert out["content"] == [{"type": "tool_use", "id": "call_abc123", "name": "get_weather", "input": {"city": "Paris"}}]
    assert out["usage"] == {"input_tokens": 220, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1280,
                            "output_tokens": 18}
    assert usage_from_anthropic(out["usage"]) == usage_from_openai(OPENAI_TOOL_RESPONSE["usage"])


@pytest.mark.parametrize(("finish_reason", "stop_reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "end_turn"),
])
def test_openai_finish_reasons_map_to_stop_reasons(finish_reason, stop_reason):
    resp = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                    "finish_reason": finish_reason}], "usage": None}
    out = openai_response_to_anthropic(resp, model="m")
    Message.model_validate(out)
    assert out["stop_reason"] == stop_reason
    assert out["content"] == [{"type": "text", "text": "Hi"}]


def test_response_round_trip_keeps_text_tools_and_usage():
    back = openai_response_to_anthropic(anthropic_response_to_openai(ANTHROPIC_TOOL_RESPONSE, model="m"), model="m")
    assert back["content"] == ANTHROPIC_TOOL_RESPONSE["content"]
    assert back["stop_reason"] == "tool_use"
    assert usage_from_anthropic(back["usage"]) == usage_from_anthropic(ANTHROPIC_TOOL_RESPONSE["usage"])


# --- streaming: Anthropic upstream, OpenAI client -------------------------------------------------------------------

# As the Messages API sends it (text, then a tool call, prompt cache hit).
ANTHROPIC_TOOL_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":2,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let's check"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" the weather."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": "}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\\"Paris\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""


def convert_anthropic_stream(raw: bytes, *, include_usage: bool) -> tuple[list[dict], AnthropicStreamToOpenAI]:
    converter = AnthropicStreamToOpenAI(model="claude-sonnet", include_usage=include_usage, request_id="req-1")
    chunks = [chunk for event, data in anthropic_events(raw) for chunk in converter.feed(event, data)]
    return chunks + converter.finish(), converter


def test_anthropic_stream_becomes_openai_chunks():
    chunks, converter = convert_anthropic_stream(ANTHROPIC_TOOL_STREAM, include_usage=True)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-req-1"}
    assert [chunk["choices"][0]["delta"] if chunk["choices"] else chunk["usage"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Okay, let's check"},
        {"content": " the weather."},
        {"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {},
        {"prompt_tokens": 1496, "completion_tokens": 89, "total_tokens": 1585,
         "prompt_tokens_details": {"cached_tokens": 1024}},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert converter.usage == Usage(input_tokens=1496, output_tokens=89, cached_tokens=1024)


def test_anthropic_stream_without_include_usage_sends_no_usage_chunk_but_still_counts():
    chunks, converter = convert_anthropic_stream(ANTHROPIC_TOOL_STREAM, include_usage=False)
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    assert converter.usage.output_tokens == 89


def test_openai_sdk_reassembles_the_translated_stream():
    chunks, _ = convert_anthropic_stream(ANTHROPIC_TOOL_STREAM, include_usage=True)
    body = b"".join(sse_openai(chunk) for chunk in chunks) + SSE_OPENAI_DONE
    client = openai.OpenAI(api_key="tg-test", base_url="http://relay.test/v1", http_client=mock_http(body), max_retries=0)
    with client.chat.completions.stream(model="claude-sonnet", messages=[{"role": "user", "content": "hi"}]) as stream:
        completion = stream.get_final_completion()
    message = completion.choices[0].message
    assert message.content == "Okay, let's check the weather."
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage.prompt_tokens == 1496


def test_usage_chunk_is_owed_when_the_upstream_ends_without_message_stop():
    converter = AnthropicStreamToOpenAI(model="m", include_usage=True, request_id="chatcmpl-abc")
    events = anthropic_events(ANTHROPIC_TOOL_STREAM)
    for event, data in events[:-1]:
        converter.feed(event, data)
    owed = converter.finish()
    assert [chunk["choices"] for chunk in owed] == [[]]
    assert owed[0]["id"] == "chatcmpl-abc"
    assert converter.finish() == []


def test_anthropic_stream_error_event_raises():
    converter = AnthropicStreamToOpenAI(model="m", include_usage=False, request_id="r")
    error = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    ((event, data),) = anthropic_events(error)
    with pytest.raises(UpstreamStreamError, match="Overloaded") as raised:
        converter.feed(event, data)
    assert raised.value.error_type == "overloaded_error"


def test_thinking_blocks_are_not_forwarded_to_openai_clients():
    converter = AnthropicStreamToOpenAI(model="m", include_usage=False, request_id="r")
    converter.feed("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 1, "output_tokens": 1}}})
    assert converter.feed("content_block_start", {"type": "content_block_start", "index": 0,
                                                  "content_block": {"type": "thinking", "thinking": "", "signature": ""}}) == []
    assert converter.feed("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "thinking_delta", "thinking": "Hmm"}}) == []


# --- streaming: OpenAI upstream, Anthropic client -------------------------------------------------------------------

# As the Chat Completions API sends it with stream_options.include_usage (text, then two parallel tool calls).
OPENAI_TOOL_STREAM = b"""data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"content":"Checking both"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"content":" cities."},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"ci"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\\": \\"Paris\\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_Q9bZ3oYqLw2mXv7T1nB8eR4k","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\\"city\\": \\"Oslo\\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}

data: {"id":"chatcmpl-BMxyz","object":"chat.completion.chunk","created":1744000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276","choices":[],"usage":{"prompt_tokens":1310,"completion_tokens":52,"total_tokens":1362,"prompt_tokens_details":{"cached_tokens":1152,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"""


def convert_openai_stream(raw: bytes) -> tuple[list[tuple[str, dict]], OpenAIStreamToAnthropic]:
    converter = OpenAIStreamToAnthropic(model="gpt-4o", request_id="req-2")
    events = [event for chunk in openai_chunks(raw) for event in converter.feed(chunk)]
    return events + converter.finish(), converter


def test_openai_stream_becomes_anthropic_events():
    events, converter = convert_openai_stream(OPENAI_TOOL_STREAM)
    for name, data in events:
        assert data["type"] == name
        if name != "ping":
            anthropic_event.validate_python(data)
    assert [(name, data.get("index")) for name, data in events] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None),
    ]
    message = events[0][1]["message"]
    assert message == {"id": "msg_req-2", "type": "message", "role": "assistant", "model": "gpt-4o", "content": [],
                       "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                                             "name": "get_weather", "input": {}}
    assert events[8][1]["delta"] == {"type": "input_json_delta", "partial_json": 'ty": "Paris"}'}
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"output_tokens": 52, "input_tokens": 158, "cache_read_input_tokens": 1152}}
    assert converter.usage == Usage(input_tokens=1310, output_tokens=52, cached_tokens=1152)


def test_anthropic_sdk_reassembles_the_translated_stream():
    events, _ = convert_openai_stream(OPENAI_TOOL_STREAM)
    body = b"".join(sse_anthropic(name, data) for name, data in events)
    client = anthropic.Anthropic(api_key="tg-test", base_url="http://relay.test", http_client=mock_http(body), max_retries=0)
    with client.messages.stream(model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Checking both cities."
    assert [block.input for block in message.content[1:]] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (158, 1152, 52)


def test_openai_stream_with_no_content_still_closes_the_message():
    converter = OpenAIStreamToAnthropic(model="m", request_id="r")
    events = converter.finish()
    assert [name for name, _ in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[2][1]["usage"] == {"output_tokens": 0}


def test_openai_length_finish_becomes_max_tokens():
    converter = OpenAIStreamToAnthropic(model="m", request_id="r")
    converter.feed({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Once"}, "finish_reason": None}]})
    converter.feed({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    assert converter.finish()[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_openai_stream_error_chunk_raises():
    converter = OpenAIStreamToAnthropic(model="m", request_id="r")
    with pytest.raises(UpstreamStreamError, match="rate limit"):
        converter.feed({"error": {"message": "rate limit reached", "type": "rate_limit_error"}})


# --- SSE framing ----------------------------------------------------------------------------------------------------

def test_sse_encoders_frame_one_json_line_per_event():
    assert sse_openai({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'
    assert SSE_OPENAI_DONE == b"data: [DONE]\n\n"
    assert sse_anthropic("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert list(parse_sse(sse_lines(sse_anthropic("ping", {"type": "ping"})))) == [("ping", '{"type":"ping"}')]


def test_parse_sse_handles_comments_multiline_data_and_a_missing_final_blank_line():
    lines = [
        b": keep-alive",
        b"",
        b"event: message_start",
        b'data: {"a":',
        b"data:  1}",
        b"",
        b"",
        b"data:no-space",
        b"id: 7",
        b"retry: 1000",
        b"",
        b"event: message_stop",
        b'data: {"type":"message_stop"}',
    ]
    assert list(parse_sse(lines)) == [
        ("message_start", '{"a":\n 1}'),
        (None, "no-space"),
        ("message_stop", '{"type":"message_stop"}'),
    ]


def test_parse_sse_accepts_line_terminators_and_several_lines_per_item():
    lines = [b"\xef\xbb\xbfevent: a\r\n", b"data: 1\r\n", b"\r\n", "event: b\ndata: 2\n\ndata: 3\r\rdata: 4\n"]
    assert list(parse_sse(lines)) == [("a", "1"), ("b", "2"), (None, "3"), (None, "4")]


def test_parse_sse_is_incremental():
    def lines():
        yield b"data: first"
        yield b""
        raise AssertionError("read past the first event")

    assert next(parse_sse(lines())) == (None, "first")


def test_event_name_does_not_leak_into_the_next_event():
    assert list(parse_sse([b"event: ping", b"", b"data: x", b""])) == [(None, "x")]


@pytest.mark.parametrize("field, value", [("n", 2), ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50256": -100}),
                                          ("response_format", {"type": "json_object"})])
def test_openai_fields_that_would_change_the_answer_are_refused_for_anthropic_models(field, value):
    """Reproduction: they were dropped silently (n=2 returned one choice)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(UnsupportedParameter, match=f"'{field}'"):
        openai_request_to_anthropic(body, default_max_tokens=4096)


def test_anthropic_thinking_is_refused_for_openai_models():
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024}}
    with pytest.raises(UnsupportedParameter, match="'thinking'"):
        anthropic_request_to_openai(body)
