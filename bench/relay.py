"""Load benchmark of the relay against the issue's targets: throughput, added latency, streams, memory.

Run from the repository root: ``.venv/bin/python -m bench.relay [--quick]`` (see bench/README.md).
It builds a throwaway PostgreSQL database, starts the stub provider and gunicorn as in production,
drives load from separate processes (wrk, or the Python generators at the bottom of this module),
prints each phase's figures and a summary against the targets, then stops everything it started and
drops the database. Everything listens and connects on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"
HOST = "127.0.0.1"

DB_NAME = "tollgate_bench"
PG_ADMIN_DSN = f"host={HOST} port=5432 user=postgres dbname=postgres"
PG_BENCH_DSN = f"host={HOST} port=5432 user=postgres dbname={DB_NAME}"
REDIS_URL = f"redis://{HOST}:6379/5"
BROKER_URL = f"redis://{HOST}:6379/6"

# The issue's targets.
TARGET_RPS = 400
TARGET_ADDED_P50_MS = 5.0
TARGET_ADDED_P99_MS = 25.0
TARGET_STREAMS = 256
TARGET_RSS_MB = 150.0
TARGET_MEMORY_CALLS = 100_000
# RSS moves by a few MB with allocator arenas and lazily created per-thread state; more than this is growth.
RSS_GROWTH_TOLERANCE_MB = 5.0

HIGH_LIMIT = 2_000_000_000  # fits PositiveIntegerField; never reached, so the limiter runs but never refuses
CONNECTIONS = 32
LATENCY_RATE = 50
STREAM_SECONDS = 5
STREAMS_PER_PROCESS = 64
RESULT_MARK = "BENCH-RESULT "
PHASES = ("throughput", "latency", "streams", "memory")
# The relay as production runs it (governance/gunicorn_conf.py: gevent, one process per core); the bench
# only binds it. --gunicorn-args adds to (and overrides) these, e.g. to compare worker classes.
SERVER_ARGS = ["--config", "python:governance.gunicorn_conf"]


@dataclass(frozen=True)
class Plan:
    throughput_seconds: int
    latency_seconds: int
    streams: int
    memory_calls: int


FULL = Plan(throughput_seconds=20, latency_seconds=20, streams=TARGET_STREAMS, memory_calls=TARGET_MEMORY_CALLS)
QUICK = Plan(throughput_seconds=5, latency_seconds=5, streams=64, memory_calls=5000)


def chat_body(model: str, *, stream: bool = False) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something short and cheerful to the benchmark please"}],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


# --- processes ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child after setsid: if the bench itself is killed (even with SIGKILL), its children get
    # SIGTERM instead of living on as orphans holding ports and the database. The signal is tied to the
    # thread that started the child, so the bench starts every process from its main thread, which also
    # keeps preexec_fn safe (no other thread can hold a lock across the fork).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    """Every process the bench starts, each in its own process group so stopping it reaches its children."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(a) for a in args], cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent, **kwargs  # noqa: PLW1509
        )
        self.started.append(proc)
        return proc

    def run(self, args: list[str], *, env: dict, timeout: float) -> str:
        """Run to completion and return stdout; stderr is shown when it fails."""
        proc = self.start(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{args[1:3]} did not finish within {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args[:4]))} failed ({proc.returncode}):\n{err[-3000:]}")
        return out

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Stragglers of the group (gunicorn workers whose master is gone) go too.
        _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout:.0f}s")


