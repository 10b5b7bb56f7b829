"""Relay fixtures: a real stub provider on loopback, a catalog pointing at it, keys, and the relay itself
served by pytest-django's live server (a real HTTP server in a thread of this process)."""
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest
import requests
from django.conf import settings

from gateway.models import ModelAlias, Provider
from governance import runtime
from governance.redis import get_redis
from tests.gateway.factories import (
    DeploymentFactory,
    ModelAliasFactory,
    ModelPriceFactory,
    ProviderFactory,
    ProviderModelFactory,
)
from tests.keys.factories import VirtualKeyFactory
from tests.support.stub_provider import StubProvider

PROVIDER_SECRET = "sk-upstream-provider-secret-123456"


@pytest.fixture(scope="session")
def stub():
    with StubProvider() as server:
        yield server


@pytest.fixture
def fresh_state(stub):
    """Counters in Redis, the per-process catalog cache and this process's open budget holds must not leak
    between tests: a hold an earlier test left open would be put back into the emptied Redis (the recovery
    after a data loss, budgets.enforcement.recovery) under a grant id SQLite hands out again."""
    runtime.drop()
    forget_open_holds()
    client = get_redis()
    if client is not None:
        client.flushdb()
    stub.reset()
    yield
    runtime.drop()


def forget_open_holds() -> None:
    from budgets.enforcement import recovery

    with recovery._open_lock:
        recovery._open.clear()
    recovery._epoch_seen = None


@pytest.fixture
def one_rate_window():
    """Rate limits count in fixed windows (a minute, a day), so a test whose calls straddle the turn of a
    minute sees its counts start again. Such a test runs from 1 s into the current minute, the clock then
    ticking on as usual (time-machine moves every thread's clock: the live server's too)."""
    import time_machine

    now = time.time()
    with time_machine.travel(now - now % 60 + 1, tick=True):
        yield


@dataclass
class Relay:
    url: str
    openai_provider: Provider
    anthropic_provider: Provider
    clients: list = field(default_factory=list)

    def openai(self, secret: str) -> openai.OpenAI:
        """The official OpenAI SDK pointed at the relay; closed after the test so no server thread lingers."""
        client = openai.OpenAI(base_url=self.v1, api_key=secret, max_retries=0)
        self.clients.append(client)
        return client

    def anthropic(self, secret: str) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=self.url, api_key=secret, max_retries=0)
        self.clients.append(client)
        return client

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def alias(self, name: str, *deployments: tuple[Provider, str], kind=ModelAlias.Kind.CHAT, max_output_tokens=4096,
              price=("1.00", "2.00", "0.50")) -> ModelAlias:
        """An alias routed, in order, to (provider, provider model name) deployments."""
        alias = ModelAliasFactory(name=name, kind=kind)
        for priority, (provider, model_name) in enumerate(deployments):
            model = ProviderModelFactory(provider=provider, name=model_name, max_output_tokens=max_output_tokens)
            ModelPriceFactory(provider_model=model, input_per_mtok=Decimal(price[0]), output_per_mtok=Decimal(price[1]),
                              cached_input_per_mtok=Decimal(price[2]))
            DeploymentFactory(alias=alias, provider_model=model, priority=priority)
        return alias  # every process sees it on its next call (gateway.apps bumps the catalog's stamp)


@pytest.fixture
def relay(live_server, stub, fresh_state) -> Relay:
    openai_provider = ProviderFactory(name="Stub OpenAI", kind=Provider.Kind.OPENAI, base_url=stub.openai_base_url,
                                      api_key=PROVIDER_SECRET, read_timeout=2.0)
    anthropic_provider = ProviderFactory(name="Stub Anthropic", kind=Provider.Kind.ANTHROPIC, base_url=stub.anthropic_base_url,
                                         api_key=PROVIDER_SECRET, read_timeout=2.0)
    relay = Relay(live_server.url, openai_provider, anthropic_provider)
    yield relay
    for client in relay.clients:
        client.close()


@pytest.fixture
def key(transactional_db):
    return VirtualKeyFactory()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gunicorn(relay, tmp_path):
    """The relay as it runs in production (governance/gunicorn_conf.py: gevent workers on PostgreSQL), with three
    worker processes, on the test database
    (PostgreSQL only: the test must commit its data, so use it with transactional tests)."""
    db = settings.DATABASES["default"]
    user = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    socket_dir = db.get("OPTIONS", {}).get("host")  # pgserver's unix socket
    url = (f"postgres://{user}@/{db['NAME']}?host={socket_dir}" if socket_dir
           else f"postgres://{user}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}")
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": url, "DEBUG": "false", "SECRET_KEY": settings.SECRET_KEY,
           "TOLLGATE_ENCRYPTION_KEYS": ",".join(settings.TOLLGATE_ENCRYPTION_KEYS), "SECURE_SSL_REDIRECT": "false",
           "ALLOWED_HOSTS": "127.0.0.1", "LOG_LEVEL": "WARNING", "TOLLGATE_SPOOL_DIR": str(tmp_path / "spool"),
           "WEB_ACCESS_LOG": "1"}  # to tmp_path / "gunicorn-access.log"
    # Files, never pipes: nobody reads a pipe during the test, and once its 64 KB buffer is full of log lines a
    # worker blocks in its next write (a hang seen in CI: a worker stuck in StreamHandler.emit on stderr).
    with open(tmp_path / "gunicorn-access.log", "w") as access, open(tmp_path / "gunicorn-stderr.log", "w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "python:governance.gunicorn_conf", "--bind", f"127.0.0.1:{port}",
             "--workers", "3"],
            cwd=Path(__file__).resolve().parents[2], env=env, stdout=access, stderr=errors, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=2).ok:
                break
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("gunicorn did not start: " + (tmp_path / "gunicorn-stderr.log").read_text()[-2000:])
    yield base
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:  # a worker is stuck: say where, then stop it
        stacks = _stacks_of(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        stderr = (tmp_path / "gunicorn-stderr.log").read_text()[-3000:]
        pytest.fail(f"gunicorn did not stop within 15 s; stderr:\n{stderr}\n{stacks}")


def _stacks_of(pid: int) -> str:
    """The Python stacks of a process and its children (py-spy, when installed), for a test that hung."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return "(py-spy not installed: no stacks)"
    out = subprocess.run([spy, "dump", "--subprocesses", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    return out.stdout[-6000:] + out.stderr[-1000:]


