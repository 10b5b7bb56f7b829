"""One call from start to ledger entry: run the checks, forward (with fallback), settle, record."""
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from django.db import DatabaseError
from django.db import connection as db_connection
from psycopg_pool import PoolTimeout

from gateway import admission, catalog, providers, translate
from gateway.catalog import Target
from gateway.errors import RelayError
from gateway.pricing import cost_of
from gateway.relay.checks import (
    CHAT,
    EMBEDDINGS,
    MESSAGES,
    MODELS,
    RelayCall,
    admit_and_reserve,
    allowed_alias_ids,
    authenticate,
    check_grants,
    check_ip,
    check_request,
    collect_tags,
    parse_body,
    resolve_model,
    touch_key,
)
from gateway.relay.wire import StreamConverter, client_response, upstream_payload
from governance import stamps
from governance.models import BodyLogging
from keys.models import VirtualKey
from ledger.models import LedgerEntry
from ledger.services import CallRecord, ledger_call_opened, ledger_record_submit

log = logging.getLogger(__name__)


@dataclass
class RelayResult:
    status: int
    body: dict | None = None
    stream: Iterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def handle(call: RelayCall) -> RelayResult:
    """Answer one call. Whatever happens, the call ends in exactly one ledger row: its identity (request
    id and start time) is fixed here, journaled before anything else (ledger.journal), and written once."""
    record = _new_record(call)
    ledger_call_opened(record)
    try:
        # The keys and grants in memory are trusted on the stamps this process saw last, confirmed in the
        # round trip that counts the call (governance.stamps); if they moved, the call starts again on
        # the current ones, having counted nothing, as the same call (same identity, one row).
        try:
            with stamps.pinned(assume_last=True):
                return _handle(call, record)
        except stamps.Stale:
            record = _new_record(call, created_at=record.created_at)
            with stamps.pinned():
                return _handle(call, record)
    except Exception:
        log.exception("relay failed on request %s", call.request_id)
        error = RelayError("internal_error", "Tollgate could not handle this call; it has been logged")
        if record.finished:  # written already: answer the error, never write the call twice
            return RelayResult(error.status, body=error.body(anthropic=call.endpoint == MESSAGES))
        return refuse(record, error, call.endpoint == MESSAGES)


def refuse_unrouted(call: RelayCall, error: RelayError) -> RelayResult:
    """A call to /v1 that no endpoint takes (an unknown path, a method an endpoint does not allow): refused,
    and ledgered like every other call."""
    record = _new_record(call)
    ledger_call_opened(record)
    return refuse(record, error, call.endpoint == MESSAGES)


def _new_record(call: RelayCall, created_at=None) -> CallRecord:
    record = CallRecord(request_id=call.request_id, client_ip=call.client_ip, started=time.perf_counter())
    if created_at is not None:
        record.created_at = created_at
    return record


def _handle(call: RelayCall, record: CallRecord) -> RelayResult:
    anthropic_client = call.endpoint == MESSAGES
    try:
        key = authenticate(call.headers, record)
        check_ip(key, call.client_ip)
        if call.endpoint == MODELS:
            stamps.verify()
            return list_models(key, record)
        payload = parse_body(call)
        record.tags = collect_tags(key, call.headers, payload, record.tags)
        route = resolve_model(payload, key, call.endpoint, record)
        grants = check_grants(key, route, record)
        check_request(payload, route, call.endpoint)
        record.body_mode = key.effective_body_logging
        if record.body_mode != BodyLogging.OFF:
            record.request_text = call.body.decode("utf-8", "replace")
        # Reads are done: give the connection back before admission, which may wait (a counter being rebuilt
        # by another call, which needs a connection to read the ledger) and, once admitted, on the provider.
        release_db_connection()
        admitted, route = admit_and_reserve(key, grants, payload, route, record, call.endpoint)
        try:
            touch_key(key)
            ledger_call_opened(record)  # with what admission learned: who, which grants, which model
            release_db_connection()
        except BaseException:
            admission.release(admitted)
            raise
        client_format = providers.WIRE_ANTHROPIC if anthropic_client else providers.WIRE_OPENAI
        if payload.get("stream") and call.endpoint != EMBEDDINGS:
            return stream_call(payload, route, client_format, record, admitted)
        return forward_call(payload, route, call.endpoint, client_format, record, admitted)
    except RelayError as error:
        stamps.verify()  # a refusal from what memory holds stands only if memory is current
        return refuse(record, error, anthropic_client)
    except DatabaseError as exc:  # before the provider: nothing was held (admission reads, then holds)
        return refuse(record, _database_refusal(exc), anthropic_client)