def wait_for_healthz(port: int, proc: subprocess.Popen, log: Path, *, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited ({proc.returncode}):\n{_tail(log)}")
        try:
            if requests.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"/healthz did not answer within {timeout:.0f}s:\n{_tail(log)}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(found))


def _status(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    kb = _status(pid, "VmRSS")
    return None if kb is None else kb / 1024


def thread_count(pid: int) -> int | None:
    return _status(pid, "Threads")


def connections_to(port: int) -> int:
    """Established TCP connections whose remote end is 127.0.0.1:`port` (the workers' upstream pool)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].split(":")[1], 16) == port:
            count += 1
    return count


# --- CPU accounting (what top shows, summed over a window) ----------------------------------------

def _cpu_ticks() -> dict[int, tuple[str, int, int]]:
    """pid -> (name, start time, utime + stime) in clock ticks."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2:].split()
        ticks[int(stat.parent.name)] = (comm, int(rest[19]), int(rest[11]) + int(rest[12]))
    return ticks


def _machine_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


class CpuWindow:
    """CPU used by each group of processes between start() and stop(), in % of one core."""

    def __init__(self, groups: dict[str, set[int]]):
        self.groups = groups

    def start(self) -> None:
        self.t0, self.procs0, self.machine0 = time.monotonic(), _cpu_ticks(), _machine_ticks()

    def stop(self) -> str:
        seconds = time.monotonic() - self.t0
        procs1, machine1 = _cpu_ticks(), _machine_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        used: dict[str, float] = {}
        for pid, (comm, start, ticks) in procs1.items():
            before = self.procs0.get(pid)
            delta = ticks - before[2] if before and before[1] == start else ticks  # else: started in the window
            name = next((g for g, pids in self.groups.items() if pid in pids), None)
            if name is None:
                name = "postgres" if comm.startswith("postgres") else "redis" if comm.startswith("redis") else "other"
            used[name] = used.get(name, 0.0) + delta / hz / seconds * 100
        total = machine1[0] - self.machine0[0]
        busy = 100 * (1 - (machine1[1] - self.machine0[1]) / total) if total else 0.0
        cpus = os.cpu_count() or 1
        ranked = sorted(used.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{name} {pct:.0f}%" for name, pct in ranked if pct >= 0.5)
        return f"{parts}; machine busy {busy:.0f}% of {cpus} CPUs ({seconds:.1f}s window, 100% = one core per group)"


# --- the database, Redis and the catalog ----------------------------------------------------------

def app_env(secret_key: str, fernet_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "DATABASE_", "CELERY_", "DJANGO_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="governance.settings",
        DEBUG="false",
        SECRET_KEY=secret_key,
        TOLLGATE_ENCRYPTION_KEYS=fernet_key,
        ALLOWED_HOSTS=f"{HOST},localhost",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"postgres://postgres@{HOST}:5432/{DB_NAME}",
        REDIS_URL=REDIS_URL,
        CELERY_BROKER_URL=BROKER_URL,
        LOG_LEVEL="WARNING",
        DATABASE_POOL_MAX_SIZE="16",
        PYTHONUNBUFFERED="1",
        # Ledger journals of this run only: a journal left by an earlier run must not land in this database.
        TOLLGATE_SPOOL_DIR=tempfile.mkdtemp(prefix="tollgate-bench-spool-"),
    )
    return env


def database_create() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")


def database_drop() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


def ledger_count(where: str = "TRUE") -> int:
    import psycopg

    with psycopg.connect(PG_BENCH_DSN, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(f"SELECT count(*) FROM ledger_ledgerentry WHERE {where}").fetchone()[0]


def ledger_settled(where: str = "TRUE", *, expect: int | None = None, timeout: float = 10.0) -> int:
    """The ledger count once it stops moving (or reaches `expect`), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = ledger_count(where)
    while time.monotonic() < deadline:
        if expect is not None and last >= expect:
            return last
        time.sleep(0.5)
        now = ledger_count(where)
        if now == last and expect is None:
            return now
        last = now
    return last


def redis_flush() -> None:
    import redis

    for url in (REDIS_URL, BROKER_URL):
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5).flushdb()


def setup_data(args: dict) -> dict:
    """Runs in a subprocess with the app's environment: the organisation, the catalog and one key."""
    import django

    django.setup()
    from datetime import timedelta
    from decimal import Decimal

    from django.utils import timezone

    from gateway.models import Deployment, ModelAlias, ModelPrice, Provider, ProviderModel
    from governance.models import CostCenter, Department, Person, Team
    from keys.services import key_issue

    high = {"rpm_limit": HIGH_LIMIT, "rpd_limit": HIGH_LIMIT, "tpm_limit": HIGH_LIMIT, "tpd_limit": HIGH_LIMIT}
    department = Department.objects.create(name="Benchmark", slug="benchmark")
    cost_center = CostCenter.objects.create(code="BENCH", name="Benchmark", department=department)
    person = Person.objects.create_user(
        username="bench", email="bench@bench.invalid", department=department, cost_center=cost_center, **high
    )
    team = Team.objects.create(
        name="Benchmark", slug="benchmark", department=department, cost_center=cost_center, owner=person, **high
    )
    provider = Provider(name="stub", kind=Provider.Kind.OPENAI, base_url=args["stub_url"])
    provider.set_api_key("sk-bench")
    provider.save()
    for alias_name, model_name in (("bench", "gpt-bench"), ("bench-stream", "drip-5")):
        model = ProviderModel.objects.create(provider=provider, name=model_name, max_output_tokens=4096)
        ModelPrice.objects.create(
            provider_model=model, effective_from=timezone.now() - timedelta(days=1),
            input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"),
        )
        alias = ModelAlias.objects.create(name=alias_name)
        Deployment.objects.create(alias=alias, provider_model=model, priority=0)
    issued = key_issue(
        name="bench", team=team, person=person, actor=None, actor_label="bench",
        monthly_budget=Decimal("1000000"), **high,
    )
    return {"secret": issued.secret}


# --- load: wrk ------------------------------------------------------------------------------------

def ensure_wrk(tool: str = "wrk") -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    print(f"{tool} not found: trying `apt-get install -y {tool}` (an `apt-get update` first if that fails) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", tool]
    for attempt in (install, ["apt-get", "update", "-q"], install):
        try:
            result = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"  {' '.join(attempt)}: {exc}")
            break
        if attempt[1] == "install" and result.returncode == 0 and shutil.which(tool):
            return shutil.which(tool)
        if attempt[1] == "update" and result.returncode != 0:
            print(f"  apt-get update failed: {result.stderr.strip()[-300:]}")
            break
    print(f"  {tool} is not available" + (": using the Python load generator for throughput and memory"
                                           if tool == "wrk" else ""))
    return None


def wrk_script(tmp: Path, name: str, body: str, headers: dict[str, str], *, per_thread: int | None = None) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{body}]==]"]
    lines += [f'wrk.headers["{k}"] = [==[{v}]==]' for k, v in headers.items()]
    if per_thread is not None:
        # Each wrk thread has its own Lua state: stop it after its share of responses.
        lines += [
            f"local budget = {per_thread}",
            "local seen = 0",
            "function response(status, headers, body)",
            "  seen = seen + 1",
            "  if seen >= budget then wrk.thread:stop() end",
            "end",
        ]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_wrk(out: str) -> dict:
    def grab(pattern: str, default: str = "0") -> str:
        match = re.search(pattern, out)
        return match.group(1) if match else default

    requests_done = int(grab(r"(\d+) requests in"))
    elapsed_text = grab(r"requests in ([\d.]+\w+),", "0s")
    number, unit = re.match(r"([\d.]+)(\w+)", elapsed_text).groups()
    elapsed = float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit, 1.0)
    socket_line = grab(r"(Socket errors:.*)", "")
    socket_errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", socket_line))
    return {
        "requests": requests_done,
        "elapsed": elapsed,
        "non2xx": int(grab(r"Non-2xx or 3xx responses: (\d+)")),
        "errors": socket_errors,
        "rps": float(grab(r"Requests/sec:\s+([\d.]+)")),
    }


