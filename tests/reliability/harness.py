"""What the reliability tests drive and measure from the outside: the production web tier (gunicorn, gevent
workers) as a process group, clients on the official openai SDK, the ledger counted per request id, and a
throwaway PostgreSQL cluster a test may stop and start. No Django imports: the web tier is a black box,
and the throwaway cluster is read with psycopg directly."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import requests

ROOT = Path(__file__).resolve().parents[2]
MAX_WAIT_SECONDS = 10.0  # the longest any client may wait for an answer, overloaded or not
HELLO = [{"role": "user", "content": "hello there"}]  # 2 prompt words; the stub answers with 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_id(prefix: str) -> str:
    """A fresh X-Request-ID the relay keeps as the ledger's request_id (8-64 of [A-Za-z0-9._:-])."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# ------------------------------------------------------------------------------------------ web tier


@dataclass
class WebTier:
    """One gunicorn master (its own process group) and its workers, on a free port of 127.0.0.1."""

    process: subprocess.Popen
    port: int
    spool_dir: Path
    log_path: Path
    database_url: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def master_pid(self) -> int:
        return self.process.pid

    def workers(self) -> list[int]:
        """Live worker pids: the master's children, read from /proc."""
        children = set()
        for path in glob.glob(f"/proc/{self.master_pid}/task/*/children"):
            try:
                children.update(int(pid) for pid in Path(path).read_text().split())
            except (OSError, ValueError):
                continue
        return sorted(pid for pid in children if _alive(pid))

    def wait_for_workers(self, count: int, *, not_in: Iterable[int] = (), timeout: float = 20.0) -> list[int]:
        """Wait until `count` workers are up, none of them in `not_in`; return their pids."""
        excluded, deadline = set(not_in), time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) == count and not excluded & set(pids):
                return pids
            time.sleep(0.1)
        raise AssertionError(f"web tier: expected {count} workers (none of {sorted(excluded)}), have {self.workers()}\n"
                             + self.log_tail())

    def connections_by_worker(self) -> dict[int, int]:
        """client port -> worker pid, for every established connection a worker holds on the tier's port
        (from /proc: each worker's socket inodes matched with /proc/net/tcp)."""
        by_inode = {}
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields_ = line.split()
            local, remote, state, inode = fields_[1], fields_[2], fields_[3], fields_[9]
            if state == "01" and int(local.split(":")[1], 16) == self.port:
                by_inode[inode] = int(remote.split(":")[1], 16)
        found = {}
        for pid in self.workers():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in by_inode:
                    found[by_inode[target[8:-1]]] = pid
        return found

    def log_tail(self, lines: int = 40) -> str:
        """The end of the tier's log, without django.request's line per refused call (hundreds in a burst)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no web tier log)"
        text = [line for line in text if "django.request" not in line]
        return f"--- last {lines} lines of {self.log_path} (django.request lines left out) ---\n" + "\n".join(text[-lines:])

    def log_count(self, needle: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass


def _no_control_socket() -> list[str]:
    """gunicorn >= 24 opens a control socket at one path per user (~/.gunicorn/gunicorn.ctl): tiers started
    side by side (this test's, another test run's) would take it from each other. Off, where it exists."""
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return []
    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet


def start_web_tier(*, database_url: str, spool_dir: Path, log_path: Path, base_env: dict[str, str], workers: int,
                   env: dict[str, str]) -> WebTier:
    """gunicorn with governance/gunicorn_conf.py, as production runs it (DEBUG off, gevent on PostgreSQL)."""
    port = free_port()
    spool_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **base_env, "DATABASE_URL": database_url, "TOLLGATE_SPOOL_DIR": str(spool_dir),
                "WEB_WORKERS": str(workers), "DEBUG": "false", "SECURE_SSL_REDIRECT": "false",
                "ALLOWED_HOSTS": "127.0.0.1", "LOG_LEVEL": "WARNING", "LOG_FORMAT": "text",
                **{name: str(value) for name, value in env.items()}}
    log = open(log_path, "ab")  # a file, not a pipe: a burst of warnings must never block the workers on a full pipe
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "python:governance.gunicorn_conf", "--bind", f"127.0.0.1:{port}",
             "--workers", str(workers), "--graceful-timeout", "5", *_no_control_socket()],
            cwd=ROOT, env=full_env, stdout=log, stderr=log, start_new_session=True)
    finally:
        log.close()
    tier = WebTier(process, port, spool_dir, log_path, database_url)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {process.returncode}\n" + tier.log_tail())
        try:
            if requests.get(f"{tier.url}/healthz", timeout=2).ok and len(tier.workers()) == workers:
                return tier
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            pass
        time.sleep(0.2)
    tier.stop()
    raise AssertionError("gunicorn did not start within 40s\n" + tier.log_tail())


# ------------------------------------------------------------------------------------------ clients


@dataclass
class Call:
    """One call as its client saw it."""

    request_id: str
    status: int | None = None  # None: no HTTP answer (timeout, connection error)
    code: str | None = None  # the error code of an error body
    failure: str = ""  # why there was no (complete) answer, e.g. APITimeoutError
    message: str = ""  # the error body's message, or the exception's
    elapsed: float = 0.0
    retry_after: str | None = None
    started: float = 0.0  # time.monotonic()

    @property
    def label(self) -> str:
        if self.status is None:
            return f"no answer ({self.failure})"
        return f"{self.status} {self.code}" if self.code else str(self.status)


def sdk(base_v1: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_v1, api_key=secret, max_retries=0, timeout=30.0)


def chat(client: openai.OpenAI, rid: str, *, model: str, headers: dict | None = None, max_tokens: int | None = None) -> Call:
    call = Call(rid, started=time.monotonic())
    extra = {"max_tokens": max_tokens} if max_tokens is not None else {}
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=HELLO, extra_headers={"X-Request-ID": rid, **(headers or {})}, **extra)
        call.status = raw.status_code
        raw.parse()
    except openai.APIStatusError as exc:
        call.status, call.retry_after = exc.status_code, exc.response.headers.get("retry-after")
        call.code = exc.code if isinstance(exc.code, str) and exc.code else "(no code)"
        call.message = str((exc.body or {}).get("message", "") if isinstance(exc.body, dict) else exc.message)[:200]
    except Exception as exc:  # timeouts, refused or reset connections, unreadable bodies: no answer
        call.failure, call.message = type(exc).__name__, str(exc)[:200]
        call.status = None
    call.elapsed = time.monotonic() - call.started
    return call


def burst(base_v1: str, secret: str, *, calls: int, concurrency: int, model: str, prefix: str,
          headers: Callable[[], dict] | None = None, max_tokens: int | None = None) -> list[Call]:
    """`calls` chat calls from `concurrency` client threads at once, each with its own X-Request-ID and its
    own SDK client (so its own connections)."""
    local, clients, lock = threading.local(), [], threading.Lock()
    gate = threading.Barrier(min(concurrency, calls))

    def one(index: int) -> Call:
        if not hasattr(local, "client"):
            local.client = sdk(base_v1, secret)
            with lock:
                clients.append(local.client)
            try:
                gate.wait(timeout=10)  # the first wave starts together: a burst, not a ramp
            except threading.BrokenBarrierError:
                pass
        return chat(local.client, request_id(f"{prefix}{index}"), model=model, headers=headers() if headers else None,
                    max_tokens=max_tokens)

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, range(calls)))
    finally:
        for client in clients:
            client.close()


def tally(calls: Iterable[Call]) -> Counter:
    return Counter(call.label for call in calls)


def answer_problems(calls: list[Call], *, allowed: dict[int, set[str | None]]) -> list[str]:
    """What the clients saw that the invariants forbid: a status or code not in `allowed` (status -> codes,
    None for a success body), no answer, a wait over MAX_WAIT_SECONDS, a 503 `overloaded` without Retry-After."""
    problems = []
    outside = [c for c in calls if c.status not in allowed or c.code not in allowed[c.status]]
    if outside:
        examples = {c.label: c.message for c in outside}
        problems.append(f"answers outside {sorted(allowed)}: {dict(Counter(c.label for c in outside))}; e.g. {examples}")
    slow = [c for c in calls if c.elapsed > MAX_WAIT_SECONDS]
    if slow:
        problems.append(f"{len(slow)} clients waited more than {MAX_WAIT_SECONDS:.0f}s "
                        f"(longest {max(c.elapsed for c in slow):.1f}s: {Counter(c.label for c in slow)})")
    no_retry_after = [c for c in calls if c.status == 503 and c.code == "overloaded" and not c.retry_after]
    if no_retry_after:
        problems.append(f"{len(no_retry_after)} 503 overloaded answers without Retry-After")
    return problems


# ------------------------------------------------------------------------------------------ the ledger


@dataclass
class LedgerCount:
    """The ledger rows of a set of request ids, counted."""

    ids: list[str]
    rows: list[dict]
    total_rows: int  # rows in the ledger at all (this test's rows only: the database is emptied between tests)
    by_id: dict[str, list[dict]] = field(init=False)

    def __post_init__(self):
        self.by_id = {rid: [] for rid in self.ids}
        for row in self.rows:
            self.by_id.setdefault(row["request_id"], []).append(row)

    @property
    def missing(self) -> list[str]:
        return [rid for rid in self.ids if not self.by_id[rid]]

    @property
    def duplicated(self) -> list[str]:
        return [rid for rid, rows in self.by_id.items() if len(rows) > 1]

    @property
    def stray(self) -> int:
        """Rows that carry none of the ids sent (an X-Request-ID not kept, or a call nobody made)."""
        return self.total_rows - len(self.rows)

    def outcomes(self) -> Counter:
        return Counter(f"{r['outcome']}/{r['http_status']}{'/' + r['error_code'] if r['error_code'] else ''}" for r in self.rows)

    def problems(self, calls: list[Call] | None = None) -> list[str]:
        """Exactly one row per request id, none stray; and a row's status is what its client was answered."""
        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} of {len(self.ids)} request ids have no ledger row (e.g. {self.missing[:3]})")
        if self.duplicated:
            problems.append(f"{len(self.duplicated)} request ids have more than one ledger row "
                            f"(e.g. {[(rid, len(self.by_id[rid])) for rid in self.duplicated[:3]]})")
        if self.stray:
            problems.append(f"{self.stray} ledger rows carry none of the request ids sent")
        if calls:
            wrong = Counter((c.status, self.by_id[c.request_id][0]["http_status"]) for c in calls
                            if c.status is not None and len(self.by_id.get(c.request_id, [])) == 1
                            and self.by_id[c.request_id][0]["http_status"] != c.status)
            if wrong:
                problems.append(f"ledger status differs from the answer (answered, ledgered): {dict(wrong)}")
        return problems

    def summary(self) -> str:
        return (f"rows={len(self.rows)} (ledger total {self.total_rows}) ids={len(self.ids)} missing={len(self.missing)} "
                f"duplicated={len(self.duplicated)} stray={self.stray} by outcome={dict(self.outcomes())}")


