"""Budget holds bound what a provider can bill (gateway.tokens): checked against the stub provider's word
counts and OpenAI's own tokenizers, on odd prompts and on bodies of any shape."""
import base64
import json
import random
import threading

import bpe_openai
import pytest

from gateway.providers import WIRE_ANTHROPIC, WIRE_OPENAI
from gateway.tokens import (
    BUILTIN_TOOL_TOKEN_BOUND,
    DOCUMENT_TOKEN_BOUND,
    GPT_4O_MINI_IMAGE_TOKEN_BOUND,
    IMAGE_TOKEN_BOUND,
    MAX_CHOICES,
    REPLY_PRIMING_TOKENS,
    TokenFieldError,
    encoding_for,
    input_token_bound,
    output_token_bound,
    validate_output_fields,
)
from tests.support.stub_provider import count_words

CHAT, MESSAGES, EMBEDDINGS = "chat", "messages", "embeddings"
O200K = bpe_openai.get_encoding("o200k_base")
CL100K = bpe_openai.get_encoding("cl100k_base")

# (wire, provider model name, the tokenizer that provider bills with; None: unknown, bounded by bytes)
PATHS = [
    (WIRE_OPENAI, "gpt-4o", O200K),
    (WIRE_OPENAI, "gpt-4o-mini-2024-07-18", O200K),
    (WIRE_OPENAI, "gpt-3.5-turbo", CL100K),
    (WIRE_OPENAI, "llama-3.1-8b-instruct", None),
    (WIRE_ANTHROPIC, "claude-sonnet-4-5", None),
]
PATH_IDS = [f"{wire}:{model}" for wire, model, _ in PATHS]

ODD_PROMPTS = [
    "a a a a a a a a a a a a",
    "a " * 2_000,
    "I a o e u , . ; ! ? - x y z",
    "中文字符测试，没有空格的句子会被切成很多词元。",
    "日本語のテキストとカタカナ、ひらがな",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "1234567890" * 30,
    "3.14159 2.71828 1.41421 -0.5 +7e10",
    "🙂🙃😉 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪🇫🇷",
    "mixed 中文 and English 123 🙂 ÄÖÜ ß Ωμέγα привет مرحبا नमस्ते",
    "Supercalifragilisticexpialidocious" * 20,
    "x" * 5_000,
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "tab\tseparated\nnew\r\nlines    and     spaces\u00a0nbsp\u2003em",
    "<|endoftext|> <|im_start|>user <|im_end|> <|endofprompt|>",
    "!@#$%^&*()_+{}|:\"<>?~` [] \\ / '' \"\"",
    "a\x1cb\x1dc\x1ed\x1ff\x85g\u2028h",
    "e\u0301" * 100,
    "\u200b\u200d\ufeff zero width",
    "http://example.com/a?b=c&d=e#f https://x.y/z",
    "",
    "   ",
]


@pytest.fixture(autouse=True)
def _fresh():
    """Pure functions: no stub provider, Redis or catalog to reset (replaces tests/gateway/conftest.py's)."""
    yield


def tokens_of(encoding, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


def chat(*messages: dict, **fields) -> dict:
    return {"model": "m", "messages": list(messages), **fields}


def user(content) -> dict:
    return {"role": "user", "content": content}


def bound(payload: dict, path: tuple, endpoint: str = CHAT) -> int:
    wire, model, _ = path
    return input_token_bound(payload, wire=wire, model_name=model, endpoint=endpoint)


# ------------------------------------------------------------------ the bound covers what is billed


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("text", ODD_PROMPTS)
def test_bound_covers_what_a_word_counting_provider_bills(path, text):
    assert bound(chat(user(text)), path) >= count_words(text)
    assert bound(chat(user([{"type": "text", "text": text}] * 3)), path) >= 3 * count_words(text)
    anthropic_body = {"system": text, "messages": [user([{"type": "text", "text": text}]), {"role": "assistant", "content": text}]}
    assert bound(anthropic_body, path, MESSAGES) >= 3 * count_words(text)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("text", ODD_PROMPTS)
def test_bound_covers_the_providers_own_token_count(path, text):
    billed_by = [path[2]] if path[2] is not None else [O200K, CL100K]  # unknown: cover every tokenizer we have
    for encoding in billed_by:
        assert bound(chat(user(text)), path) >= tokens_of(encoding, text)
        assert bound({"input": text}, path, EMBEDDINGS) >= tokens_of(encoding, text)


@pytest.mark.parametrize("text", ODD_PROMPTS)
def test_bound_is_at_least_openais_documented_count_for_its_models(text):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text, "name": "ann"}]
    documented = REPLY_PRIMING_TOKENS + sum(
        3 + sum(tokens_of(O200K, value) for value in message.values()) for message in messages
    ) + 1  # one more for the name
    assert input_token_bound(chat(*messages), wire=WIRE_OPENAI, model_name="gpt-4o", endpoint=CHAT) >= documented


