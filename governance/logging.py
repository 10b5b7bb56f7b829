"""Logging filters: attach the request id, and redact anything that looks like a secret."""
import logging
import re

from governance.context import request_id_var

# Tollgate keys, bearer tokens, provider keys (sk-..., sk-ant-...) and Fernet tokens.
SECRET_PATTERN = re.compile(
    r"(tg_[lt]_[0-9A-Za-z]{20,}|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}|sk-[A-Za-z0-9_-]{8,}|gAAAAA[A-Za-z0-9_=-]{20,})"
)
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    return SECRET_PATTERN.sub(REDACTED, text)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or request_id_var.get()
        return True


class RedactSecretsFilter(logging.Filter):
    """Renders the message once, redacted, so no handler can print a secret passed as an argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