# --- load: the Python generators (`python -m bench.relay --role ROLE --args-file F`) ----

def _client():
    import requests

    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy from the environment
    return session


def gen_closed(args: dict) -> dict:
    """Closed loop: `threads` connections each send the next request when the last one is answered."""
    import requests

    stop_at = time.monotonic() + args["seconds"]
    remaining = [args.get("total")]
    counts = {"ok": 0, "non2xx": 0, "errors": 0}
    lock = threading.Lock()
    body = args["body"].encode()

    def take() -> bool:
        with lock:
            if remaining[0] is None:
                return True
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def loop() -> None:
        session = _client()
        while time.monotonic() < stop_at and take():
            try:
                response = session.post(args["url"], data=body, headers=args["headers"], timeout=(5, 30))
                outcome = "ok" if 200 <= response.status_code < 300 else "non2xx"
            except requests.RequestException:
                outcome = "errors"
            with lock:
                counts[outcome] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, stop_at + 60 - time.monotonic()))
    return {**counts, "elapsed": time.monotonic() - started}


def gen_paced(args: dict) -> dict:
    """Open loop: request i is due at t0 + i/rate whatever happened before; latency counts from that moment.
    With `headers_list`, request i sends the i-th set of headers (cycling): traffic spread over many keys."""
    import itertools

    import requests

    local = threading.local()
    body = args["body"].encode()
    header_sets = itertools.cycle(args.get("headers_list") or [args["headers"]])

    def one(due: float, headers: dict) -> tuple[int, float]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = _client()
        try:
            response = session.post(args["url"], data=body, headers=headers, timeout=(5, 30))
            status = response.status_code
        except requests.RequestException:
            status = 0
        return status, (time.perf_counter() - due) * 1000

    def paced(seconds: float) -> list[tuple[int, float]]:
        rate = args["rate"]
        futures = []
        t0 = time.perf_counter() + 0.05
        for i in range(int(rate * seconds)):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, due, next(header_sets)))
        deadline = time.monotonic() + 60
        return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]

    with ThreadPoolExecutor(max_workers=64) as pool:
        paced(args["warmup_seconds"])  # connections opened, code paths warm: not measured
        results = paced(args["seconds"])
    return {
        "latencies_ms": [ms for status, ms in results if 200 <= status < 300],
        "failed": sum(1 for status, _ in results if not 200 <= status < 300),
    }


