"""Upper bounds on the tokens a provider can bill for one request, for budget holds that concurrent calls
cannot slip past: input from the body (OpenAI's own tokenizer where it fits the model, UTF-8 bytes
everywhere else), output from every limit field the client sent, times the number of choices.

Pure functions: no database, no Redis. The relay's checks (gateway.relay.checks) import this module, so
it must not import them; the endpoint names below are theirs.

Why bytes are a bound: a byte-level BPE (OpenAI's, Llama 3's, Qwen's) never yields more tokens than the
UTF-8 bytes it reads, and a SentencePiece or WordPiece vocabulary yields at most one token per character
(or per byte, with byte fallback) plus a start marker, which TEXT_START_TOKENS covers. What a provider
adds around the text (chat templates, tool preambles) is covered by the named overheads below.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gateway.providers import WIRE_OPENAI

log = logging.getLogger(__name__)

# gateway.relay.checks' endpoint names (checks imports this module, so they are not imported from there).
_MESSAGES, _EMBEDDINGS = "messages", "embeddings"

# --- Where OpenAI's tokenizer fits (OpenAI wire only; the same names as tiktoken's model table) ---
O200K, CL100K = "o200k_base", "cl100k_base"
ENCODINGS = (O200K, CL100K)
# A model name matches a family when it is the family's name or starts with it and "-" (dated snapshots,
# "-mini", "-turbo"); "ft:" fine-tunes match their base. Anything else (gpt-oss, an Azure deployment
# name, a vLLM model) is counted in bytes: a wrong tokenizer could count fewer tokens than are billed.
MODEL_FAMILY_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", O200K), ("chatgpt-4o", O200K), ("gpt-4.1", O200K), ("gpt-4.5", O200K), ("gpt-5", O200K),
    ("o1", O200K), ("o3", O200K), ("o4", O200K),
    ("gpt-4", CL100K), ("gpt-3.5", CL100K), ("gpt-35", CL100K),
    ("text-embedding-3", CL100K), ("text-embedding-ada-002", CL100K),
)

# --- Overheads where the tokenizer is known (OpenAI documents 3 per message, 1 per name, 3 priming) ---
TOKENS_PER_MESSAGE = 4
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# OpenAI renders tool definitions into a preamble of its own ("namespace functions { ... }"), which is
# shorter than their JSON (counted with the tokenizer) apart from a few fixed tokens around it.
OPENAI_TOOLS_PREAMBLE_TOKENS = 64

# --- Overheads where the tokenizer is unknown (bytes) ---
TEXT_START_TOKENS = 1  # SentencePiece's "▁" start marker on every separately encoded text
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers: Llama 3 spends 4 (<|start_header_id|>... <|eot_id|>)
TEMPLATE_TOKENS_PER_REQUEST = 64  # BOS, reply priming, default system lines (Llama 3.1's dates: ~30)
# Anthropic adds a tool-use system prompt of up to 530 tokens (Claude 3 Opus; 346 for Claude 4), open
# models' templates a tool preamble of about 100 (Llama 3.1, Qwen 2.5).
TOOL_PROMPT_TOKEN_BOUND = 1_000
TOKENS_PER_EMBEDDING_INPUT = 4  # [CLS]/[SEP] or BOS/EOS that embedding models add to each input

# --- Media: their base64 is never read as text ---
# High-detail images are billed by tiles: at most 8 tiles of 512 px after scaling, 1,445 tokens on gpt-4o,
# under 4,000 on every patch-billed OpenAI model, about 1,600 on Claude. 6,000 leaves room.
IMAGE_TOKEN_BOUND = 6_000
# gpt-4o-mini bills images at 33x gpt-4o's tokens (2,833 base + 5,667 per tile, 8 tiles: 48,169).
GPT_4O_MINI_IMAGE_TOKEN_BOUND = 50_000
# PDFs and other files are read page by page, as extracted text plus an image of each page. Both OpenAI
# and Anthropic take at most 100 pages per request, and a page costs at most ~1,600 image tokens plus its
# text (Anthropic documents 1,500-3,000 for a dense page). A file's bytes say nothing about its pages
# (compressed streams), so this is a constant; the model's context window is the real ceiling.
DOCUMENT_PAGE_LIMIT = 100
TOKENS_PER_DOCUMENT_PAGE = 5_000
DOCUMENT_TOKEN_BOUND = DOCUMENT_PAGE_LIMIT * TOKENS_PER_DOCUMENT_PAGE
# Audio is billed by duration (OpenAI: 10 tokens a second). The smallest encodings sent as input_audio
# (8 kbps MP3, 1,000 bytes a second) give 100 bytes a token; one token per 16 decoded bytes leaves 6x room.
AUDIO_BYTES_PER_TOKEN = 16
# Anthropic's own tools (computer use, bash, text editor, web search, ...) carry a definition and system
# text the request does not show: 735 tokens for computer use plus up to 499 of system prompt.
BUILTIN_TOOL_TOKEN_BOUND = 2_000

# --- Output ---
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
MAX_CHOICES = 128  # OpenAI's limit on n

# Fields of the request the provider reads besides messages and system.
_TOOL_FIELDS = ("tools", "functions")
_PROMPT_FIELDS = ("tool_choice", "function_call", "response_format", "output_format", "mcp_servers",
                  "web_search_options", "documents", "chat_template")
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})
_FILE_PARTS = frozenset({"file", "input_file"})
_UNBILLED_KEYS = frozenset({"type", "cache_control", "signature"})
_MAX_NESTING = 16  # content nested deeper than this (tool results in tool results ...) is counted as JSON


# ------------------------------------------------------------------ tokenizers


_tokenizer_lock = threading.Lock()
_tokenizers: dict[str, Callable[[str], int] | None] = {}


def encoding_for(wire: str, model_name: str) -> str | None:
    """The OpenAI encoding that counts exactly what this provider model bills, or None when unknown."""
    if wire != WIRE_OPENAI or not isinstance(model_name, str):
        return None
    name = model_name.lower().removeprefix("ft:")
    for family, encoding in MODEL_FAMILY_ENCODINGS:
        if name == family or name.startswith((family + "-", family + ":")):
            return encoding
    return None


def load_tokenizers(encodings: Iterable[str] = ENCODINGS) -> None:
    """Load tokenizers now rather than on the first call that needs one (about a second of CPU and 170 MB
    for both, see _load_tokenizer): call it where a worker starts."""
    for encoding in encodings:
        _tokenizer(encoding)


def _tokenizer(encoding: str) -> Callable[[str], int] | None:
    counter = _tokenizers.get(encoding, False)
    if counter is False:
        with _tokenizer_lock:  # one load per process, however many threads ask at once
            counter = _tokenizers.get(encoding, False)
            if counter is False:
                counter = _tokenizers[encoding] = _load_tokenizer(encoding)
    return counter


def _load_tokenizer(encoding: str) -> Callable[[str], int] | None:
    """bpe_openai's Rust tokenizer counts without building a token list; its Python Encoding is the
    fallback. Importing bpe_openai builds its rank tables (0.8 s, ~70 MB); each Rust tokenizer adds
    ~65 MB (o200k) or ~30 MB (cl100k). Without it, the bound falls back to bytes, which is still safe."""
    try:
        from bpe_openai import _bindings

        return _bindings.tokenizer_for_encoding(encoding).count
    except Exception:  # a private module may move between versions: try the public API
        pass
    try:
        import bpe_openai

        public = bpe_openai.get_encoding(encoding)
        return lambda text: len(public.encode_ordinary(text))
    except Exception:
        log.warning("no tokenizer for %s: input tokens are bounded by UTF-8 bytes instead", encoding, exc_info=True)
        return None


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _count_in_bytes(text: str) -> int:
    return _utf8_length(text) + TEXT_START_TOKENS


def _counting_with(count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    def count(text: str) -> int:
        try:
            return count_tokens(text)
        except ValueError:  # lone surrogates (UnicodeEncodeError), a tokenizer's length limit: bytes bound any text
            return _count_in_bytes(text)
    return count


# ------------------------------------------------------------------ rules per provider model


@dataclass(frozen=True)
class _Rules:
    count_text: Callable[[str], int]
    tokenized: bool
    per_message: int
    per_name: int
    per_request: int
    tool_prompt: int
    per_embedding_input: int
    image: int
    template_json: bool  # an unknown OpenAI-compatible server may render JSON through Jinja's tojson


@lru_cache(maxsize=1024)
def _rules_for(wire: str, model_name: str) -> _Rules:
    lowered = model_name.lower() if isinstance(model_name, str) else ""
    image = GPT_4O_MINI_IMAGE_TOKEN_BOUND if "4o-mini" in lowered else IMAGE_TOKEN_BOUND
    encoding = encoding_for(wire, model_name)
    counter = _tokenizer(encoding) if encoding else None
    if counter is not None:
        return _Rules(_counting_with(counter), True, TOKENS_PER_MESSAGE, TOKENS_PER_NAME, REPLY_PRIMING_TOKENS,
                      OPENAI_TOOLS_PREAMBLE_TOKENS, 0, image, False)
    return _Rules(_count_in_bytes, False, TEMPLATE_TOKENS_PER_MESSAGE, TOKENS_PER_NAME, TEMPLATE_TOKENS_PER_REQUEST,
                  TOOL_PROMPT_TOKEN_BOUND, TOKENS_PER_EMBEDDING_INPUT, image, wire == WIRE_OPENAI)


_BYTE_RULES = _Rules(_count_in_bytes, False, TEMPLATE_TOKENS_PER_MESSAGE, TOKENS_PER_NAME, TEMPLATE_TOKENS_PER_REQUEST,
                     TOOL_PROMPT_TOKEN_BOUND, TOKENS_PER_EMBEDDING_INPUT, IMAGE_TOKEN_BOUND, False)


# ------------------------------------------------------------------ input


def input_token_bound(payload: dict, *, wire: str, model_name: str, endpoint: str) -> int:
    """At least the input tokens the provider will bill for this body. Either wire's shapes are read
    whatever `wire` says (the client's body may be translated before it is sent); `wire` and `model_name`
    only choose how text is counted. Never raises, whatever the body's shape."""
    rules = _rules_for(wire, model_name)
    if not isinstance(payload, dict):
        return rules.per_request + _json_bound(payload, rules)
    if endpoint == _EMBEDDINGS:
        return _embedding_bound(payload.get("input"), rules)
    total = rules.per_request
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += _message_bound(message, rules)
    elif messages is not None:
        total += _json_bound(messages, rules)
    system = payload.get("system")  # Anthropic: a string or a list of text blocks
    if system is not None:
        total += rules.per_message + _content_bound(system, rules, 0)
    for field in _TOOL_FIELDS:
        tools = payload.get(field)
        if tools:
            total += _tools_bound(tools, rules)
    for field in _PROMPT_FIELDS:
        value = payload.get(field)
        if value is not None:
            total += _json_bound(value, rules)
    return total


def _message_bound(message: Any, rules: _Rules) -> int:
    if not isinstance(message, dict):
        return rules.per_message + _json_bound(message, rules)
    total = rules.per_message
    for key, value in message.items():
        if key == "content":
            total += _content_bound(value, rules, 0)
        elif isinstance(value, str):  # role, name, tool_call_id, refusal
            total += rules.count_text(value) + (rules.per_name if key == "name" else 0)
        elif value is not None and key not in _UNBILLED_KEYS:  # tool_calls, function_call, ...
            total += _json_bound(value, rules)
    return total


def _content_bound(content: Any, rules: _Rules, depth: int) -> int:
    """A message's content: a string, or a list of parts/blocks (OpenAI and Anthropic alike)."""
    if isinstance(content, str):
        return rules.count_text(content)
    if content is None:
        return 0
    if depth < _MAX_NESTING:
        if isinstance(content, list):
            return sum(_part_bound(part, rules, depth + 1) for part in content)
        if isinstance(content, dict):
            return _part_bound(content, rules, depth + 1)
    return _json_bound(content, rules)


def _part_bound(part: Any, rules: _Rules, depth: int) -> int:
    if not isinstance(part, dict):
        return _content_bound(part, rules, depth) if isinstance(part, str) else _json_bound(part, rules)
    kind = part.get("type")
    kind = kind if isinstance(kind, str) else None
    if kind in _IMAGE_PARTS:
        return rules.image
    if kind in _FILE_PARTS:
        return DOCUMENT_TOKEN_BOUND
    if kind == "document":
        return _document_bound(part, rules, depth)
    if kind == "input_audio":
        return _audio_bound(part.get("input_audio"))
    # text, tool_use, tool_result, thinking, refusal and anything unknown: every value the provider may read
    total = 0
    for key, value in part.items():
        if isinstance(value, str):
            total += 0 if key in _UNBILLED_KEYS else rules.count_text(value)
        elif key == "content":  # a tool result's own blocks, which may hold images
            total += _content_bound(value, rules, depth)
        elif value is not None and key not in _UNBILLED_KEYS:  # a tool call's input, citations, ...
            total += _json_bound(value, rules)
    return total


def _document_bound(block: dict, rules: _Rules, depth: int) -> int:
    """Anthropic's document block: plain text and custom content are read as text, PDFs as pages."""
    total = sum(rules.count_text(block[key]) for key in ("title", "context") if isinstance(block.get(key), str))
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            return total + rules.count_text(source["data"])
        if source.get("type") == "content":
            return total + _content_bound(source.get("content"), rules, depth)
    return total + DOCUMENT_TOKEN_BOUND


def _audio_bound(audio: Any) -> int:
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str):
        return _json_size(audio) // AUDIO_BYTES_PER_TOKEN + 1
    return len(data) * 3 // 4 // AUDIO_BYTES_PER_TOKEN + 1  # base64: 4 characters carry 3 bytes


