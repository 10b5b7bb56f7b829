"""The relay's checks, in the order the API promises: key (and a signed actor), source IP, request, model
and grants, rate limits, budget. Each refusal is a RelayError with its own code."""
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from budgets import alerts, enforcement
from budgets.enforcement import BudgetRefused, Reservation
from gateway import admission, catalog, providers, tokens
from gateway.catalog import Route
from gateway.errors import RelayError
from gateway.models import ModelAlias
from gateway.pricing import cost_of
from governance.models import Person
from keys.actor import ActorError, verify_actor
from keys.models import VirtualKey
from keys.selectors import actor_member, key_by_secret
from ledger.services import CallRecord

log = logging.getLogger(__name__)

TAG_NAMES = ("project", "feature", "environment", "experiment")
CHAT, MESSAGES, EMBEDDINGS, MODELS = "chat", "messages", "embeddings", "models"
_KEY_STATUS_REFUSALS = {
    VirtualKey.Status.PENDING: ("key_inactive", "this key is not active yet"),
    VirtualKey.Status.SUSPENDED: ("key_suspended", "this key is suspended"),
    VirtualKey.Status.EXPIRED: ("key_expired", "this key has expired"),
    VirtualKey.Status.REVOKED: ("key_revoked", "this key has been revoked"),
}



@dataclass
class RelayCall:
    endpoint: str
    headers: Mapping[str, str]
    body: bytes
    content_length: int
    client_ip: str | None
    request_id: str


def _presented_secret(headers: Mapping[str, str]) -> str:
    authorization = headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return headers.get("x-api-key", "").strip()


def authenticate(headers: Mapping[str, str], record: CallRecord) -> VirtualKey:
    secret = _presented_secret(headers)
    if not secret:
        raise RelayError("missing_api_key", "no API key: send 'Authorization: Bearer tg_...' or 'x-api-key: tg_...'")
    key = key_by_secret(secret)
    if key is None:
        raise RelayError("invalid_api_key", "the API key is not valid")
    record.key, record.person, record.team = key, key.person, key.team
    record.cost_center = key.team.cost_center
    if key.status in _KEY_STATUS_REFUSALS:
        raise RelayError(*_KEY_STATUS_REFUSALS[key.status])
    if key.expires_at is not None and key.expires_at <= timezone.now():
        raise RelayError("key_expired", "this key has expired")
    if not key.team.is_active or (key.person is not None and not key.person.is_active):
        raise RelayError("key_inactive", "the key's team or owner is no longer active")
    if "X-Tollgate-Actor" in headers:
        record.person, actor_tags = resolve_actor(key, headers)
        record.tags.update(actor_tags)
    return key


def resolve_actor(key: VirtualKey, headers: Mapping[str, str]) -> tuple[Person, dict]:
    """A service key's signed X-Tollgate-Actor names the person the call is for; their limits then apply."""
    if not key.is_service_key:
        raise RelayError("invalid_actor", "only service keys may send X-Tollgate-Actor")
    try:
        claims = verify_actor(key.signing_secret, headers["X-Tollgate-Actor"], headers.get("X-Tollgate-Actor-Signature", ""))
    except ActorError as exc:
        raise RelayError(exc.code, exc.message) from None
    person = actor_member(key.team, claims.user)
    if person is None:
        raise RelayError("unknown_actor", f"'{claims.user}' is not an active member of the key's team")
    tags = {name: value for name, value in (("feature", claims.feature), ("environment", claims.environment)) if value}
    return person, tags


def _ip_allowed(client_ip: str | None, allowlist: list[str]) -> bool:
    if not allowlist:
        return True
    if not client_ip:
        return False
    address = ipaddress.ip_address(client_ip)
    return any(address in ipaddress.ip_network(cidr, strict=False) for cidr in allowlist)