def _database_refusal(exc: DatabaseError) -> RelayError:
    """The database could not serve the call's reads: overloaded (no pooled connection in time) or down."""
    release_db_connection()
    if isinstance(exc.__cause__, PoolTimeout):
        return RelayError("overloaded", "Tollgate is overloaded right now; retry shortly", headers={"Retry-After": "1"})
    log.warning("relay: the database could not serve a call's reads (%s)", type(exc).__name__)
    return RelayError("service_unavailable", "Tollgate cannot reach its database right now; retry shortly",
                      headers={"Retry-After": "5"})


def release_db_connection() -> None:
    """Give the call's database connection back before it waits on a provider or the ledger writer: to
    the pool (DATABASE_POOL_MAX_SIZE), or closed when it would not outlive the call anyway. A call then
    holds one only for its reads, so a pool far smaller than the calls in flight serves them all."""
    if db_connection.in_atomic_block or db_connection.connection is None:
        return
    if getattr(db_connection, "pool", None) is not None or not db_connection.settings_dict.get("CONN_MAX_AGE"):
        db_connection.close()


def refuse(record: CallRecord, error: RelayError, anthropic_client: bool) -> RelayResult:
    upstream = error.code.startswith("upstream") or error.code == "internal_error"
    record.outcome = LedgerEntry.Outcome.UPSTREAM_ERROR if upstream else LedgerEntry.Outcome.REFUSED
    record.http_status, record.error_code, record.detail = error.status, error.code, error.message
    finish(record)
    return RelayResult(error.status, body=error.body(anthropic=anthropic_client), headers=error.headers)


def finish(record: CallRecord, *, meanwhile: Callable[[], None] | None = None) -> None:
    """Write the call's ledger row: committed when this returns, or, if the database does not take it in
    time, fsynced in the journal and written when it does (ledger.writer). `meanwhile` (settling the
    counters in Redis) runs while the insert is under way, so the call waits for the slower of the two,
    not both; a counter rebuilt from the ledger in between still counts the call once, because its hold
    carries the call's identity, which the rebuild looks up in the ledger it reads (budgets.enforcement)."""
    record.latency_ms = int((time.perf_counter() - record.started) * 1000)
    written = ledger_record_submit(record)
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        written.wait()


def price(record: CallRecord, target: Target, usage: translate.Usage) -> None:
    """What the call used and cost, at the catalog price in force when it started."""
    record.provider_model = target.provider_model
    record.input_tokens, record.output_tokens, record.cached_tokens = usage.input_tokens, usage.output_tokens, usage.cached_tokens
    record.cost = cost_of(target.price_at(record.created_at), input_tokens=usage.input_tokens,
                          output_tokens=usage.output_tokens, cached_tokens=usage.cached_tokens,
                          cache_write_tokens=usage.cache_write_tokens)


def _send_with_fallback(targets, payload, client_format, endpoint, stream, record):
    """Try each deployment in order; move on after 429, 5xx, timeouts and refused connections. The ledger
    row's detail names every deployment that failed before the one that served (or the last failure)."""
    failure, failed = None, []
    for target in targets:
        if endpoint == EMBEDDINGS and providers.wire_format(target.provider) != providers.WIRE_OPENAI:
            continue
        record.provider_model = target.provider_model
        started = time.perf_counter()
        try:
            upstream = providers.send(target, upstream_payload(payload, target, client_format, stream),
                                      endpoint="embeddings" if endpoint == EMBEDDINGS else "chat", stream=stream)
        except providers.UpstreamFailure as exc:
            failure = exc
            failed.append(f"{target.provider_model.name} ({exc.code})")
            log.warning("upstream %s failed (%s): %s", target.provider_model, exc.code, exc.message)
            if exc.retryable:
                continue
            break
        record.upstream_latency_ms = int((time.perf_counter() - started) * 1000)
        if failed:
            fallback = f"served by {target.provider_model.name} after {', '.join(failed)} failed"
            record.detail = f"{record.detail}; {fallback}" if record.detail else fallback  # after a downgrade, say both
        return target, upstream
    if failure is None:
        raise RelayError("invalid_request", "no deployment of this model can serve this endpoint")
    tried = f" (tried {', '.join(failed)})" if len(failed) > 1 else ""
    raise RelayError(failure.code, f"{failure.message}{tried}")


