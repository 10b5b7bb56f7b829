"""Every refusal the relay can give: HTTP status, stable code and error type, in one table."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Refusal:
    status: int
    type: str


# code -> (status, OpenAI error type). Codes are part of the API: clients match on them; never rename one.
REFUSALS: dict[str, Refusal] = {
    "missing_api_key": Refusal(401, "authentication_error"),
    "invalid_api_key": Refusal(401, "authentication_error"),
    "key_inactive": Refusal(401, "authentication_error"),
    "key_suspended": Refusal(401, "authentication_error"),
    "key_expired": Refusal(401, "authentication_error"),
    "key_revoked": Refusal(401, "authentication_error"),
    "invalid_actor": Refusal(401, "authentication_error"),
    "unknown_actor": Refusal(403, "permission_error"),
    "ip_not_allowed": Refusal(403, "permission_error"),
    "model_not_allowed": Refusal(403, "permission_error"),
    "grant_expired": Refusal(403, "permission_error"),
    "grant_suspended": Refusal(403, "permission_error"),
    "model_not_found": Refusal(404, "invalid_request_error"),
    "not_found": Refusal(404, "invalid_request_error"),
    "method_not_allowed": Refusal(405, "invalid_request_error"),
    "invalid_json": Refusal(400, "invalid_request_error"),
    "invalid_request": Refusal(400, "invalid_request_error"),
    "max_tokens_too_large": Refusal(400, "invalid_request_error"),
    "unsupported_parameter": Refusal(400, "invalid_request_error"),
    "request_too_large": Refusal(413, "invalid_request_error"),
    "request_timeout": Refusal(408, "invalid_request_error"),
    "rate_limit_exceeded": Refusal(429, "rate_limit_error"),
    "budget_exceeded": Refusal(429, "insufficient_quota"),
    "overloaded": Refusal(503, "api_error"),
    "service_unavailable": Refusal(503, "api_error"),
    "limits_unavailable": Refusal(503, "api_error"),
    "budget_unverifiable": Refusal(503, "api_error"),
    "upstream_rejected": Refusal(400, "invalid_request_error"),
    "upstream_error": Refusal(502, "api_error"),
    "upstream_timeout": Refusal(504, "api_error"),
    "internal_error": Refusal(500, "api_error"),
}


@dataclass
class RelayError(Exception):
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.code not in REFUSALS:
            raise ValueError(f"unknown relay error code {self.code!r}")

    @property
    def status(self) -> int:
        return REFUSALS[self.code].status

    def body(self, *, anthropic: bool = False) -> dict:
        """OpenAI's error shape; for /v1/messages also Anthropic's top-level "type": "error", so both SDKs parse it."""
        error = {"message": self.message, "type": REFUSALS[self.code].type, "code": self.code, "param": None}
        return {"type": "error", "error": error} if anthropic else {"error": error}