def _tools_bound(tools: Any, rules: _Rules) -> int:
    total = rules.tool_prompt
    if not isinstance(tools, list):
        return total + _json_bound(tools, rules)
    for tool in tools:
        total += _json_bound(tool, rules)
        if isinstance(tool, dict) and _is_builtin_tool(tool):
            total += BUILTIN_TOOL_TOKEN_BOUND
    return total


def _is_builtin_tool(tool: dict) -> bool:
    kind = tool.get("type")
    return isinstance(kind, str) and kind not in ("function", "custom") and "input_schema" not in tool


def _embedding_bound(value: Any, rules: _Rules) -> int:
    """A string, a list of strings, a list of token ids (one input) or a list of such lists."""
    if isinstance(value, str):
        return rules.per_embedding_input + rules.count_text(value)
    if not isinstance(value, list):
        return 0 if value is None else rules.per_embedding_input + _json_bound(value, rules)
    total, token_ids = 0, False
    for item in value:
        if _is_int(item):
            total, token_ids = total + 1, True
        elif isinstance(item, str):
            total += rules.per_embedding_input + rules.count_text(item)
        elif isinstance(item, list):
            total += rules.per_embedding_input + sum(1 if _is_int(x) else _json_bound(x, rules) for x in item)
        else:
            total += rules.per_embedding_input + _json_bound(item, rules)
    return total + (rules.per_embedding_input if token_ids else 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ pieces of unknown shape, as JSON


def _json_bound(value: Any, rules: _Rules) -> int:
    """A piece whose rendering is unknown counts as its JSON. An OpenAI-compatible server of unknown make
    may render it through Jinja's tojson (Llama 3.1: indent 4, non-ASCII and <>&' escaped as \\uXXXX), so
    there it counts as that, in bytes."""
    if isinstance(value, str):
        return rules.count_text(value)
    if rules.template_json:
        try:
            text = json.dumps(value, indent=4, default=str)
        except Exception:  # what json.dumps refuses: huge ints, cycles, nesting past the recursion limit
            return 6 * _json_size(value) + TEXT_START_TOKENS  # every character escaped: the worst case
        html_escaped = text.count("<") + text.count(">") + text.count("&") + text.count("'")
        return len(text) + 5 * html_escaped + TEXT_START_TOKENS
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except Exception:  # as above
        return _json_size(value) + TEXT_START_TOKENS
    return rules.count_text(text)


def _json_size(value: Any) -> int:
    """About the UTF-8 bytes of `value` as compact JSON, without recursion, for what json.dumps refuses."""
    total, stack, seen = 0, [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += _utf8_length(item) + 3  # quotes and a separator
        elif isinstance(item, bool) or item is None:
            total += 6
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 3  # str() of a huge int raises; a decimal digit holds > 3 bits
        elif isinstance(item, float):
            total += 26
        elif isinstance(item, (dict, list, tuple, set, frozenset)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            total += 2
            stack.extend(_flatten(item) if isinstance(item, dict) else item)
        else:
            try:
                total += _utf8_length(str(item)) + 3
            except Exception:  # a hostile __str__: its text is not what a provider reads anyway
                total += 64
    return total


def _flatten(mapping: dict) -> list:
    return [part for pair in mapping.items() for part in pair]


# ------------------------------------------------------------------ output


class TokenFieldError(ValueError):
    """An output-limit field the relay refuses; `code` is the relay's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def output_token_bound(payload: dict, *, endpoint: str, model_max_output: int) -> int:
    """At least the output tokens the provider will bill: the largest limit field the client sent (a
    provider may honour any of them), or the model's own limit when none, for each of the n choices.
    Predicted-output text counts too, since OpenAI bills rejected prediction tokens as output."""
    if endpoint == _EMBEDDINGS:
        return 0
    if not isinstance(payload, dict):
        return model_max_output
    limits = [value for value in (payload.get(field) for field in OUTPUT_LIMIT_FIELDS) if _is_int(value) and value >= 1]
    per_choice = max(limits) if limits else model_max_output
    prediction = payload.get("prediction")
    if prediction is not None:
        per_choice += _content_bound(prediction.get("content"), _BYTE_RULES, 0) if isinstance(prediction, dict) \
            else _json_bound(prediction, _BYTE_RULES)
    choices = payload.get("n")
    return per_choice * (choices if _is_int(choices) and choices >= 1 else 1)


def validate_output_fields(payload: dict, *, endpoint: str, model_max_output: int) -> None:
    """Refuse output limits a provider would refuse or that the hold could not bound: each one present must
    be a positive integer within the model's limit, and n an integer from 1 to MAX_CHOICES. Anthropic's
    Messages API requires max_tokens. A null counts as absent."""
    if endpoint == _EMBEDDINGS:
        return
    if not isinstance(payload, dict):
        raise TokenFieldError("invalid_request", "the request body must be a JSON object")
    if endpoint == _MESSAGES and payload.get("max_tokens") is None:
        raise TokenFieldError("invalid_request", "'max_tokens' is required: an integer")
    for field in OUTPUT_LIMIT_FIELDS:
        value = payload.get(field)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise TokenFieldError("invalid_request", f"'{field}' must be a positive integer")
        if value > model_max_output:
            shown = value if value.bit_length() <= 64 else "(a huge number)"  # str() of a huge int raises
            raise TokenFieldError("max_tokens_too_large",
                                  f"'{field}' {shown} is over this model's limit of {model_max_output}")
    choices = payload.get("n")
    if choices is not None and not (_is_int(choices) and 1 <= choices <= MAX_CHOICES):
        raise TokenFieldError("invalid_request", f"'n' must be an integer from 1 to {MAX_CHOICES}")