def wait_for_ledger(fetch: Callable[[list[str]], tuple[list[dict], int]], ids: list[str], *, timeout: float,
                    settle: float = 1.0) -> LedgerCount:
    """Poll until every id has a row or `timeout` passes; then, after `settle` seconds more (a late
    duplicate shows up here), count once more."""
    deadline = time.monotonic() + timeout
    while True:
        rows, _ = fetch(ids)
        if {row["request_id"] for row in rows} >= set(ids) or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    time.sleep(settle)
    rows, total = fetch(ids)
    return LedgerCount(ids, rows, total)


ROW_COLUMNS = ("request_id", "http_status", "outcome", "error_code", "cost", "grant_path", "person_id", "key_id")


def psycopg_fetch(url: str) -> Callable[[list[str]], tuple[list[dict], int]]:
    """Ledger rows straight from a database (no Django): for the throwaway cluster."""
    import psycopg

    def fetch(ids: list[str]) -> tuple[list[dict], int]:
        try:
            with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
                rows = conn.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM ledger_ledgerentry WHERE request_id = ANY(%s)",
                                    [ids]).fetchall()
                total = conn.execute("SELECT count(*) FROM ledger_ledgerentry").fetchone()[0]
        except psycopg.OperationalError:
            return [], 0
        return [dict(zip(ROW_COLUMNS, row)) for row in rows], total

    return fetch


