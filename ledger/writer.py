"""Group commit for the relay's ledger rows: one writer thread per process, one INSERT per batch.

A relay call returns only after its ledger row is committed, so nothing is answered that is not in the
ledger. Writing the row from the request thread would cost every call a pooled connection checkout, an
INSERT round trip and a commit (an fsync) of its own. Instead the request thread queues the row and waits;
the process's writer thread, which keeps one connection, takes every row queued since its last commit,
inserts them with one multi-row INSERT in one transaction and wakes the waiting callers. At low load a
batch is one row (the same work as before, minus the checkout); under load, many calls share one round
trip and one fsync.

A caller may do other work between handing the row over and waiting for its commit (the relay settles
its Redis counters meanwhile): `submit` returns at once, `Written.wait` returns once the row is in.

A row written inside a transaction of the caller's (services, tests) is written on the caller's
connection instead, so it commits or rolls back with that transaction.
"""
import functools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from django.db import connection, transaction

from ledger.models import CallBody, LedgerEntry

log = logging.getLogger(__name__)

MAX_BATCH = 256  # rows per INSERT; under any load a batch is far smaller, this only bounds a backlog
WAIT_SECONDS = 30.0  # a caller never waits longer than this for its commit (the writer is stuck or gone)
IDLE_CHECK_SECONDS = 5.0  # the writer's connection is health-checked before use after this long unused


class LedgerWriteTimeout(Exception):
    """The ledger writer did not confirm the commit in time; the row may or may not be written."""


@dataclass(eq=False)
class Written:
    """A row handed to the writer; `wait` returns the entry once committed, or raises why it was not."""

    entry: LedgerEntry
    body: CallBody | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def wait(self) -> LedgerEntry:
        if not self.done.wait(WAIT_SECONDS):
            log.error("ledger writer did not commit request %s within %.0fs (%s)", self.entry.request_id,
                      WAIT_SECONDS, _writer.describe())
            raise LedgerWriteTimeout(f"ledger writer did not commit {self.entry.request_id} within {WAIT_SECONDS:.0f}s")
        if self.error is not None:
            raise self.error
        return self.entry


class LedgerWriter:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Written | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._busy_since = 0.0  # when the batch being written started (monotonic), 0 when idle

    def submit(self, entry: LedgerEntry, body: CallBody | None = None) -> Written:
        written = Written(entry, body)
        self._ensure_running()
        self._queue.put(written)
        return written

    def describe(self) -> str:
        """The writer's state, for the log line of a caller that waited too long."""
        thread, busy_since = self._thread, self._busy_since
        busy = f"in one batch for {time.monotonic() - busy_since:.1f}s" if busy_since else "idle"
        return (f"writer {'running' if thread is not None and thread.is_alive() else 'not running'}, {busy}, "
                f"{self._queue.qsize()} rows queued")

    def stop(self) -> None:
        """Finish what is queued, close the writer's connection and end its thread (tests, shutdown)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._queue.put(None)
            thread.join(timeout=WAIT_SECONDS)

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
        try:
            while True:
                first = source.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = source.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        source.put(None)  # stop after this batch
                        break
                    batch.append(item)
                self._flush(batch)
        finally:
            connection.close()

    def _flush(self, batch: list[Written]) -> None:
        self._busy_since = time.monotonic()
        try:
            _insert(batch)
        except Exception as exc:
            connection.close_if_unusable_or_obsolete()  # a broken connection is replaced on the next batch
            if len(batch) > 1:  # one bad row must not cost the others their entry: write them one by one
                for pending in batch:
                    self._flush([pending])
                return
            log.exception("ledger insert failed for request %s", batch[0].entry.request_id)
            batch[0].error = exc
        self._busy_since = 0.0
        for pending in batch:
            pending.done.set()


def _insert(batch: list[Written]) -> None:
    global _last_insert
    # No retry after a failure: a connection that breaks mid-commit leaves it unknown whether the rows are
    # in, and a retry could charge them twice. Instead a connection idle for a while, the kind a database
    # restart or a firewall has dropped, is checked (Django's health check) before it is used.
    if time.monotonic() - _last_insert > IDLE_CHECK_SECONDS:
        connection.close_if_unusable_or_obsolete()
    _last_insert = time.monotonic()
    if len(batch) == 1 and batch[0].body is None:
        # One row is one statement, atomic on its own: in autocommit one round trip, where a transaction
        # would add a BEGIN and a COMMIT.
        _insert_one(batch[0].entry)
        return
    with transaction.atomic():
        LedgerEntry.objects.bulk_create([pending.entry for pending in batch])
        bodies = []
        for pending in batch:
            if pending.body is not None:
                pending.body.entry_id = pending.entry.pk
                bodies.append(pending.body)
        if bodies:
            CallBody.objects.bulk_create(bodies)


def _insert_one(entry: LedgerEntry) -> None:
    """`entry.save(force_insert=True)` without compiling the INSERT anew each time: the statement is built
    once per process (and prepared by the server after a few uses), each field still converts its value
    for the database itself. On the relay's path this halves the row's cost in Python."""
    sql, fields = _insert_statement(connection.vendor)
    values = [field.get_db_prep_save(field.pre_save(entry, True), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        entry.pk = cursor.fetchone()[0] if connection.features.can_return_columns_from_insert else cursor.lastrowid
    entry._state.adding, entry._state.db = False, connection.alias


@functools.cache
def _insert_statement(vendor: str) -> tuple[str, list]:
    quote = connection.ops.quote_name
    fields = [field for field in LedgerEntry._meta.concrete_fields if not field.primary_key]
    sql = (f"INSERT INTO {quote(LedgerEntry._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))})")
    if connection.features.can_return_columns_from_insert:
        sql += f" RETURNING {quote(LedgerEntry._meta.pk.column)}"
    return sql, fields


_last_insert = 0.0

_writer = LedgerWriter()
stop = _writer.stop


def submit(entry: LedgerEntry, body: CallBody | None = None) -> Written:
    """Hand over a ledger entry (and its body) to be inserted; wait on the result for the commit. Inside a
    transaction of the caller's, the insert joins that transaction, at once; otherwise it goes through the
    process's writer (group commit)."""
    if not connection.in_atomic_block:
        return _writer.submit(entry, body)
    written = Written(entry, body)
    with transaction.atomic():
        entry.save(force_insert=True)
        if body is not None:
            body.entry = entry
            body.save(force_insert=True)
    written.done.set()
    return written
