"""Redaction of stored prompts and responses: e-mail addresses, phone numbers, card numbers and secrets.

Redaction runs on the parsed body, on every string in it, never on serialized JSON (where a newline is the
two characters `\\n`, so "\\n4111..." hid a card behind the letter n, and a replacement could break the JSON):
what is stored stays valid JSON. A body that is not JSON is redacted as text. Card numbers are replaced only
when their Luhn check digit holds, phone numbers only in a telephone's shape (an international +CC number,
or a 3-3-4 national one with separators), so timestamps, dates, order numbers and token counts survive.
"""
import json
import re

from governance.logging import SECRET_PATTERN

EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w])")
CARD = re.compile(r"(?<![\w.])\d(?:[ -]?\d){12,18}(?![\w.])")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,5}"  # +CC and its groups: +44 20 7946 0958, +1 (555) 123-4567
    r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}"  # national, with separators: (555) 123-4567, 555.123.4567
    r")(?![\w])"
)
SECRETS = [
    (SECRET_PATTERN, "[SECRET]"),  # Tollgate keys, bearer tokens, OpenAI/Anthropic keys, Fernet tokens
    (re.compile(r"(?<![\w-])sk-(?:ant-|proj-)?[A-Za-z0-9_-]{3,}"), "[SECRET]"),  # provider keys, short ones too
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "[SECRET]"),  # AWS (Bedrock)
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), "[SECRET]"),  # Google (Gemini, Vertex)
    (re.compile(r"\b(?:ghp|gho|ghu|ghs|github_pat|xox[abpr])_[A-Za-z0-9_-]{10,}\b"), "[SECRET]"),
    # Azure OpenAI keys are 32 hex digits like any id: masked where they are named as a key.
    (re.compile(r"(?i)(api[-_]?key\W{1,3})[0-9a-f]{32}\b"), r"\1[SECRET]"),
]


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group()


def _phone(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[PHONE]" if 8 <= len(digits) <= 15 else match.group()


def redact_text(text: str) -> str:
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    text = EMAIL.sub("[EMAIL]", text)
    text = CARD.sub(_card, text)
    return PHONE.sub(_phone, text)


def _walk(value):
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_walk(item) for item in value]
    if isinstance(value, dict):
        return {key: _walk(item) for key, item in value.items()}
    return value


def redact_body(text: str) -> str:
    """A stored request or response, redacted string by string; still valid JSON when it was JSON."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return redact_text(text)
    return json.dumps(_walk(data), ensure_ascii=False)
