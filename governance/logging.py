"""Logging filters: attach the request id, and redact anything that looks like a secret."""
import logging
import re

from governance.context import request_id_var

# Tollgate keys, bearer tokens, provider keys (sk-..., sk-ant-...), Fernet tokens and webhook signing secrets.
SECRET_PATTERN = re.compile(
    r"(tg_(?:[lt]|api)_[0-9A-Za-z]{20,}|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}|sk-[A-Za-z0-9_-]{8,}|gAAAAA[A-Za-z0-9_=-]{20,}"
    r"|whsec_[A-Za-z0-9_-]{20,})"
)
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    return SECRET_PATTERN.sub(REDACTED, text)


MIN_ECHO = 6  # shorter runs of a key's characters are as likely to be anything else


def scrub(text: str, *secrets: str) -> str:
    """`text` with the patterns above redacted, and with these actual secret values (a provider's key, in
    any format: Azure's are 32 hex digits, which no pattern can tell from an id) removed, whole or in part:
    any run of MIN_ECHO or more of their characters that the text echoes ("key ending in ...d1e2f3")."""
    text = redact(text)
    for secret in secrets:
        if not secret or len(secret) < MIN_ECHO:
            continue
        for length in range(len(secret), MIN_ECHO - 1, -1):
            for start in range(len(secret) - length + 1):
                piece = secret[start:start + length]
                if piece in text:
                    text = text.replace(piece, REDACTED)
    return text


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or request_id_var.get()
        return True


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class RedactSecretsFilter(logging.Filter):
    """Renders the message once, redacted, so no handler can print a secret passed as an argument; and every
    extra field too (django.request's `request` carries the full path, query string included), rendered as
    the JSON formatter would render it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        for name, value in list(vars(record).items()):
            if name in _STANDARD or value is None or isinstance(value, (int, float, bool)):
                continue
            text = value if isinstance(value, str) else str(value)
            redacted = redact(text)
            if redacted != text:
                setattr(record, name, redacted)
        return True