def check_ip(key: VirtualKey, client_ip: str | None) -> None:
    for holder, allowlist in (("key", key.ip_allowlist), ("team", key.team.ip_allowlist)):
        if not _ip_allowed(client_ip, allowlist):
            raise RelayError("ip_not_allowed", f"calls from {client_ip} are not allowed by the {holder}'s IP allowlist")


def parse_body(call: RelayCall) -> dict:
    if call.content_length > settings.TOLLGATE_MAX_BODY_BYTES:
        raise RelayError("request_too_large", f"request body over {settings.TOLLGATE_MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(call.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RelayError("invalid_json", "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise RelayError("invalid_json", "the request body must be a JSON object")
    if _too_deep(payload):
        raise RelayError("invalid_request", f"the request body is nested more than {MAX_NESTING} levels deep")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise RelayError("invalid_request", "'model' is required")
    return payload


MAX_NESTING = 64  # no API shape nests deeper; deeper would only exhaust the recursion of what reads it


def _too_deep(value, limit: int = MAX_NESTING) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


# Fields whose JSON type the relay checks before anything reads them: a wrong one is the client's error
# (400), never the relay's (500). name -> (types allowed, what the message says).
_FIELD_TYPES = {
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "metadata": ((dict,), "an object"),
    "tools": ((list,), "a list of objects"),
}
_MESSAGES_FIELD_TYPES = {
    "system": ((str, list), "a string or a list of content blocks"),
    "stop_sequences": ((list,), "a list of strings"),
    "tool_choice": ((dict,), "an object"),
}
_CHAT_FIELD_TYPES = {
    "stop": ((str, list), "a string or a list of strings"),
    "tool_choice": ((str, dict), "a string or an object"),
}


def _check_shape(payload: dict, endpoint: str) -> None:
    fields = {**_FIELD_TYPES, **(_MESSAGES_FIELD_TYPES if endpoint == MESSAGES else _CHAT_FIELD_TYPES)}
    for name, (types, described) in fields.items():
        value = payload.get(name)
        if value is not None and not isinstance(value, types):
            raise RelayError("invalid_request", f"'{name}' must be {described}")
    for name in ("tools", "system"):
        if isinstance(payload.get(name), list) and not all(isinstance(item, dict) for item in payload[name]):
            raise RelayError("invalid_request", f"'{name}' must hold objects only")
    for name in ("stop", "stop_sequences"):
        if isinstance(payload.get(name), list) and not all(isinstance(item, str) for item in payload[name]):
            raise RelayError("invalid_request", f"'{name}' must hold strings only")
    for message in payload["messages"]:
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RelayError("invalid_request", "a message's 'content' must be a string or a list of content parts")
        if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
            raise RelayError("invalid_request", "a message's content parts must be objects")


def allowed_alias_ids(key: VirtualKey) -> set[int] | None:
    """The intersection of the key's and the team's allowlists; None when neither restricts. Reads the
    allowlists prefetched with the key (keys.selectors.key_by_secret), so no query on the relay's path."""
    allowed = None
    for ids in (
        {alias.pk for alias in key.allowed_models.all()},
        {alias.pk for alias in key.team.allowed_models.all()},
    ):
        if ids:
            allowed = ids if allowed is None else allowed & ids
    return allowed


def resolve_model(payload: dict, key: VirtualKey, endpoint: str, record: CallRecord) -> Route:
    name = payload["model"]
    record.model_requested = name
    route = catalog.route_for(name)
    if route is None:
        raise RelayError("model_not_found", f"the model '{name}' does not exist in the catalog")
    record.alias = route.alias
    allowed = allowed_alias_ids(key)
    if allowed is not None and route.alias.pk not in allowed:
        raise RelayError("model_not_allowed", f"this key may not use the model '{name}'")
    wanted_kind = ModelAlias.Kind.EMBEDDING if endpoint == EMBEDDINGS else ModelAlias.Kind.CHAT
    if route.alias.kind != wanted_kind:
        raise RelayError("invalid_request", f"'{name}' is a {route.alias.kind} model and cannot serve this endpoint")
    return route


def _embedding_input_ok(given) -> bool:
    if isinstance(given, str):
        return True
    def ids(items) -> bool:
        return bool(items) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items)
    return all(isinstance(item, str) for item in given) or ids(given) or all(
        isinstance(item, list) and ids(item) for item in given)