def test_bound_for_a_model_with_a_known_tokenizer_is_much_tighter_than_bytes_for_english():
    text = "The committee reviewed the quarterly budget and approved the new spending limits for each team. " * 20
    tokenized = input_token_bound(chat(user(text)), wire=WIRE_OPENAI, model_name="gpt-4o", endpoint=CHAT)
    in_bytes = input_token_bound(chat(user(text)), wire=WIRE_OPENAI, model_name="llama-3.1-8b", endpoint=CHAT)
    assert tokens_of(O200K, text) <= tokenized < in_bytes / 4
    assert in_bytes >= len(text.encode())


def test_known_openai_model_names_get_their_tokenizer_and_others_none():
    assert encoding_for(WIRE_OPENAI, "gpt-4o-2024-08-06") == "o200k_base"
    assert encoding_for(WIRE_OPENAI, "GPT-4.1-nano") == "o200k_base"
    assert encoding_for(WIRE_OPENAI, "ft:gpt-4o-mini-2024-07-18:acme::abc123") == "o200k_base"
    assert encoding_for(WIRE_OPENAI, "o1") == encoding_for(WIRE_OPENAI, "o3-mini") == "o200k_base"
    assert encoding_for(WIRE_OPENAI, "o4-mini") == encoding_for(WIRE_OPENAI, "gpt-5-mini") == "o200k_base"
    assert encoding_for(WIRE_OPENAI, "gpt-4-turbo") == encoding_for(WIRE_OPENAI, "gpt-4") == "cl100k_base"
    assert encoding_for(WIRE_OPENAI, "gpt-3.5-turbo-0125") == encoding_for(WIRE_OPENAI, "gpt-35-turbo") == "cl100k_base"
    assert encoding_for(WIRE_OPENAI, "text-embedding-3-small") == "cl100k_base"
    for unknown in ("gpt-oss-120b", "my-azure-deployment", "o1x", "gpt-4x", "llama3", "claude-3-haiku", ""):
        assert encoding_for(WIRE_OPENAI, unknown) is None
    assert encoding_for(WIRE_ANTHROPIC, "gpt-4o") is None


# ------------------------------------------------------------------ what else the provider reads


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_tool_definitions_calls_and_results_are_counted(path):
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "word " * 20}
                                               for i in range(20)}}
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find things.", "parameters": schema}}]
    plain = bound(chat(user("hi")), path)
    with_tools = bound(chat(user("hi"), tools=tools), path)
    assert with_tools - plain >= tokens_of(O200K, json.dumps(tools))
    arguments = json.dumps({"query": "word " * 2_000})
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "result " * 2_000}
    assert bound(chat(user("hi"), call, result), path) - plain >= 4_000


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_anthropic_system_blocks_tool_use_and_tool_results_are_counted(path):
    words = "word " * 1_000
    body = {
        "system": [{"type": "text", "text": words, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"q": words}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": words}]}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
    }
    assert bound(body, path, MESSAGES) >= 3_000


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_text_in_a_tool_input_shaped_like_an_image_is_still_counted(path):
    disguised = {"type": "image", "data": "word " * 5_000}
    body = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": disguised}]}]}
    assert bound(body, path, MESSAGES) >= 5_000


def test_anthropic_builtin_tools_hold_their_hidden_definition():
    computer = {"type": "computer_20250124", "name": "computer", "display_width_px": 1024, "display_height_px": 768}
    body = {"messages": [user("click")], "max_tokens": 10}
    path = (WIRE_ANTHROPIC, "claude-sonnet-4-5", None)
    assert bound({**body, "tools": [computer]}, path, MESSAGES) - bound(body, path, MESSAGES) >= BUILTIN_TOOL_TOKEN_BOUND


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_response_format_schema_is_counted(path):
    schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"description": "word " * 1_000}}}
    assert bound(chat(user("hi"), response_format=schema), path) - bound(chat(user("hi")), path) >= 1_000