def gen_streams(args: dict) -> dict:
    """`count` streaming calls started together at `start_at` (epoch seconds); each must end with [DONE]."""
    import requests

    body = args["body"].encode()
    results: list[dict] = []
    lock = threading.Lock()

    def one() -> None:
        session = _client()
        time.sleep(max(0.0, args["start_at"] - time.time()))
        outcome = {"done": False, "status": 0, "error": ""}
        try:
            with session.post(args["url"], data=body, headers=args["headers"], stream=True,
                              timeout=(10, 30)) as response:
                outcome["status"] = response.status_code
                for line in response.iter_lines():
                    if line.startswith(b"data: ") and b'"error"' in line:
                        outcome["error"] = line[:200].decode(errors="replace")
                    if line == b"data: [DONE]":
                        outcome["done"] = response.status_code == 200 and not outcome["error"]
        except requests.RequestException as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:200]
        outcome["end"] = time.time()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(args["count"])]
    for thread in threads:
        thread.start()
    deadline = args["start_at"] + STREAM_SECONDS + 90
    for thread in threads:
        thread.join(max(0.0, deadline - time.time()))
    return {"results": results}


ROLES = {"setup-data": setup_data, "closed": gen_closed, "paced": gen_paced, "streams": gen_streams}


# A role's arguments go in a file in the bench's private temporary folder, not in argv: they hold the
# bench key, and argv is visible to anyone running `ps`.

def run_role(procs: Processes, tmp: Path, role: str, args: dict, *, env: dict | None = None, timeout: float,
             module: str = "bench.relay") -> dict:
    return collect_role(start_role(procs, tmp, role, args, env=env, module=module), timeout=timeout)