def check_request(payload: dict, route: Route, endpoint: str) -> None:
    if endpoint == EMBEDDINGS:
        given = payload.get("input")
        if not isinstance(given, (str, list)) or not given or not _embedding_input_ok(given):
            raise RelayError("invalid_request", "'input' is required: a string, a list of strings, a list of token "
                             "ids or a list of lists of token ids")
        return
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RelayError("invalid_request", "'messages' is required: a non-empty list of message objects")
    _check_shape(payload, endpoint)
    try:
        tokens.validate_output_fields(payload, endpoint=endpoint, model_max_output=route.max_output_tokens)
    except tokens.TokenFieldError as exc:
        raise RelayError(exc.code, exc.message) from None


def collect_tags(key: VirtualKey, headers: Mapping[str, str], payload: dict, actor_tags: dict) -> dict:
    """Key defaults, then the signed actor's, then the X-Tollgate-Tags header (k=v,k=v or a JSON object),
    then body metadata."""
    tags = {k: v for k, v in (key.default_tags or {}).items() if k in TAG_NAMES}
    tags.update(actor_tags)
    header = headers.get("X-Tollgate-Tags", "").strip()
    if header:
        try:
            given = json.loads(header) if header.startswith("{") else dict(
                part.split("=", 1) for part in header.split(",") if "=" in part
            )
        except (ValueError, RecursionError):
            given = None
        if not isinstance(given, dict) or not all(isinstance(v, (str, int, float)) for v in given.values()):
            raise RelayError("invalid_request", "X-Tollgate-Tags must be 'name=value,...' or a JSON object of strings")
        tags.update({k.strip(): str(v).strip() for k, v in given.items() if k.strip() in TAG_NAMES})
    metadata = payload.get("metadata")
    if isinstance(metadata, dict):
        if any(not isinstance(metadata[k], (str, int, float)) for k in TAG_NAMES if k in metadata):
            raise RelayError("invalid_request", f"'metadata' tags ({', '.join(TAG_NAMES)}) must be strings")
        tags.update({k: str(metadata.pop(k)) for k in TAG_NAMES if k in metadata})
        if not metadata:
            payload.pop("metadata")
    return {k: v[:64] for k, v in tags.items() if v}


def admit_and_reserve(key: VirtualKey, grants: list, payload: dict, route: Route, record: CallRecord,
                      endpoint: str) -> tuple[admission.Admitted, Route]:
    """Rate limits (step 5), then the budget hold (step 6): one round trip (gateway.admission). A production
    grant set to downgrade re-routes a premium model to its cheaper one and holds once more before refusing."""
    hold = hold_for(payload, route, endpoint)
    call = (record.request_id, record.created_at)
    try:
        admitted = admission.admit(key=key, person=record.person, team=key.team, grants=grants, cost=hold.cost,
                                   tokens=hold.tokens, call=call)
    except admission.Refused as refused:
        exc, grant = refused.refusal, refused.refusal.grant
        downgrade = (exc.code == "budget_exceeded" and grant is not None and grant.grant_class == grant.GrantClass.PRODUCTION
                     and grant.on_cap == grant.OnCap.DOWNGRADE and grant.downgrade_to is not None
                     and route.alias.tier == ModelAlias.Tier.PREMIUM)
        cheaper = catalog.route_for(grant.downgrade_to.name) if downgrade else None
        if cheaper is None:
            if exc.code == "budget_exceeded" and grant is not None:
                alerts.cap_reached(grant)
            raise RelayError(exc.code, exc.message) from None
        check_request(payload, cheaper, endpoint)
        hold = hold_for(payload, cheaper, endpoint)
        try:
            admitted = admission.hold_again(refused.limits, key=key, grants=grants, cost=hold.cost, tokens=hold.tokens,
                                            call=call)
        except admission.Refused as again:
            raise RelayError(again.refusal.code, again.refusal.message) from None
        record.alias, route = cheaper.alias, cheaper
        record.detail = f"downgraded from '{payload['model']}' to '{cheaper.alias.name}' by grant '{grant.name}'"
    _record_reservation(admitted.hold, record)
    return admitted, route