# ------------------------------------------------------------------ media


@pytest.mark.parametrize("path", PATHS[2:], ids=PATH_IDS[2:])
def test_image_counts_the_constant_not_its_base64_size(path):
    data = base64.b64encode(bytes(1_000_000)).decode()
    openai_image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}", "detail": "high"}}
    anthropic_image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    base = bound(chat(user([{"type": "text", "text": "what is this?"}])), path)
    for image in (openai_image, anthropic_image):
        with_image = bound(chat(user([{"type": "text", "text": "what is this?"}, image])), path)
        assert with_image - base == IMAGE_TOKEN_BOUND
    two = bound(chat(user([openai_image, anthropic_image])), path)
    assert 2 * IMAGE_TOKEN_BOUND <= two < 2 * IMAGE_TOKEN_BOUND + 100


def test_gpt_4o_mini_images_hold_its_multiplied_tile_cost():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    for model in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "azure-gpt-4o-mini-eu"):
        held = input_token_bound(chat(user([image])), wire=WIRE_OPENAI, model_name=model, endpoint=CHAT)
        assert held >= GPT_4O_MINI_IMAGE_TOKEN_BOUND > 2_833 + 8 * 5_667


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_pdf_documents_hold_the_page_bound_and_text_documents_their_text(path):
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x" * 10}}
    openai_file = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0x", "filename": "a.pdf"}}
    text_document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "word " * 3_000}}
    assert bound(chat(user([pdf])), path) >= DOCUMENT_TOKEN_BOUND
    assert bound(chat(user([openai_file])), path) >= DOCUMENT_TOKEN_BOUND
    assert 3_000 <= bound(chat(user([text_document])), path) < DOCUMENT_TOKEN_BOUND


def test_audio_counts_by_its_size_far_below_its_base64_length():
    ten_seconds_of_8khz_wav = base64.b64encode(bytes(80_000)).decode()
    audio = {"type": "input_audio", "input_audio": {"data": ten_seconds_of_8khz_wav, "format": "wav"}}
    held = input_token_bound(chat(user([audio])), wire=WIRE_OPENAI, model_name="gpt-4o-audio-preview", endpoint=CHAT)
    assert 10 * 10 <= held < len(ten_seconds_of_8khz_wav) / 10  # OpenAI bills 10 tokens a second


# ------------------------------------------------------------------ embeddings


EMBEDDING_PATHS = [(WIRE_OPENAI, "text-embedding-3-small", CL100K), (WIRE_OPENAI, "bge-m3", None)]


@pytest.mark.parametrize("path", EMBEDDING_PATHS, ids=["tokenizer", "bytes"])
def test_embedding_token_ids_count_one_token_each(path):
    assert bound({"input": list(range(1_000))}, path, EMBEDDINGS) in range(1_000, 1_010)
    assert bound({"input": [list(range(300)), list(range(200))]}, path, EMBEDDINGS) in range(500, 510)


@pytest.mark.parametrize("path", EMBEDDING_PATHS, ids=["tokenizer", "bytes"])
def test_embedding_strings_are_bounded_each(path):
    texts = ODD_PROMPTS[:10]
    held = bound({"input": texts}, path, EMBEDDINGS)
    assert held >= sum(tokens_of(CL100K, t) for t in texts)
    assert held >= sum(count_words(t) for t in texts)
    assert bound({"input": texts}, path, CHAT) < held  # not read as a chat: embeddings take `input`