def start_role(procs: Processes, tmp: Path, role: str, args: dict, *, env: dict | None = None,
               module: str = "bench.relay") -> subprocess.Popen:
    fd, path = tempfile.mkstemp(prefix=f"{role}-", suffix=".json", dir=tmp)
    with os.fdopen(fd, "w") as f:
        json.dump(args, f)
    return procs.start([PYTHON, "-m", module, "--role", role, "--args-file", path], env=env or os.environ.copy(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect_role(proc: subprocess.Popen, *, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Processes.stop(proc)
        raise RuntimeError(f"load generator {proc.pid} did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load generator {proc.pid} failed ({proc.returncode}):\n{err[-3000:]}")
    return _result_of(out)


def _result_of(out: str) -> dict:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"no result in the output:\n{out[-2000:]}")


# --- the bench ------------------------------------------------------------------------------------

def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


class Bench:
    def __init__(self, plan: Plan, *, quick: bool, force_python: bool, server_args: list[str]):
        self.plan, self.quick, self.server_args = plan, quick, server_args
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
        self.env = app_env(secrets.token_urlsafe(48), _fernet_key())
        self.stub_port, self.relay_port, self.bare_port = free_port(), free_port(), free_port()
        self.wrk = None if force_python else ensure_wrk()
        self.results: dict = {}

    # set-up
    def prepare(self) -> None:
        print(f"== set-up: database {DB_NAME}, stub on {HOST}:{self.stub_port}, relay on {HOST}:{self.relay_port}")
        database_create()
        self.procs.run([PYTHON, "manage.py", "migrate", "--noinput"], env=self.env, timeout=300)
        redis_flush()
        with open(self.tmp / "stub.log", "w") as stub_log:  # the child keeps its own copy of the descriptor
            self.stub = self.procs.start(
                [PYTHON, "-m", "tests.support.stub_provider", "--host", HOST, "--port", self.stub_port],
                stdout=subprocess.DEVNULL, stderr=stub_log,
            )
        wait_for_port(self.stub_port, self.stub, timeout=30)
        stub_url = f"http://{HOST}:{self.stub_port}/v1"
        data = run_role(self.procs, self.tmp, "setup-data", {"stub_url": stub_url}, env=self.env, timeout=120)
        self.secret = data["secret"]
        log = self.tmp / "gunicorn.log"
        with open(log, "w") as gunicorn_log:
            self.gunicorn = self.procs.start(
                [GUNICORN, *self.server_args, "--bind", f"{HOST}:{self.relay_port}"],
                env=self.env, stdout=gunicorn_log, stderr=subprocess.STDOUT,
            )
        wait_for_healthz(self.relay_port, self.gunicorn, log, timeout=60)
        self.relay_url = f"http://{HOST}:{self.relay_port}/v1/chat/completions"
        self.stub_chat_url = f"{stub_url}/chat/completions"
        self.bare_url = f"http://{HOST}:{self.bare_port}/v1/chat/completions"
        self.relay_headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        self.stub_headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
        self._smoke_test()
        self.workers = children_of(self.gunicorn.pid)
        print(f"   gunicorn master {self.gunicorn.pid}, workers {self.workers}; load from "
              f"{'wrk ' + self.wrk if self.wrk else 'the Python generator'}")

    def _smoke_test(self) -> None:
        import requests

        response = requests.post(self.relay_url, data=chat_body("bench"), headers=self.relay_headers, timeout=10)
        if response.status_code != 200 or "choices" not in response.json():
            raise RuntimeError(f"a first call through the relay failed: {response.status_code} {response.text[:500]}")

    def cpu_window(self) -> CpuWindow:
        groups = {"gunicorn": {self.gunicorn.pid, *children_of(self.gunicorn.pid)}, "stub": {self.stub.pid}}
        return CpuWindow(groups)

    # a. throughput
    def throughput(self) -> None:
        seconds = self.plan.throughput_seconds
        print(f"\n== a. throughput: {seconds}s closed loop, {CONNECTIONS} connections, non-streaming 'bench'")
        before = ledger_count()
        window = self.cpu_window()
        if self.wrk:
            script = wrk_script(self.tmp, "chat.lua", chat_body("bench"), self.relay_headers)
            proc = self.procs.start([self.wrk, "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s",
                                     "--latency", "-s", script, self.relay_url],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            window.groups["load generator"] = {proc.pid}
            cpu = self._cpu_during(window, seconds)
            out, _ = proc.communicate(timeout=seconds + 60)
            print("   " + "\n   ".join(out.rstrip().splitlines()))
            figures = parse_wrk(out)
        else:
            figures, cpu = self._python_closed(window, seconds=seconds)
        after = ledger_settled()
        completed = figures["requests"]
        print(f"   requests/s {figures['rps']:.1f}; completed {completed}; non-2xx {figures['non2xx']}; "
              f"socket errors {figures['errors']}")
        print(f"   CPU: {cpu}")
        print(f"   ledger rows written: {after - before}; completed requests: {completed} "
              f"(a surplus up to {CONNECTIONS} is calls in flight when the load generator stopped)")
        self.results["throughput"] = {**figures, "ledger_rows": after - before}

    def _cpu_during(self, window: CpuWindow, seconds: float) -> str:
        """Measure CPU over the steady part of a `seconds`-long run that has just started."""
        margin = 1.0 if seconds >= 4 else 0.0
        time.sleep(margin)
        window.start()
        time.sleep(max(0.5, seconds - 2 * margin))
        return window.stop()

    def _start_python_closed(self, *, seconds: float, total: int | None) -> list[subprocess.Popen]:
        processes = 4
        args = {"url": self.relay_url, "headers": self.relay_headers, "body": chat_body("bench"),
                "threads": CONNECTIONS // processes, "seconds": seconds}
        gens = []
        for i in range(processes):
            share = None if total is None else total // processes + (1 if i < total % processes else 0)
            gens.append(start_role(self.procs, self.tmp, "closed", {**args, "total": share}))
        return gens

    @staticmethod
    def _collect_python_closed(gens: list[subprocess.Popen], *, timeout: float) -> dict:
        parts = [collect_role(g, timeout=timeout) for g in gens]
        elapsed = max(p["elapsed"] for p in parts)
        done = sum(p["ok"] + p["non2xx"] for p in parts)
        return {"requests": done, "elapsed": elapsed, "non2xx": sum(p["non2xx"] for p in parts),
                "errors": sum(p["errors"] for p in parts), "rps": done / elapsed if elapsed else 0.0}

    def _python_closed(self, window: CpuWindow, *, seconds: float) -> tuple[dict, str]:
        gens = self._start_python_closed(seconds=seconds, total=None)
        window.groups["load generator"] = {g.pid for g in gens}
        cpu = self._cpu_during(window, seconds)
        return self._collect_python_closed(gens, timeout=seconds + 120), cpu

    # b. added latency
    def _start_bare_proxy(self) -> subprocess.Popen:
        """bench/bare_proxy.py on the relay's gunicorn set-up: the floor any Python proxy adds here."""
        env = {**self.env, "BARE_PROXY_UPSTREAM": self.stub_chat_url}
        log = self.tmp / "bare_proxy.log"
        with open(log, "w") as bare_log:
            proc = self.procs.start([GUNICORN, *self.server_args, "--bind", f"{HOST}:{self.bare_port}",
                                     "bench.bare_proxy:application"], env=env, stdout=bare_log, stderr=subprocess.STDOUT)
        wait_for_port(self.bare_port, proc, timeout=60)
        return proc

    def latency(self) -> None:
        seconds = self.plan.latency_seconds
        print(f"\n== b. latency: open loop at {LATENCY_RATE} req/s for {seconds}s (after 1s warm-up), "
              "direct to the stub, through a bare proxy, then through the relay")
        bare = self._start_bare_proxy()
        figures = {}
        for name, url, headers, model in (("direct", self.stub_chat_url, self.stub_headers, "gpt-bench"),
                                          ("bare", self.bare_url, self.stub_headers, "gpt-bench"),
                                          ("relay", self.relay_url, self.relay_headers, "bench")):
            result = run_role(self.procs, self.tmp, "paced", {
                "url": url, "headers": headers, "body": chat_body(model), "rate": LATENCY_RATE,
                "seconds": seconds, "warmup_seconds": 1,
            }, timeout=seconds + 120)
            lat = result["latencies_ms"]
            figures[name] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                             "max": max(lat, default=float("nan")), "n": len(lat), "failed": result["failed"]}
            f = figures[name]
            print(f"   {name:6s}: p50 {f['p50']:.2f} ms  p99 {f['p99']:.2f} ms  max {f['max']:.2f} ms  "
                  f"({f['n']} ok, {f['failed']} failed)")
            if name == "bare":
                self.procs.stop(bare)  # idle from here on, but it should not share the machine with the relay
        figures["added_p50"] = figures["relay"]["p50"] - figures["direct"]["p50"]
        figures["added_p99"] = figures["relay"]["p99"] - figures["direct"]["p99"]
        floor_p50, floor_p99 = (figures["bare"][p] - figures["direct"][p] for p in ("p50", "p99"))
        print(f"   added by the relay: p50 {figures['added_p50']:.2f} ms  p99 {figures['added_p99']:.2f} ms")
        print(f"   of which a bare proxy on the same gunicorn set-up (one more Python HTTP hop, nothing else) "
              f"adds p50 {floor_p50:.2f} ms  p99 {floor_p99:.2f} ms; Tollgate's own work: "
              f"p50 {figures['added_p50'] - floor_p50:.2f} ms  p99 {figures['added_p99'] - floor_p99:.2f} ms")
        self.results["latency"] = figures

    # c. streams
    def streams(self) -> None:
        n = self.plan.streams
        print(f"\n== c. streams: {n} concurrent streaming calls on 'bench-stream' ({STREAM_SECONDS}s each)")
        where = "streamed AND outcome = 'ok'"
        before = ledger_count(where)
        start_at = time.time() + 3  # time for every generator process to start its threads
        gens = []
        for first in range(0, n, STREAMS_PER_PROCESS):
            gens.append(start_role(self.procs, self.tmp, "streams", {
                "url": self.relay_url, "headers": self.relay_headers, "body": chat_body("bench-stream", stream=True),
                "count": min(STREAMS_PER_PROCESS, n - first), "start_at": start_at,
            }))
        results = []
        for gen in gens:
            results += collect_role(gen, timeout=STREAM_SECONDS + 150)["results"]
        done = sum(1 for r in results if r["done"])
        wall = max((r["end"] for r in results), default=start_at) - start_at
        rows = ledger_settled(where, expect=before + n, timeout=10) - before
        print(f"   completed with [DONE]: {done}/{n}; wall time {wall:.2f}s; "
              f"ledger rows streamed=true outcome=ok: {rows}/{n}")
        failures = [r for r in results if not r["done"]]
        for r in failures[:5]:
            print(f"   failed: status {r['status']} {r['error']}")
        self.results["streams"] = {"n": n, "done": done, "wall": wall, "rows": rows}

    # d. memory
    def memory(self) -> None:
        calls = self.plan.memory_calls
        print(f"\n== d. memory: worker RSS before and after {calls} non-streaming calls")
        workers = children_of(self.gunicorn.pid)
        before_rss = {pid: rss_mb(pid) for pid in workers}
        before_rows = ledger_count()
        rate_guess = max(50.0, self.results.get("throughput", {}).get("rps", 0) * 0.5)
        budget_seconds = min(3600, int(calls / rate_guess) + 60)
        samples: list[tuple[float, dict]] = []
        started = time.monotonic()
        if self.wrk:
            script = wrk_script(self.tmp, "memory.lua", chat_body("bench"), self.relay_headers,
                                per_thread=math.ceil(calls / 2))
            proc = self.procs.start([self.wrk, "-t2", f"-c{CONNECTIONS}", f"-d{budget_seconds}s", "--timeout", "10s",
                                     "-s", script, self.relay_url],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            # wrk runs for its whole -d even after its threads stop; SIGINT makes it print its summary and exit.
            self._watch_memory_load(lambda: proc.poll() is None, lambda: os.kill(proc.pid, signal.SIGINT),
                                    workers, samples, started, before_rows, calls, stub_port=self.stub_port,
                                    deadline=started + budget_seconds + 30)
            out, _ = proc.communicate(timeout=60)
            figures = parse_wrk(out)
        else:
            gens = self._start_python_closed(seconds=budget_seconds, total=calls)
            self._watch_memory_load(lambda: any(g.poll() is None for g in gens), None, workers, samples, started,
                                    before_rows, calls, stub_port=self.stub_port,
                                    deadline=started + budget_seconds + 150)
            figures = self._collect_python_closed(gens, timeout=60)
        load_seconds = time.monotonic() - started
        time.sleep(2)
        handled = ledger_settled() - before_rows
        after_rss = {pid: rss_mb(pid) for pid in workers}
        now_workers = children_of(self.gunicorn.pid)
        print(f"   calls handled (ledger rows): {handled} in {load_seconds:.0f}s ({handled / load_seconds:.1f} req/s); "
              f"load generator: {figures['requests']} responses, {figures['non2xx']} non-2xx, "
              f"{figures['errors']} socket errors")
        shown = _spread(samples)
        for pid in workers:
            b, a = before_rss[pid], after_rss[pid]
            if a is None:
                print(f"   worker {pid}: before {b:.1f} MB, gone after the run (restarted?)")
                continue
            print(f"   worker {pid}: before {b:.1f} MB  after {a:.1f} MB  growth {a - b:+.1f} MB")
            trail = [f"{t:.0f}s: {rss[pid]:.1f} ({threads[pid]})" for t, rss, threads, _ in shown if rss.get(pid)]
            print("      RSS MB (threads) at " + "  ".join(trail))
        print("   workers' open connections to the stub at " + "  ".join(f"{t:.0f}s: {c}" for t, _, _, c in shown))
        if sorted(now_workers) != sorted(workers):
            print(f"   workers changed during the run: {workers} -> {now_workers}")
        self.results["memory"] = {"calls": handled, "before": before_rss, "after": after_rss}

    @staticmethod
    def _watch_memory_load(running, stop_load, workers, samples, started, before_rows, calls, *, stub_port: int,
                           deadline: float) -> None:
        """Sample worker RSS every second until the load ends; stop it once the ledger shows `calls` calls."""
        while running() and time.monotonic() < deadline:
            samples.append((time.monotonic() - started, {pid: rss_mb(pid) for pid in workers},
                            {pid: thread_count(pid) for pid in workers}, connections_to(stub_port)))
            if stop_load is not None and ledger_count() - before_rows >= calls:
                stop_load()
                stop_load = None
            time.sleep(1)
        if running():
            raise RuntimeError("the memory load overran its deadline")

    # summary
    def summary(self) -> bool:
        r = self.results
        rows: list[tuple[str, str, bool | None]] = []
        if "throughput" in r:
            t = r["throughput"]
            rows.append((f">= {TARGET_RPS} non-streaming req/s (no non-2xx)",
                         f"{t['rps']:.1f} req/s, {t['non2xx']} non-2xx, {t['errors']} socket errors",
                         t["rps"] >= TARGET_RPS and t["non2xx"] == 0 and t["errors"] == 0))
            rows.append(("one ledger row per completed call", f"{t['ledger_rows']} rows / {t['requests']} calls",
                         0 <= t["ledger_rows"] - t["requests"] <= CONNECTIONS))
        if "latency" in r:
            lat = r["latency"]
            rows.append((f"added latency p50 <= {TARGET_ADDED_P50_MS:.0f} ms at {LATENCY_RATE} req/s",
                         (f"{lat['added_p50']:.2f} ms "
                          f"(relay {lat['relay']['p50']:.2f} - direct {lat['direct']['p50']:.2f})"),
                         lat["added_p50"] <= TARGET_ADDED_P50_MS and lat["relay"]["failed"] == 0))
            rows.append((f"added latency p99 <= {TARGET_ADDED_P99_MS:.0f} ms at {LATENCY_RATE} req/s",
                         (f"{lat['added_p99']:.2f} ms "
                          f"(relay {lat['relay']['p99']:.2f} - direct {lat['direct']['p99']:.2f})"),
                         lat["added_p99"] <= TARGET_ADDED_P99_MS and lat["relay"]["failed"] == 0))
        if "streams" in r:
            s = r["streams"]
            scaled = "" if s["n"] == TARGET_STREAMS else f" (quick: {s['n']})"
            rows.append((f"{TARGET_STREAMS} concurrent {STREAM_SECONDS}s streams all complete{scaled}",
                         f"{s['done']}/{s['n']} in {s['wall']:.2f}s", s["done"] == s["n"]))
            rows.append((f"each stream has its ledger entry{scaled}", f"{s['rows']}/{s['n']}", s["rows"] == s["n"]))
        if "memory" in r:
            m = r["memory"]
            after = [v for v in m["after"].values() if v is not None]
            rows.append((f"each worker < {TARGET_RSS_MB:.0f} MB RSS",
                         ", ".join(f"{v:.1f} MB" for v in after) or "workers gone",
                         bool(after) and len(after) == len(m["after"]) and max(after) < TARGET_RSS_MB))
            growth = [m["after"][p] - m["before"][p] for p in m["before"] if m["after"][p] is not None]
            scaled = "" if self.plan.memory_calls == TARGET_MEMORY_CALLS else f" (quick: {self.plan.memory_calls})"
            rows.append((f"no RSS growth over {TARGET_MEMORY_CALLS} calls{scaled} (< {RSS_GROWTH_TOLERANCE_MB:.0f} MB)",
                         ", ".join(f"{g:+.1f} MB" for g in growth) + f" over {m['calls']} calls",
                         bool(growth) and max(growth) < RSS_GROWTH_TOLERANCE_MB))
        if not rows:
            return False
        width_t = max(len(t) for t, _, _ in rows)
        width_m = max(len(m) for _, m, _ in rows)
        print(f"\n== summary{' (--quick: short phases, not the real targets)' if self.quick else ''}")
        print(f"   {'target':{width_t}}  {'measured':{width_m}}  result")
        print(f"   {'-' * width_t}  {'-' * width_m}  ------")
        for target, measured, ok in rows:
            print(f"   {target:{width_t}}  {measured:{width_m}}  {'PASS' if ok else 'FAIL'}")
        return all(ok for _, _, ok in rows)

    def close(self, *, keep_logs: bool) -> None:
        self.procs.stop_all()
        for step in (database_drop, redis_flush):
            try:
                step()
            except Exception as exc:
                print(f"clean-up: {step.__name__} failed: {exc}", file=sys.stderr)
        if keep_logs:
            print(f"logs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _spread(samples: list, points: int = 6) -> list:
    """At most `points` samples, evenly spread, always including the first and the last."""
    if len(samples) <= points:
        return samples
    step = (len(samples) - 1) / (points - 1)
    return [samples[round(i * step)] for i in range(points)]


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (about a minute) to check the bench works")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even when wrk exists")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--gunicorn-args", default="", help="extra gunicorn arguments, e.g. '--workers 3' (to compare set-ups)")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--args-file", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.role:
        args = json.loads(Path(opts.args_file).read_text())
        print(RESULT_MARK + json.dumps(ROLES[opts.role](args)), flush=True)
        return 0

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    phases = [p for p in opts.phases.split(",") if p]
    if set(phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(set(phases) - set(PHASES)))}")
    bench = Bench(QUICK if opts.quick else FULL, quick=opts.quick, force_python=opts.python_load,
                  server_args=[*SERVER_ARGS, *shlex.split(opts.gunicorn_args)])
    ok, failed = False, True
    try:
        bench.prepare()
        for phase in PHASES:
            if phase in phases:
                getattr(bench, phase)()
        ok = bench.summary()
        failed = False
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except Exception as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        if bench.results:
            bench.summary()
    finally:
        bench.close(keep_logs=failed)
    print(f"\n(bench took {time.monotonic() - started:.0f}s; exit status {0 if ok else 2 if failed else 1})")
    return 0 if ok else 2 if failed else 1


if __name__ == "__main__":
    sys.exit(main())