def estimate_input_tokens(payload: dict) -> int:
    """A rough estimate (3 characters a token) of the input of a stream cut before the provider reported
    its usage. Never used for holds: `hold_for` is an upper bound."""
    text = json.dumps(payload.get("messages") or payload.get("input") or "", ensure_ascii=False)
    return len(text) // 3 + 1


@dataclass(frozen=True)
class Hold:
    """What a call holds on its budgets before it is forwarded: an upper bound on what settle can charge,
    whichever of the model's deployments serves it (gateway.tokens)."""

    cost: Decimal
    tokens: int


def hold_for(payload: dict, route: Route, endpoint: str) -> Hold:
    output = tokens.output_token_bound(payload, endpoint=endpoint, model_max_output=route.max_output_tokens)
    now = timezone.now()
    cost, most_tokens = Decimal(0), 0
    for target in route.targets:
        wire = providers.wire_format(target.provider)
        given = tokens.input_token_bound(payload, wire=wire, model_name=target.provider_model.name, endpoint=endpoint)
        price = target.price_at(now)
        # All of the input may be written to the prompt cache, at a higher rate than plain input.
        cost = max(cost, cost_of(price, input_tokens=given, output_tokens=output),
                   cost_of(price, input_tokens=given, output_tokens=output, cache_write_tokens=given))
        most_tokens = max(most_tokens, given + output)
    return Hold(cost, most_tokens)


def check_grants(key: VirtualKey, route: Route, record: CallRecord) -> list:
    """The grants this call is charged to; an expired or suspended one, or one whose allowlist excludes the
    model, refuses it here, before any limit is counted."""
    grants = enforcement.covering_grants(key=key, person=record.person, team=key.team, tags=record.tags)
    try:
        enforcement.check_grants(grants, route.alias)
    except BudgetRefused as exc:
        raise RelayError(exc.code, exc.message) from None
    record.grant = grants[0] if grants else None
    return grants


def _record_reservation(reservation: Reservation, record: CallRecord) -> None:
    record.grant_path = reservation.grant_path
    if reservation.unverified:
        record.detail = "budget unverified: counters unreachable, admitted by production grants' policy"
        alerts.alert_unverified(reservation.grants)
    for grant in reservation.over_cap:
        alerts.page_over_cap(grant)


TOUCH_EVERY_SECONDS = 60


class _UsageMarks:
    """last_used_at without a write per call or per key: the keys this process served are written together,
    in one UPDATE, at most once a minute (the first at once). A key's last_used_at is therefore up to a
    minute behind; it is only read by reports of unused keys, in days. The ledger has every call exactly."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: set[int] = set()
        self.written_at = -float("inf")

    def mark(self, key_id: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.pending.add(key_id)
            if now - self.written_at < TOUCH_EVERY_SECONDS:
                return
            ids, self.pending, self.written_at = self.pending, set(), now
        self._write(ids)

    def flush(self) -> None:
        with self.lock:
            ids, self.pending = self.pending, set()
        if ids:
            self._write(ids)

    @staticmethod
    def _write(ids: set[int]) -> None:
        try:
            VirtualKey.objects.filter(pk__in=ids).update(last_used_at=timezone.now())
        except DatabaseError:  # a report's hint, not worth refusing a call the database cannot serve meanwhile
            log.warning("could not record that %d keys were used (database unavailable)", len(ids))


_usage = _UsageMarks()
flush_usage_marks = _usage.flush  # at a worker's exit (governance/gunicorn_conf.py)


def touch_key(key: VirtualKey) -> None:
    _usage.mark(key.pk)
