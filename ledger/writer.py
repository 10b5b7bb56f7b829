"""The ledger's one sink: every relay call's row goes in here, exactly once, whatever fails.

One writer thread per process takes every row queued since its last commit and inserts them with one
multi-row INSERT (group commit: under load many calls share one round trip and one fsync). It has a
database connection of its own (the `ledger` alias: never from the pool), so writing the ledger never
waits behind the calls it records, and no call lends it one.

Every insert is idempotent: `ON CONFLICT (request_id, created_at) DO NOTHING` on the ledger's unique
call identity. So a write whose outcome is unknown (the connection broke mid-commit) is simply tried
again, and so is a row recovered from a journal (ledger.journal) that may already be in. While the
database refuses, the writer keeps its rows and tries again with backoff; the rows are in the process's
journal meanwhile, and a caller that stops waiting (TOLLGATE_LEDGER_WAIT_SECONDS) fsyncs it before it
answers. A row the database rejects for what it holds (not for being unreachable) fails alone, never
its batch: it is kept in `rejected.jsonl` in the spool directory and logged, never dropped.

A row written inside a transaction of the caller's (services, tests) is written on the caller's
connection instead, so it commits or rolls back with that transaction.
"""
import contextlib
import functools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, connections, transaction

from ledger import journal as journals
from ledger.models import CallBody, LedgerEntry

log = logging.getLogger(__name__)

ALIAS = "ledger"  # governance.settings: the default database, on a connection of the writer's own
MAX_BATCH = 256  # rows per INSERT; under any load a batch is far smaller, this only bounds a backlog
IDLE_CHECK_SECONDS = 5.0  # the writer's connection is health-checked before use after this long unused
RECOVER_EVERY_SECONDS = 10.0  # how often a writer looks for journals left by processes that died
RETRY_MAX_SECONDS = 2.0  # the longest pause between two tries while the database refuses

# The ledger columns a call's row fills, in the INSERT's order (ledger.services.call_row builds the row).
COLUMNS = (
    "request_id", "created_at", "key_id", "person_id", "team_id", "grant_id", "grant_path", "cost_center_id",
    "tags", "model_requested", "alias_id", "provider_model_id", "input_tokens", "output_tokens", "cached_tokens",
    "cost", "latency_ms", "upstream_latency_ms", "outcome", "http_status", "error_code", "detail", "client_ip",
    "streamed",
)


@dataclass(eq=False)
class Written:
    """A row handed to the writer. `wait` says whether it was committed in time; either way it is kept."""

    row: dict
    body: dict | None = None
    done: threading.Event = field(default_factory=threading.Event)
    committed: bool = False

    @property
    def key(self) -> str:
        return journals.call_key(self.row)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the row is committed (or known to be in). False when it is not yet, after `timeout`
        (default TOLLGATE_LEDGER_WAIT_SECONDS) or at once while the database is refusing: the journal is
        then fsynced, so the row survives anything and is written when the database takes it."""
        if not self.done.is_set():
            wait = settings.TOLLGATE_LEDGER_WAIT_SECONDS if timeout is None else timeout
            if not _writer.healthy:
                wait = min(wait, 0.05)  # the writer is retrying: the row waits in the journal, not the caller
            if not self.done.wait(wait):
                _writer.journal.sync()
                log.warning("ledger row of request %s kept in the journal until the database takes it (%s)",
                            self.row["request_id"], _writer.describe())
                return False
        return self.committed


class LedgerWriter:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Written | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._stopping = False
        self._last_used = 0.0
        self.healthy = True  # False while the database refuses the writer's inserts
        self.journal = journals.Journal(settings.TOLLGATE_SPOOL_DIR)

    def submit(self, row: dict, body: dict | None = None) -> Written:
        written = Written(row, body)
        self.journal.row(row, body)  # before the queue: from here on the row survives this process
        self._ensure_running()
        self._queue.put(written)
        return written

    def describe(self) -> str:
        thread = self._thread
        return (f"writer {'running' if thread is not None and thread.is_alive() else 'not running'}, "
                f"database {'ok' if self.healthy else 'refusing'}, {self._queue.qsize()} rows queued, "
                f"{self.journal.pending()} calls journaled")

    def start(self) -> None:
        """Start the writer now (a web worker at boot): it first writes what dead processes left behind."""
        self._ensure_running()

    def stop(self) -> None:
        """Finish what is queued (unless the database refuses: the journal keeps it), close the writer's
        connection and files, end its thread (tests, shutdown)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._stopping = True
            self._queue.put(None)
            thread.join(timeout=30)
            self._stopping = False
        self.journal.close()

    def _ensure_running(self) -> None:
        # A forked worker (gunicorn) inherits the object but not the thread: it starts its own.
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        source = self._queue
        next_recovery = 0.0
        try:
            while True:
                if time.monotonic() >= next_recovery:
                    self._recover()
                    next_recovery = time.monotonic() + RECOVER_EVERY_SECONDS
                try:
                    first = source.get(timeout=RECOVER_EVERY_SECONDS)
                except queue.Empty:
                    continue
                if first is None:
                    return
                batch, stop = [first], False
                while len(batch) < MAX_BATCH:
                    try:
                        item = source.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._flush(batch)
                if stop:
                    return
        finally:
            connections[ALIAS].close()

    def _flush(self, batch: list[Written]) -> None:
        """Write the batch, trying again while the database is unreachable; mark what is in as done."""
        delay = 0.05
        while True:
            try:
                written = self._write(batch)
                break
            except (OperationalError, InterfaceError) as exc:  # unreachable or restarting: keep the rows
                _close_quietly()
                if self.healthy:
                    log.error("ledger writer: the database refuses (%s); %d rows wait in the journal and are "
                              "written when it is back", exc.__class__.__name__, len(batch))
                self.healthy = False
                if self._stopping:
                    return  # shutting down: the journal keeps them for the next start
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
        if not self.healthy:
            log.warning("ledger writer: the database takes rows again")
        self.healthy = True
        self.journal.done(p.key for p in written)
        for pending in written:
            pending.committed = True
            pending.done.set()

    def _write(self, batch: list[Written]) -> list[Written]:
        """Insert the batch; a row the database rejects for its content is set aside alone. Returns the
        rows that are now in the ledger (or set aside)."""
        try:
            _insert(connections[ALIAS], [(p.row, p.body) for p in batch], idle_check=self._idle_check())
            return batch
        except (OperationalError, InterfaceError):
            raise
        except Exception as exc:  # DataError, IntegrityError, ... or a bug: never the writer's end
            _close_quietly()
            if len(batch) > 1:  # one bad row must not cost the others their entry: write them one by one
                return [p for pending in batch for p in self._write([pending])]
            _reject(batch[0].row, batch[0].body, exc)
            return batch

    def _idle_check(self) -> bool:
        idle = time.monotonic() - self._last_used > IDLE_CHECK_SECONDS
        self._last_used = time.monotonic()
        return idle

    def _recover(self) -> None:
        try:
            recover(settings.TOLLGATE_SPOOL_DIR)
        except (OperationalError, InterfaceError):
            _close_quietly()  # the database is down: the files stay for the next round
        except Exception:
            log.exception("ledger writer: recovering journals failed; they are kept for the next round")


