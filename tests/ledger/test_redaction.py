"""Redaction of stored bodies against a corpus: what must go, what must survive, and the body stays JSON."""
import json

import pytest

from ledger.redaction import redact_body

MUST_GO = [
    ("Please charge my card:\n4111111111111111", "[CARD]"),
    ("card 4111 1111 1111 1111 exp 12/29", "[CARD]"),
    ("amex 3782-822463-10005", "[CARD]"),
    ("write to\nbob@example.com today", "[EMAIL]"),
    ("cc: first.last+tag@mail.example.co.uk", "[EMAIL]"),
    ("call +44 20 7946 0958", "[PHONE]"),
    ("ring +33 1 23 45 67 89", "[PHONE]"),
    ("ring +49 30 1234567", "[PHONE]"),
    ("US office (555) 123-4567", "[PHONE]"),
    ("call me:\n555.123.4567", "[PHONE]"),
    ("my key sk-abc12", "[SECRET]"),
    ("anthropic sk-ant-api03-abcdefghijkl", "[SECRET]"),
    ("tollgate tg_l_" + "A" * 49, "[SECRET]"),
    ("Authorization: Bearer abc.def-ghi_jkl", "[SECRET]"),
    ("aws AKIAIOSFODNN7EXAMPLE", "[SECRET]"),
    ("google AIzaSyA-1234567890abcdefghijklmnopqrstu", "[SECRET]"),
    ("azure api-key: 3f9a1c2b7d4e8f6a0b1c2d3e4f5a6b7c", "[SECRET]"),
]
MUST_SURVIVE = [
    "at 2026-12-02T08:30:00Z the job ran",
    "unix time 1732370000 and 1732370000123",
    "order 1234-5678-9012-3456 shipped",  # 16 digits, Luhn fails: an order number
    "4111-1111-1111-1112 is not a valid card",
    "used 512 prompt tokens and 1,024 completion tokens",
    "version 3.11.7 on build 20261202",
    "invoice INV-2026-000123",
    "room 12-34, floor 5",
    "request id 9f86d081884c7d659a2feaa0c55ad015",  # 32 hex, not named as a key
    "price $4111.11 for 12 units",
]


@pytest.mark.parametrize("text, marker", MUST_GO)
def test_what_must_go_goes(text, marker):
    stored = json.loads(redact_body(json.dumps({"messages": [{"role": "user", "content": text}]})))
    content = stored["messages"][0]["content"]
    assert marker in content, content


@pytest.mark.parametrize("text", MUST_SURVIVE)
def test_what_must_survive_survives(text):
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 512})
    assert json.loads(redact_body(body)) == json.loads(body)


def test_the_stored_body_stays_valid_json_with_newlines_quotes_and_unicode():
    body = json.dumps({"content": 'line one\n"quoted" bob@example.com\tat 12:30 — ünïcode ✓', "n": 1})
    stored = redact_body(body)
    assert json.loads(stored) == {"content": 'line one\n"quoted" [EMAIL]\tat 12:30 — ünïcode ✓', "n": 1}


def test_keys_and_numbers_of_the_json_are_left_alone():
    body = json.dumps({"model": "gpt-4o", "max_tokens": 4111111111111111, "stop": ["\n"], "user": "u-1"})
    assert json.loads(redact_body(body)) == json.loads(body)


def test_text_that_is_not_json_is_redacted_as_text():
    assert redact_body("plain bob@example.com") == "plain [EMAIL]"