# ------------------------------------------------------------------------------------------ PostgreSQL


def _postgres_bin_dir() -> Path | None:
    candidates = [os.environ.get("TOLLGATE_TEST_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).resolve().parent))
    try:
        import pgserver

        candidates.append(str(Path(pgserver.__file__).parent / "pginstall" / "bin"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_ctl").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temp dir on a free TCP port of 127.0.0.1, trust auth, user postgres.
    PostgreSQL refuses to run as root: as root, its commands run as the `postgres` system user (runuser),
    which owns the data dir. fsync is off: nothing here needs to outlive the machine, only the server."""

    def __init__(self) -> None:
        self.bin = _postgres_bin_dir()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.run_as = None
        if os.geteuid() == 0:
            try:
                self.run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' system user to run PostgreSQL as") from None
        self.root = Path(tempfile.mkdtemp(prefix="tollgate-reliability-pg-", dir="/tmp"))
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        if self.run_as is not None:
            os.chown(self.root, self.run_as.pw_uid, self.run_as.pw_gid)
        self.port = free_port()
        self.running = False

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as.pw_name, "--", *command]
        result = subprocess.run(command, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:1])} failed ({result.returncode}): {result.stdout.decode()[-2000:]}\n"
                               + self.log_tail())

    def init(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
        return self

    def start(self) -> None:
        # fsync off: the files only need to outlive the server process, not the machine (the kernel keeps
        # them). synchronous_commit stays on: with it off, `stop -m immediate` loses commits it acknowledged,
        # which would show as ledger rows missing that the relay did write.
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c full_page_writes=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`fast`: disconnect every session and shut down cleanly; `immediate`: as if the server crashed."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def accepts_connections(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "--- postgres log ---\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no postgres log)"

    def destroy(self) -> None:
        if self.running or (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except Exception:  # already down: nothing to stop
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class SessionSampler:
    """Samples, every `every` seconds, how many sessions the web tier holds on its database (the peak is
    printed with the counts: it shows whether the pool bounds the tier). `with SessionSampler(url) as s:`."""

    def __init__(self, url: str, every: float = 0.05) -> None:
        self.url, self.every = url, every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-sampler", daemon=True)

    def _run(self) -> None:
        import psycopg

        try:
            conn = psycopg.connect(self.url, connect_timeout=3, autocommit=True)
        except psycopg.OperationalError:
            return
        with conn:
            while not self._stop.is_set():
                try:
                    count = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                         "AND pid <> pg_backend_pid()").fetchone()[0]
                except psycopg.Error:
                    return
                self.peak, self.samples = max(self.peak, count), self.samples + 1
                self._stop.wait(self.every)

    def __enter__(self) -> "SessionSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