# ------------------------------------------------------------------ output


def test_n_multiplies_the_output_hold():
    assert output_token_bound({"max_tokens": 100, "n": 5}, endpoint=CHAT, model_max_output=4096) == 500
    assert output_token_bound({"n": 3}, endpoint=CHAT, model_max_output=4096) == 3 * 4096


def test_largest_output_field_wins():
    body = {"max_tokens": 100, "max_completion_tokens": 300, "max_output_tokens": 200}
    assert output_token_bound(body, endpoint=CHAT, model_max_output=4096) == 300
    assert output_token_bound({"max_completion_tokens": 10, "max_tokens": 700}, endpoint=CHAT, model_max_output=4096) == 700


def test_model_limit_is_held_when_no_output_field_is_sent():
    assert output_token_bound({}, endpoint=CHAT, model_max_output=8192) == 8192
    assert output_token_bound({"max_tokens": None, "max_completion_tokens": True}, endpoint=CHAT,
                               model_max_output=8192) == 8192


def test_bool_or_non_integer_n_counts_as_one_choice():
    for n in (True, False, 2.5, "3", None, [2], 0, -4):
        assert output_token_bound({"max_tokens": 50, "n": n}, endpoint=CHAT, model_max_output=4096) == 50


def test_embeddings_hold_no_output():
    assert output_token_bound({"input": "x", "max_tokens": 10, "n": 4}, endpoint=EMBEDDINGS, model_max_output=4096) == 0


def test_predicted_output_is_held_as_output():
    prediction = {"type": "content", "content": "word " * 1_000}
    held = output_token_bound({"max_tokens": 100, "prediction": prediction}, endpoint=CHAT, model_max_output=4096)
    assert held >= 100 + tokens_of(O200K, prediction["content"])


# ------------------------------------------------------------------ output fields refused


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
@pytest.mark.parametrize("value", [True, False, 0, -1, 1.0, 100.5, "100", [100], {"n": 1}])
def test_output_limits_that_are_not_positive_integers_are_refused(field, value):
    with pytest.raises(TokenFieldError) as refused:
        validate_output_fields({field: value}, endpoint=CHAT, model_max_output=4096)
    assert refused.value.code == "invalid_request"
    assert field in refused.value.message


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_output_limit_over_the_models_is_refused_as_too_large(field):
    body = {"max_tokens": 10, field: 4097} if field != "max_tokens" else {"max_tokens": 4097}
    with pytest.raises(TokenFieldError) as refused:
        validate_output_fields(body, endpoint=CHAT, model_max_output=4096)
    assert refused.value.code == "max_tokens_too_large"
    assert "4097" in refused.value.message and "4096" in refused.value.message


@pytest.mark.parametrize("n", [True, False, 0, -1, MAX_CHOICES + 1, 2.0, "2", [2]])
def test_n_outside_one_to_128_or_not_an_integer_is_refused(n):
    with pytest.raises(TokenFieldError) as refused:
        validate_output_fields({"n": n}, endpoint=CHAT, model_max_output=4096)
    assert refused.value.code == "invalid_request"


def test_valid_and_null_output_fields_pass():
    validate_output_fields({"max_tokens": 4096, "max_completion_tokens": 1, "n": MAX_CHOICES}, endpoint=CHAT,
                           model_max_output=4096)
    validate_output_fields({"max_tokens": None, "max_completion_tokens": None, "n": None}, endpoint=CHAT,
                           model_max_output=4096)
    validate_output_fields({"input": "x", "max_tokens": True, "n": 0}, endpoint=EMBEDDINGS, model_max_output=4096)


def test_anthropic_messages_require_max_tokens():
    for body in ({}, {"max_tokens": None}, {"max_completion_tokens": 10}):
        with pytest.raises(TokenFieldError) as refused:
            validate_output_fields(body, endpoint=MESSAGES, model_max_output=4096)
        assert refused.value.code == "invalid_request"
    validate_output_fields({"max_tokens": 10}, endpoint=MESSAGES, model_max_output=4096)