def settle(record: CallRecord, admitted: admission.Admitted) -> None:
    admission.settle(admitted, cost=record.cost, tokens=record.input_tokens + record.output_tokens)


def forward_call(payload, route, endpoint, client_format, record, admitted) -> RelayResult:
    try:
        target, body = _send_with_fallback(route.targets, payload, client_format, endpoint, False, record)
        try:
            response, usage = client_response(body, target, client_format) if endpoint != EMBEDDINGS else (body, translate.usage_from_openai(body.get("usage")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RelayError("upstream_error", f"{target.provider.name} sent a response Tollgate could not read") from None
    except BaseException:
        admission.release(admitted)
        raise
    price(record, target, usage)
    if record.body_mode != BodyLogging.OFF:
        record.response_text = json.dumps(response, ensure_ascii=False)
    finish(record, meanwhile=lambda: settle(record, admitted))
    return RelayResult(200, body=response, headers={**admitted.headers(), "x-tollgate-model": target.provider_model.name})


def stream_call(payload, route, client_format, record, admitted) -> RelayResult:
    record.streamed = True
    try:
        target, upstream = _send_with_fallback(route.targets, payload, client_format, CHAT, True, record)
    except BaseException:
        admission.release(admitted)
        raise
    converter = StreamConverter(payload, target, client_format, record.request_id)
    headers = {**admitted.headers(), "x-tollgate-model": target.provider_model.name, "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}

    recorded = False

    def close_out() -> None:
        nonlocal recorded
        recorded = True
        price(record, target, converter.usage())
        if record.body_mode != BodyLogging.OFF:
            record.response_text = "".join(converter.text)
        finish(record, meanwhile=lambda: settle(record, admitted))

    def fail(code: str, message: str) -> bytes:
        record.outcome, record.http_status, record.error_code, record.detail = (
            LedgerEntry.Outcome.UPSTREAM_ERROR, 502, code, message)
        close_out()
        return converter.error(RelayError(code, message))

    def body() -> Iterator[bytes]:
        try:
            for event, data in upstream.events:
                if converter.done:
                    continue  # read the upstream to its end, so its connection goes back to the pool
                yield from converter.feed(event, data)
            if not converter.done:
                raise providers.UpstreamFailure("upstream_error", f"{target.provider.name} ended the stream early", retryable=False)
            tail = list(converter.finish())
            close_out()  # the ledger entry exists before the client sees the end of the stream
            yield from tail
        except providers.UpstreamFailure as exc:
            yield fail(exc.code, exc.message)
        except translate.UpstreamStreamError as exc:
            said = providers.scrub_upstream(str(exc), target.provider)[:150]
            yield fail("upstream_error", f"{target.provider.name} sent an error mid-stream: {said}")
        except GeneratorExit:
            record.outcome, record.error_code, record.detail = (
                LedgerEntry.Outcome.CLIENT_ABORT, "client_disconnected", "the client closed the stream")
            raise
        except Exception:
            log.exception("stream relay failed on request %s", record.request_id)
            yield fail("upstream_error", "the stream could not be relayed")
        finally:
            upstream.close()
            if not recorded:
                close_out()

    return RelayResult(200, stream=body(), headers=headers)


def list_models(key: VirtualKey, record: CallRecord) -> RelayResult:
    allowed = allowed_alias_ids(key)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}
        for name, route in sorted(catalog.all_routes().items())
        if allowed is None or route.alias.pk in allowed
    ]
    finish(record)  # every call to /v1 has its row, model lists included
    return RelayResult(200, body={"object": "list", "data": data})