def recover(directory) -> int:
    """Write what the journals of stopped processes in `directory` still hold; returns how many calls."""
    def write(rows, opened):
        _insert(connections[ALIAS], [*rows, *((_lost_row(row), None) for row in opened)], idle_check=True)

    return journals.recover(directory, _writer.journal, write)


def _lost_row(row: dict) -> dict:
    """The row of a call whose process died before it finished: what is known of it, nothing charged."""
    return {**row, "outcome": LedgerEntry.Outcome.UPSTREAM_ERROR, "http_status": 502, "error_code": "worker_lost",
            "detail": "the web worker serving this call stopped before it finished; usage unknown, nothing charged",
            "cost": "0", "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}


def _close_quietly() -> None:
    try:
        connections[ALIAS].close()
    except Exception:  # already broken: nothing to give back
        pass


def _reject(row: dict, body: dict | None, exc: Exception) -> None:
    """A row the database will never take as it is: kept, fsynced, beside the journals, for IT to fix."""
    path = settings.TOLLGATE_SPOOL_DIR / "rejected.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"row": row, "body": body, "error": str(exc)[:500]}, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.error("ledger row of request %s rejected by the database (%s): kept in %s", row.get("request_id"),
              exc.__class__.__name__, path)


@functools.cache
def _fields() -> list:
    by_column = {f.column: f for f in LedgerEntry._meta.concrete_fields}
    return [by_column[column] for column in COLUMNS]


@functools.cache
def _statement(vendor: str, rows: int, returning: bool) -> str:
    quote = connection.ops.quote_name
    placeholders = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    sql = (f"INSERT INTO {quote(LedgerEntry._meta.db_table)} ({', '.join(quote(c) for c in COLUMNS)}) "
           f"VALUES {', '.join([placeholders] * rows)} ON CONFLICT (request_id, created_at) DO NOTHING")
    return sql + (" RETURNING id" if returning else "")


def _params(db, row: dict) -> list:
    return [f.get_db_prep_save(f.to_python(row[c]) if c != "tags" else row[c], db) for c, f in zip(COLUMNS, _fields())]


def _insert(db, rows: list[tuple[dict, dict | None]], *, idle_check: bool) -> None:
    """Insert rows (and their bodies) on `db`, each at most once ever. Rows already in are skipped."""
    if idle_check:
        db.close_if_unusable_or_obsolete()  # a connection a database restart or a firewall dropped
    plain = [row for row, body in rows if body is None]
    with_body = [(row, body) for row, body in rows if body is not None]
    # One statement is atomic on its own (in autocommit one round trip, where a transaction would add a
    # BEGIN and a COMMIT); a row with its body needs both statements in one transaction.
    with transaction.atomic(using=db.alias) if with_body or len(plain) > MAX_BATCH else contextlib.nullcontext():
        with db.cursor() as cursor:
            for start in range(0, len(plain), MAX_BATCH):
                chunk = plain[start:start + MAX_BATCH]
                cursor.execute(_statement(db.vendor, len(chunk), False), [v for row in chunk for v in _params(db, row)])
            for row, body in with_body:
                cursor.execute(_statement(db.vendor, 1, True), _params(db, row))
                inserted = cursor.fetchone()
                if inserted is not None:  # None: the row was in already, with its body
                    CallBody.objects.using(db.alias).create(
                        entry_id=inserted[0], created_at=_fields()[1].to_python(row["created_at"]), mode=body["mode"],
                        request=body["request"], response=body["response"])


_writer = LedgerWriter()
stop = _writer.stop
start = _writer.start


def submit(row: dict, body: dict | None = None) -> Written:
    """Hand over a call's row (and its body) to be inserted; `wait()` on the result for the commit. Inside
    a transaction of the caller's, the insert joins that transaction, at once; otherwise it goes through
    the process's writer (group commit)."""
    if not connection.in_atomic_block:
        return _writer.submit(row, body)
    written = Written(row, body)
    _insert(connection, [(row, body)], idle_check=False)
    written.committed = True
    written.done.set()
    return written


def journal_open(row: dict) -> None:
    """The call has started (or learned more): if this process dies before its row is written, the next
    process writes this one, marked as lost."""
    if not connection.in_atomic_block:
        _writer.journal.open(row)