# ------------------------------------------------------------------ hostile shapes


def _nested(depth: int) -> list:
    value: list = ["deep"]
    for _ in range(depth):
        value = [value]
    return value


def _cycle() -> list:
    value: list = ["loop"]
    value.append(value)
    return value


HOSTILE_VALUES = [
    None, True, 0, -1, 10**5000, 1.5, float("nan"), float("inf"), "", "a\ud800b\udfff", "中" * 100, [], {},
    [None, 1, True, "x", [], {}], {"type": ["not", "hashable"]}, {"type": {"a": 1}}, {"type": None, "text": 5},
    {"type": "text", "text": ["x"]}, {"type": "image_url", "image_url": None}, {"type": "image", "source": "x"},
    {"type": "document", "source": None}, {"type": "document", "source": {"type": "text", "data": 5}},
    {"type": "document", "source": {"type": "content", "content": "x"}}, {"type": "input_audio", "input_audio": "x"},
    {"type": "input_audio", "input_audio": {"data": 5}}, {"type": "tool_result", "content": {"type": "tool_result"}},
    {"type": "tool_use", "input": [1, {"type": "image"}]}, {1: "int key", (1, 2): "tuple key", None: "none key"},
    _nested(5_000), _cycle(), {"content": _nested(3_000)}, {"self": _cycle()}, {"type": "file"},
    [[1, 2], [3, "x"], ["y", None]], {"type": "text", "text": "x", "cache_control": _cycle()}, {1, 2, 3}, ("t", 1),
    object(),
]

TOP_FIELDS = ["messages", "system", "tools", "functions", "tool_choice", "response_format", "input", "prediction",
              "n", "max_tokens", "max_completion_tokens", "max_output_tokens", "documents"]
KEYS = ["type", "text", "content", "role", "name", "image_url", "source", "data", "input", "tool_calls", "function",
        "arguments", "input_audio", "title", "context", "url", "tool_use_id", "thinking", "signature"]
TYPES = ["text", "image_url", "image", "input_image", "document", "file", "input_file", "input_audio", "tool_use",
         "tool_result", "thinking", "redacted_thinking", "function", "custom", "computer_20250124", "content", "base64"]


def _random_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 5 or roll < 0.35:
        return rng.choice(HOSTILE_VALUES[:13] + ["word " * rng.randint(0, 50), rng.randint(-5, 5)])
    if roll < 0.6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    value = {rng.choice(KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if rng.random() < 0.7:
        value["type"] = rng.choice(TYPES)
    return value


def _hostile_payloads():
    for value in HOSTILE_VALUES:
        yield value
        for field in TOP_FIELDS:
            yield {field: value}
        yield {"messages": [value, {"role": "user", "content": value}]}
        yield {"messages": [{"role": "user", "content": [value, value]}]}
    rng = random.Random(20240611)
    for _ in range(1_500):
        yield {field: _random_value(rng) for field in rng.sample(TOP_FIELDS, rng.randint(1, 5))}


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_hostile_shapes_never_raise(path):
    wire, model, _ = path
    for payload in _hostile_payloads():
        for endpoint in (CHAT, MESSAGES, EMBEDDINGS):
            held = input_token_bound(payload, wire=wire, model_name=model, endpoint=endpoint)
            assert isinstance(held, int) and held >= 0
            output = output_token_bound(payload, endpoint=endpoint, model_max_output=4096)
            assert isinstance(output, int) and output >= 0
            try:
                validate_output_fields(payload, endpoint=endpoint, model_max_output=4096)
            except TokenFieldError:
                pass


def test_bounds_agree_across_threads_loading_at_once():
    body = chat(user("The same body, counted by many threads at once. " * 50))
    expected = input_token_bound(body, wire=WIRE_OPENAI, model_name="gpt-4o", endpoint=CHAT)
    results = []

    def count() -> None:
        results.extend(input_token_bound(body, wire=WIRE_OPENAI, model_name="gpt-4o", endpoint=CHAT) for _ in range(50))

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 400
