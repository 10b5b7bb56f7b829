"""Each web process's journal of its calls: what keeps a ledger row that the database cannot take now, and
the trace of a call whose process died before its row was written.

A call writes three kinds of line to its process's journal (append-only files in TOLLGATE_SPOOL_DIR):

    open   when the call starts, then again with what admission learned (key, team, grants, model)
    row    the call's finished ledger row, just before it is handed to the ledger writer
    done   once the writer has committed the row (or the row is known to be in the database)

Lines are written with one `write` each and not fsynced: a process that is killed leaves them in the
kernel's page cache, which survives it. A call that answers its client before its row is committed (the
database is down or slow) fsyncs the journal first (`sync`), so nothing acknowledged is lost even to a
machine crash.

Every process holds an exclusive `flock` on its own journal files for as long as it lives. Any process
that can take that lock on another file knows its owner is gone, and `recover` writes what the file
holds: each `row` without its `done`, and for each call still only `open`, a row saying the worker was
lost. The ledger's unique (request_id, created_at) makes every write idempotent, so a file read twice, or
a row that was committed just before its process died, is never charged twice.
"""
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_BYTES = 8 * 1024 * 1024  # a new file after this; old ones go once all their calls are done
SUFFIX = ".journal"


def call_key(row: dict) -> str:
    """A call's identity in the journal, as in the ledger: request id and start time."""
    return f"{row['request_id']}@{row['created_at']}"


class _Segment:
    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while we live
        self.size = os.fstat(self.fd).st_size
        self.synced = 0  # bytes known to be on disk
        self.open_calls: set[str] = set()

    def close(self) -> None:
        os.close(self.fd)


class Journal:
    """One process's journal. Thread- and greenlet-safe; a forked child starts its own files."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._current: _Segment | None = None
        self._segments: dict[str, _Segment] = {}  # key -> the segment its call was opened in
        self._sequence = 0
        self._last_error = -60.0

    # --- writing -------------------------------------------------------------------------------

    def open(self, row: dict) -> None:
        """The call has started (or learned more): if its process dies, this is the row that is written."""
        self._append(row, {"o": "open", "row": row})

    def row(self, row: dict, body: dict | None = None) -> None:
        self._append(row, {"o": "row", "row": row, "body": body})

    def done(self, keys: Iterable[str]) -> None:
        """These calls' rows are in the database: the journal no longer needs them."""
        by_segment: dict[_Segment, list[str]] = {}
        with self._lock:
            for key in keys:
                segment = self._segments.pop(key, None)
                if segment is not None:
                    by_segment.setdefault(segment, []).append(key)
            for segment, done in by_segment.items():
                self._write(segment, {"o": "done", "keys": done})
                segment.open_calls.difference_update(done)
                if segment is not self._current and not segment.open_calls:
                    self._retire(segment)

    def sync(self) -> None:
        """fsync every file holding a call not yet done: what it holds survives a machine crash too."""
        with self._lock:
            segments = {id(s): s for s in self._segments.values()}.values()
        for segment in segments:
            size = segment.size  # what was written before this call: the caller's line included
            if segment.synced >= size:
                continue  # another caller's fsync covered it (many calls wait on one fsync, not one each)
            try:
                os.fsync(segment.fd)
            except OSError:  # retired meanwhile: its calls are done
                continue
            segment.synced = max(segment.synced, size)

    def pending(self) -> int:
        with self._lock:
            return len(self._segments)

    def close(self) -> None:
        """Close this process's files; those still holding calls stay for `recover` (tests, shutdown)."""
        with self._lock:
            for segment in {id(s): s for s in [*self._segments.values(), *([self._current] if self._current else [])]}.values():
                if not segment.open_calls:
                    segment.path.unlink(missing_ok=True)
                segment.close()
            self._segments.clear()
            self._current, self._pid = None, None

    def _append(self, row: dict, line: dict) -> None:
        key = call_key(row)
        with self._lock:
            try:
                segment = self._segments.get(key)
                if segment is None:
                    segment = self._segment()
                    self._segments[key] = segment
                    segment.open_calls.add(key)
                self._write(segment, line)
            except OSError as exc:
                # The call goes on: its row still goes to the database, only the journal's safety net is
                # missing (a full disk, a read-only volume). /readyz reports it; say so loudly here too.
                now = time.monotonic()
                if now - self._last_error > 60:
                    self._last_error = now
                    log.error("ledger journal in %s cannot be written (%s): rows of calls cut by a crash or a "
                              "database outage can be lost until it is fixed", self.directory, exc)

    def _write(self, segment: _Segment, line: dict) -> None:
        data = (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode()
        os.write(segment.fd, data)  # O_APPEND: one write, one whole line, whatever else writes
        segment.size += len(data)

    def _segment(self) -> _Segment:
        if self._pid != os.getpid():  # first use, or a forked child: files of its own
            for inherited in {id(s): s for s in [*self._segments.values(), *([self._current] if self._current else [])]}.values():
                inherited.close()  # the parent's: its lock must end with the parent, not with this child
            self._segments.clear()
            self._current, self._pid = None, os.getpid()
        if self._current is None or self._current.size > SEGMENT_BYTES:
            previous = self._current
            self.directory.mkdir(parents=True, exist_ok=True)
            self._sequence += 1
            self._current = _Segment(self.directory / f"{os.uname().nodename}-{os.getpid()}-{self._sequence}{SUFFIX}")
            if previous is not None and not previous.open_calls:
                self._retire(previous)
        return self._current

    def _retire(self, segment: _Segment) -> None:
        segment.path.unlink(missing_ok=True)
        segment.close()

    def owns(self, path: Path) -> bool:
        with self._lock:
            return self._current is not None and self._current.path == path or any(
                s.path == path for s in self._segments.values())


def read_pending(lines: Iterable[bytes]) -> tuple[list[tuple[dict, dict | None]], list[dict]]:
    """What a journal file still owes the ledger: (finished rows with their bodies, calls only opened)."""
    state: dict[str, dict] = {}
    for raw in lines:
        try:
            line = json.loads(raw)
        except ValueError:  # the last line of a process killed mid-write
            continue
        if line.get("o") == "done":
            for key in line.get("keys", ()):
                state.pop(key, None)
        elif line.get("o") in ("open", "row"):
            key = call_key(line["row"])
            if state.get(key, {}).get("o") != "row":  # a finished row is never replaced by an open line
                state[key] = line
    rows = [(line["row"], line.get("body")) for line in state.values() if line["o"] == "row"]
    opened = [line["row"] for line in state.values() if line["o"] == "open"]
    return rows, opened


def recover(directory: Path | str, journal: Journal, write: Callable[[list[tuple[dict, dict | None]], list[dict]], None]) -> int:
    """Write what the journals of dead processes in `directory` still owe the ledger, then delete them.
    `write(rows, opened)` must raise if the database did not take them: the file is then kept for the next
    try. Returns how many calls were recovered."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    recovered = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        if journal.owns(path):
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # recovered by another process meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            if not path.exists():
                continue  # recovered and deleted by another process between our open and our lock
            with open(fd, "rb", closefd=False) as handle:
                rows, opened = read_pending(handle)
            if rows or opened:
                write(rows, opened)
                log.warning("ledger: wrote %d rows and %d lost calls from %s, left by a process that stopped",
                            len(rows), len(opened), path.name)
            recovered += len(rows) + len(opened)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return recovered
