"""The relay at an organisation's size, side by side with the one-grant relay, a bare proxy and LiteLLM.

Run from the repository root: ``.venv/bin/python -m bench.org [--quick]`` (see bench/README.md).

One run, one stub provider, everything on 127.0.0.1, the relays as production runs them (gunicorn with
governance.gunicorn_conf: gevent on PostgreSQL through the psycopg pool, DEBUG off):
- **one-grant relay**: one key, one org grant (bench.relay's data set);
- **org relay**: 2,000 people, 200 teams in 20 departments, 20,000 keys (200 of them service keys),
  5,000 grants four levels deep (org -> department -> team -> person or project), traffic spread over
  1,000 keys, a tenth of it service keys with signed X-Tollgate-Actor headers, a third with project tags;
- **bare proxy** (bench/bare_proxy.py): the floor one more Python HTTP hop costs here;
- **LiteLLM proxy**, installed into a throwaway venv (var/bench-litellm), master key only, no database:
  its lightest mode, with as many workers as the relay.
Phases: the cold burst (64 clients at once, each on a key never used, on a relay that has served nothing),
throughput (wrk, 32 connections, the three servers in turn, twice), added latency over the stub (`hey -c 5
-q 10` and the open-loop generator at 50 req/s), worker RSS. Prints each figure and the issue's ratios.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import relay as base
from bench.relay import HOST, PYTHON, ROOT, Processes, chat_body, free_port, percentile, wait_for_port

ONE_DB, ORG_DB = "tollgate_bench_one", "tollgate_bench_org"
REDIS_DBS = {ONE_DB: (9, 10), ORG_DB: (11, 12)}  # counters/cache, broker: the two relays never share counters
LITELLM_VENV = ROOT / "var" / "bench-litellm"
LITELLM_KEY = "sk-litellm-bench-master"
CONNECTIONS = 32
BURST_CLIENTS = 64
HEY_CLIENTS, HEY_RATE = 5, 10  # `hey -c 5 -q 10`: 5 clients at 10 req/s each
PACED_RATE = 50
PHASES = ("cold_burst", "throughput", "latency", "memory")

PEOPLE, TEAMS, DEPARTMENTS, KEYS, GRANTS = 2000, 200, 20, 20_000, 5000
TRAFFIC_KEYS, SERVICE_SHARE = 1000, 10  # one traffic key in ten is a service key sending a signed actor

# Targets: ratios measured side by side in this run (issue 12).
ORG_VS_ONE_GRANT = 0.95
RELAY_VS_LITELLM_RPS = 3.0
P50_VS_LITELLM = 1 / 3
P50_VS_BARE = 2.0
P99_VS_LITELLM = 1 / 2
BURST_SLOWEST_S = 2.0
RSS_MB, RSS_GROWTH_MB = 150.0, 5.0


# --- data (roles run in a subprocess with the app's settings) --------------------------------------

def setup_org(args: dict) -> dict:
    """The org data set, bulk-written (the services' audit rows and e-mails would take the set-up an hour;
    what the relay reads is the same rows)."""
    import django

    django.setup()
    from datetime import timedelta
    from decimal import Decimal

    from django.utils import timezone

    from budgets.models import Grant
    from gateway.models import Deployment, ModelAlias, ModelPrice, Provider, ProviderModel
    from governance import crypto
    from governance.models import CostCenter, Department, Membership, Person, Team
    from keys import keyformat
    from keys.models import VirtualKey

    high = {"rpm_limit": base.HIGH_LIMIT, "rpd_limit": base.HIGH_LIMIT, "tpm_limit": base.HIGH_LIMIT,
            "tpd_limit": base.HIGH_LIMIT}
    provider = Provider(name="stub", kind=Provider.Kind.OPENAI, base_url=args["stub_url"])
    provider.set_api_key("sk-bench")
    provider.save()
    model = ProviderModel.objects.create(provider=provider, name="gpt-bench", max_output_tokens=4096)
    ModelPrice.objects.create(provider_model=model, effective_from=timezone.now() - timedelta(days=1),
                              input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    alias = ModelAlias.objects.create(name="bench")
    Deployment.objects.create(alias=alias, provider_model=model, priority=0)

    departments = Department.objects.bulk_create(
        Department(name=f"Department {d}", slug=f"dept-{d}") for d in range(DEPARTMENTS))
    centers = CostCenter.objects.bulk_create(
        CostCenter(code=f"CC{d:03}", name=f"Cost center {d}", department=dep) for d, dep in enumerate(departments))
    people = Person.objects.bulk_create(
        Person(username=f"p{i}", email=f"p{i}@org.invalid", password="!", department=departments[i % DEPARTMENTS],
               cost_center=centers[i % DEPARTMENTS], **high) for i in range(PEOPLE))
    teams = Team.objects.bulk_create(
        Team(name=f"Team {t}", slug=f"team-{t}", department=departments[t % DEPARTMENTS],
             cost_center=centers[t % DEPARTMENTS], owner=people[t], **high) for t in range(TEAMS))
    team_of = {p.pk: teams[i % TEAMS] for i, p in enumerate(people)}
    Membership.objects.bulk_create(Membership(person=p, team=team_of[p.pk]) for p in people)

    # Keys: about ten per person on their team, and one service key per team (with a signing secret).
    rows, secrets_by_index, services = [], {}, []
    for i in range(KEYS - TEAMS):  # key i is the (i // PEOPLE)-th key of person i % PEOPLE
        person = people[i % PEOPLE]
        new = keyformat.generate()
        rows.append(VirtualKey(name=f"key {i}", prefix=new.prefix, key_hash=new.hash, person=person,
                               team=team_of[person.pk], **high))
        secrets_by_index[i] = new.secret
    for t, team in enumerate(teams):
        new, signing = keyformat.generate(), secrets.token_urlsafe(32)
        rows.append(VirtualKey(name=f"service {t}", prefix=new.prefix, key_hash=new.hash, team=team,
                               signing_secret_encrypted=crypto.encrypt(signing), **high))
        services.append({"secret": new.secret, "signing": signing, "team": t,
                         "actors": [p.email for j, p in enumerate(people) if j % TEAMS == t][:5]})
    VirtualKey.objects.bulk_create(rows, batch_size=2000)

    # Grants four levels deep: org -> department -> team -> person (on their team) or project.
    def grant(**fields) -> Grant:
        return Grant(name=fields.pop("name"), owner=people[0], grant_class="production", **fields)

    org = Grant.objects.bulk_create([grant(name="Org", scope=Grant.Scope.ORG, limit_amount=Decimal("9e11"))])[0]
    dept_grants = Grant.objects.bulk_create(
        grant(name=f"Dept {d}", scope=Grant.Scope.DEPARTMENT, department=dep, parent=org, limit_amount=Decimal("9e10"))
        for d, dep in enumerate(departments))
    team_grants = Grant.objects.bulk_create(
        grant(name=f"Team {t}", scope=Grant.Scope.TEAM, team=team, parent=dept_grants[t % DEPARTMENTS],
              limit_amount=Decimal("9e9")) for t, team in enumerate(teams))
    leaves = [grant(name=f"Person {i}", scope=Grant.Scope.PERSON, person=p, team=team_of[p.pk],
                    parent=team_grants[i % TEAMS], limit_amount=Decimal("9e8")) for i, p in enumerate(people)]
    projects = GRANTS - len(leaves) - len(team_grants) - len(dept_grants) - 1
    leaves += [grant(name=f"Project {j}", scope=Grant.Scope.PROJECT, project=f"proj-{j}", team=teams[j % TEAMS],
                     parent=team_grants[j % TEAMS], limit_amount=Decimal("9e8")) for j in range(projects)]
    Grant.objects.bulk_create(leaves, batch_size=2000)

    # Traffic: one key each of TRAFFIC_KEYS people (spread over every team) and some service keys; the
    # cold burst uses keys of other people, never used before it.
    person_keys = [{"secret": secrets_by_index[p],
                    "project": f"proj-{p % TEAMS}" if p % 3 == 0 else ""}
                   for p in range(TRAFFIC_KEYS - TRAFFIC_KEYS // SERVICE_SHARE)]
    cold = [secrets_by_index[PEOPLE + p] for p in range(PEOPLE - 2 * BURST_CLIENTS, PEOPLE)]
    return {"person_keys": person_keys, "services": services[:TRAFFIC_KEYS // SERVICE_SHARE], "cold": cold,
            "grants": Grant.objects.count(), "keys": VirtualKey.objects.count()}


def setup_one_grant(args: dict) -> dict:
    """bench.relay's data set (one key), with one org grant over it."""
    result = base.setup_data(args)
    from decimal import Decimal

    from budgets.models import Grant
    from governance.models import Person

    Grant.objects.create(name="Org", owner=Person.objects.get(username="bench"), scope=Grant.Scope.ORG,
                         grant_class="production", limit_amount=Decimal("9e11"))
    return result


def gen_burst(args: dict) -> dict:
    """One call per header set, all started together at `start_at`: status and latency of each."""
    import threading

    import requests

    body = args["body"].encode()
    results, lock = [], threading.Lock()

    def one(headers: dict) -> None:
        session = base._client()
        time.sleep(max(0.0, args["start_at"] - time.time()))
        started = time.perf_counter()
        try:
            status = session.post(args["url"], data=body, headers=headers, timeout=(10, 30)).status_code
        except requests.RequestException:
            status = 0
        with lock:
            results.append((status, time.perf_counter() - started))

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in args["headers_list"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return {"results": results}


ROLES = {"setup-org": setup_org, "setup-one-grant": setup_one_grant, "burst": gen_burst}


# --- the servers ------------------------------------------------------------------------------------

def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(base.PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def _flush_redis(db_name: str) -> None:
    import redis

    for number in REDIS_DBS[db_name]:
        redis.Redis(host=HOST, port=6379, db=number, socket_timeout=5).flushdb()


def ensure_litellm() -> Path:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        print(f"   installing LiteLLM's proxy into a throwaway venv ({LITELLM_VENV}); a few minutes ...")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


class OrgBench:
    def __init__(self, *, quick: bool):
        self.quick = quick
        self.seconds = 5 if quick else 15
        self.rounds = 1 if quick else 2
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-org-"))
        self.secret_key, self.fernet = secrets.token_urlsafe(48), base._fernet_key()
        self.stub_port = free_port()
        self.wrk, self.hey = base.ensure_wrk("wrk"), base.ensure_wrk("hey")
        if not (self.wrk and self.hey):
            raise RuntimeError("this bench needs wrk and hey (Debian packages wrk and hey)")
        self.results: dict = {}

    def env(self, db_name: str) -> dict:
        env = base.app_env(self.secret_key, self.fernet)
        cache, broker = REDIS_DBS[db_name]
        env.update(DATABASE_URL=f"postgres://postgres@{HOST}:5432/{db_name}",
                   REDIS_URL=f"redis://{HOST}:6379/{cache}", CELERY_BROKER_URL=f"redis://{HOST}:6379/{broker}")
        return env

    def _gunicorn(self, name: str, env: dict, port: int, app: str | None = None) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "w") as out:
            proc = self.procs.start([base.GUNICORN, *base.SERVER_ARGS, "--bind", f"{HOST}:{port}",
                                     *([app] if app else [])], env=env, stdout=out, stderr=subprocess.STDOUT)
        if app:
            wait_for_port(port, proc, timeout=60)
        else:
            base.wait_for_healthz(port, proc, log, timeout=60)
        return proc

    def prepare(self) -> None:
        print(f"== set-up: stub on {HOST}:{self.stub_port}; databases {ONE_DB}, {ORG_DB}")
        with open(self.tmp / "stub.log", "w") as stub_log:
            self.stub = self.procs.start([PYTHON, "-m", "tests.support.stub_provider", "--host", HOST,
                                          "--port", self.stub_port], stdout=subprocess.DEVNULL, stderr=stub_log)
        wait_for_port(self.stub_port, self.stub, timeout=30)
        self.stub_url = f"http://{HOST}:{self.stub_port}/v1"
        for db_name in (ONE_DB, ORG_DB):
            _admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
            _flush_redis(db_name)
        _admin(f"CREATE DATABASE {ONE_DB}")
        self.procs.run([PYTHON, "manage.py", "migrate", "--noinput"], env=self.env(ONE_DB), timeout=300)
        _admin(f"CREATE DATABASE {ORG_DB} TEMPLATE {ONE_DB}")  # the same schema, without migrating twice
        started = time.monotonic()
        self.org = base.run_role(self.procs, self.tmp, "setup-org", {"stub_url": self.stub_url}, env=self.env(ORG_DB),
                                 timeout=900, module="bench.org")
        print(f"   org data set: {PEOPLE} people, {TEAMS} teams, {self.org['keys']} keys, {self.org['grants']} grants "
              f"({time.monotonic() - started:.0f}s)")
        one = base.run_role(self.procs, self.tmp, "setup-one-grant", {"stub_url": self.stub_url}, env=self.env(ONE_DB),
                            timeout=120, module="bench.org")
        self.one_headers = {"Authorization": f"Bearer {one['secret']}", "Content-Type": "application/json"}
        self.ports = {name: free_port() for name in ("one", "org", "bare", "litellm")}
        self.servers = {"one": self._gunicorn("one-grant", self.env(ONE_DB), self.ports["one"]),
                        "org": self._gunicorn("org", self.env(ORG_DB), self.ports["org"])}
        self.servers["bare"] = self._gunicorn(
            "bare", {**self.env(ONE_DB), "BARE_PROXY_UPSTREAM": f"{self.stub_url}/chat/completions"},
            self.ports["bare"], app="bench.bare_proxy:application")
        self.servers["litellm"] = self._litellm()
        self.url = {name: f"http://{HOST}:{port}/v1/chat/completions" for name, port in self.ports.items()}
        self.url["direct"] = f"{self.stub_url}/chat/completions"
        stub_headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
        self.fixed_headers = {"one": self.one_headers, "bare": stub_headers, "direct": stub_headers,
                              "litellm": {"Authorization": f"Bearer {LITELLM_KEY}", "Content-Type": "application/json"}}
        self.model = {"one": "bench", "org": "bench", "litellm": "bench", "bare": "gpt-bench", "direct": "gpt-bench"}
        self.workers = base.children_of(self.servers["org"].pid)
        print(f"   servers: one-grant :{self.ports['one']}, org :{self.ports['org']} (workers {self.workers}), "
              f"bare proxy :{self.ports['bare']}, LiteLLM :{self.ports['litellm']}")

    def _litellm(self) -> subprocess.Popen:
        binary = ensure_litellm()
        config = self.tmp / "litellm.yaml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "model_list": [{"model_name": "bench", "litellm_params": {
                "model": "openai/gpt-bench", "api_base": self.stub_url, "api_key": "sk-bench"}}],
            "general_settings": {"master_key": LITELLM_KEY},
            "litellm_settings": {"telemetry": False},
        }))
        version = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('litellm'))"],
                                 capture_output=True, text=True).stdout.strip()
        workers = len(base.children_of(self.servers["org"].pid)) or 2
        print(f"   LiteLLM {version}: {workers} workers, master key only, no database")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
        with open(self.tmp / "litellm.log", "w") as out:
            proc = self.procs.start([binary, "--config", config, "--host", HOST, "--port", self.ports["litellm"],
                                     "--num_workers", workers], env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.ports["litellm"], proc, timeout=180)
        return proc

    # Traffic over the org's keys: headers signed now (a signature is good for 5 minutes).
    def org_headers(self) -> list[dict]:
        from keys.actor import sign_actor

        sets = []
        for key in self.org["person_keys"]:
            headers = {"Authorization": f"Bearer {key['secret']}", "Content-Type": "application/json"}
            if key["project"]:
                headers["X-Tollgate-Tags"] = f"project={key['project']}"
            sets.append(headers)
        for n, service in enumerate(self.org["services"]):
            value, signature = sign_actor(service["signing"], user=service["actors"][n % len(service["actors"])],
                                          feature="assistant")
            sets.append({"Authorization": f"Bearer {service['secret']}", "Content-Type": "application/json",
                         "X-Tollgate-Actor": value, "X-Tollgate-Actor-Signature": signature})
        step = SERVICE_SHARE  # interleave, so every stretch of traffic has its share of service keys
        services = sets[len(self.org["person_keys"]):]
        people = sets[:len(self.org["person_keys"])]
        mixed = []
        for i, headers in enumerate(people):
            mixed.append(headers)
            if i % (step - 1) == step - 2 and services:
                mixed.append(services.pop())
        return mixed + services

    def headers_for(self, name: str) -> list[dict]:
        return self.org_headers() if name == "org" else [self.fixed_headers[name]]

    # phases
    def cold_burst(self) -> None:
        print(f"\n== cold burst: {BURST_CLIENTS} clients at once, each on a key never used, on the org relay before "
              "it has served anything; then again on other unused keys")
        rounds = []
        for n in range(2):
            keys = self.org["cold"][n * BURST_CLIENTS:(n + 1) * BURST_CLIENTS]
            headers = [{"Authorization": f"Bearer {k}", "Content-Type": "application/json"} for k in keys]
            result = base.run_role(self.procs, self.tmp, "burst", {
                "url": self.url["org"], "body": chat_body("bench"), "headers_list": headers,
                "start_at": time.time() + 2}, timeout=120, module="bench.org")["results"]
            errors = sum(1 for status, _ in result if status != 200)
            slowest = max(seconds for _, seconds in result)
            print(f"   round {n + 1}: {len(result) - errors}/{len(result)} ok, {errors} errors; slowest {slowest:.3f}s, "
                  f"p50 {percentile([s for _, s in result], 50):.3f}s")
            rounds.append({"errors": errors, "slowest": slowest})
        self.results["burst"] = rounds
        self.rss_after_burst = {pid: base.rss_mb(pid) for pid in self.workers}

    def throughput(self) -> None:
        print(f"\n== throughput: wrk, {CONNECTIONS} connections, {self.seconds}s each, the servers in turn "
              f"({self.rounds} rounds after a warm-up)")
        order = ("one", "org", "litellm")
        for name in order:  # warm-up: connections, and on the org relay every traffic key used once or more
            self._wrk(name, (2 * self.seconds if name == "org" else 3))
        self.rss_warm = {pid: base.rss_mb(pid) for pid in self.workers}
        figures = {name: [] for name in order}
        for r in range(self.rounds):
            for name in order:
                result = self._wrk(name, self.seconds)
                figures[name].append(result)
                print(f"   round {r + 1} {name:8s}: {result['rps']:7.1f} req/s, non-2xx {result['non2xx']}, "
                      f"socket errors {result['errors']}")
        self.results["throughput"] = {
            name: {"rps": sum(f["rps"] for f in runs) / len(runs), "non2xx": sum(f["non2xx"] for f in runs),
                   "errors": sum(f["errors"] for f in runs)} for name, runs in figures.items()}

    def _wrk(self, name: str, seconds: int) -> dict:
        script = self._wrk_script(name)
        profile = os.environ.get("BENCH_PROFILE") and name in ("one", "org") and seconds > 3
        if profile:  # BENCH_PROFILE=prefix: py-spy on one worker of each relay (collapsed stacks, prefix.one/.org)
            worker = base.children_of(self.servers[name].pid)[0]
            spy = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--format", "raw", "-d", str(seconds - 1),
                                    "-o", f"{os.environ['BENCH_PROFILE']}.{name}", "--pid", str(worker), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = subprocess.run([self.wrk, "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s", "-s",
                              str(script), self.url[name]], capture_output=True, text=True, timeout=seconds + 60).stdout
        if profile:
            spy.wait(30)
        return base.parse_wrk(out)

    def _wrk_script(self, name: str) -> Path:
        """Each wrk thread cycles through the header sets from its own starting point."""
        def lua(text: str) -> str:
            return "[==[" + text + "]==]"

        sets = self.headers_for(name)
        lines = [f"local body = {lua(chat_body(self.model[name]))}", "local sets = {"]
        for headers in sets:
            lines.append("  {" + ", ".join(f"[ {lua(k)} ] = {lua(v)}" for k, v in headers.items()) + "},")
        lines += ["}", "local i = 0",
                  "function setup(thread) thread:set('offset', math.random(#sets)) end",
                  "function init(args) i = tonumber(wrk.thread:get('offset')) or 0 end",
                  "function request()",
                  "  i = i % #sets + 1",
                  "  return wrk.format('POST', nil, sets[i], body)",
                  "end"]
        path = self.tmp / f"{name}.lua"
        path.write_text("\n".join(lines) + "\n")
        return path

    def latency(self) -> None:
        seconds = self.seconds
        print(f"\n== added latency over the stub: `hey -c {HEY_CLIENTS} -q {HEY_RATE}` and the open-loop generator at "
              f"{PACED_RATE} req/s, {seconds}s each")
        figures = {}
        for name in ("direct", "bare", "one", "org", "litellm"):
            figures[name] = {"hey": self._hey(name, seconds), "paced": self._paced(name, seconds)}
            h, p = figures[name]["hey"], figures[name]["paced"]
            print(f"   {name:8s}: hey p50 {h['p50']:6.2f} p99 {h['p99']:6.2f} ms ({h['failed']} failed); "
                  f"open loop p50 {p['p50']:6.2f} p99 {p['p99']:6.2f} ms ({p['failed']} failed)")
        for gen in ("hey", "paced"):
            direct = figures["direct"][gen]
            for name in ("bare", "one", "org", "litellm"):
                f = figures[name][gen]
                f["added_p50"], f["added_p99"] = f["p50"] - direct["p50"], f["p99"] - direct["p99"]
        self.results["latency"] = figures
        for gen in ("hey", "paced"):
            print(f"   added ({gen}): " + "; ".join(
                f"{n} p50 {figures[n][gen]['added_p50']:.2f} p99 {figures[n][gen]['added_p99']:.2f} ms"
                for n in ("bare", "one", "org", "litellm")))

    def _hey(self, name: str, seconds: int) -> dict:
        headers = self.headers_for(name)[0]
        args = [self.hey, "-z", f"{seconds}s", "-c", str(HEY_CLIENTS), "-q", str(HEY_RATE), "-m", "POST",
                "-d", chat_body(self.model[name]), "-o", "csv"]
        for k, v in headers.items():
            args += (["-T", v] if k == "Content-Type" else ["-H", f"{k}: {v}"])
        subprocess.run([*args[:2], "2s", *args[3:], self.url[name]], capture_output=True, timeout=60)  # warm-up
        out = subprocess.run([*args, self.url[name]], capture_output=True, text=True, timeout=seconds + 60).stdout
        rows = list(csv.DictReader(io.StringIO(out)))
        ok = [float(r["response-time"]) * 1000 for r in rows if r["status-code"] == "200"]
        return {"p50": percentile(ok, 50), "p99": percentile(ok, 99), "n": len(ok), "failed": len(rows) - len(ok)}

    def _paced(self, name: str, seconds: int) -> dict:
        result = base.run_role(self.procs, self.tmp, "paced", {
            "url": self.url[name], "headers": self.headers_for(name)[0], "headers_list": self.headers_for(name),
            "body": chat_body(self.model[name]), "rate": PACED_RATE, "seconds": seconds, "warmup_seconds": 1,
        }, timeout=seconds + 120)
        lat = result["latencies_ms"]
        return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "n": len(lat), "failed": result["failed"]}

    def memory(self) -> None:
        """RSS after the cold burst, once the caches are warm (every traffic key, grant and meter loaded) and at
        the end; "flat" is judged from warm to the end."""
        warm = getattr(self, "rss_warm", None) or getattr(self, "rss_after_burst", None)
        if warm is None:
            return
        after = {pid: base.rss_mb(pid) for pid in self.workers}
        burst = getattr(self, "rss_after_burst", {})
        print("\n== org relay workers' RSS: " + "; ".join(
            f"{pid}: {burst.get(pid) or 0:.1f} MB after the cold burst, {warm.get(pid) or 0:.1f} MB warm, "
            f"{mb or 0:.1f} MB at the end" for pid, mb in after.items()))
        self.results["memory"] = {"start": warm, "end": after}

    def summary(self) -> bool:
        r, rows = self.results, []
        if "burst" in r:
            b = r["burst"]
            rows.append((f"cold burst: 0 errors, slowest < {BURST_SLOWEST_S:g}s",
                         "; ".join(f"{x['errors']} errors, slowest {x['slowest']:.2f}s" for x in b),
                         all(x["errors"] == 0 and x["slowest"] < BURST_SLOWEST_S for x in b)))
        if "throughput" in r:
            t = r["throughput"]
            clean = all(t[n]["non2xx"] == 0 and t[n]["errors"] == 0 for n in ("one", "org"))
            ratio = t["org"]["rps"] / t["one"]["rps"]
            rows.append((f"org throughput >= {ORG_VS_ONE_GRANT:.0%} of one-grant",
                         f"{t['org']['rps']:.0f} / {t['one']['rps']:.0f} req/s = {ratio:.2f}", clean and ratio >= ORG_VS_ONE_GRANT))
            ratio = t["org"]["rps"] / t["litellm"]["rps"]
            rows.append((f"org throughput >= {RELAY_VS_LITELLM_RPS:g}x LiteLLM",
                         f"{t['org']['rps']:.0f} / {t['litellm']['rps']:.0f} req/s = {ratio:.2f}x", clean and ratio >= RELAY_VS_LITELLM_RPS))
        if "latency" in r:
            for gen, label in (("hey", f"hey -c{HEY_CLIENTS} -q{HEY_RATE}"), ("paced", f"open loop {PACED_RATE}/s")):
                f = r["latency"]
                org, lite, bare = f["org"][gen], f["litellm"][gen], f["bare"][gen]
                ok = org["failed"] == 0
                rows.append((f"{label}: added p50 <= 1/3 LiteLLM's",
                             f"{org['added_p50']:.2f} vs {lite['added_p50']:.2f} ms = {org['added_p50'] / lite['added_p50']:.2f}",
                             ok and org["added_p50"] <= lite["added_p50"] * P50_VS_LITELLM))
                rows.append((f"{label}: added p50 <= 2x bare proxy's",
                             f"{org['added_p50']:.2f} vs {bare['added_p50']:.2f} ms = {org['added_p50'] / bare['added_p50']:.2f}",
                             ok and org["added_p50"] <= bare["added_p50"] * P50_VS_BARE))
                rows.append((f"{label}: added p99 <= 1/2 LiteLLM's",
                             f"{org['added_p99']:.2f} vs {lite['added_p99']:.2f} ms = {org['added_p99'] / lite['added_p99']:.2f}",
                             ok and org["added_p99"] <= lite["added_p99"] * P99_VS_LITELLM))
        if "memory" in r:
            m = r["memory"]
            end = [v for v in m["end"].values() if v]
            growth = [m["end"][p] - m["start"][p] for p in m["start"] if m["end"].get(p) and m["start"][p]]
            rows.append((f"worker RSS < {RSS_MB:g} MB and flat (< {RSS_GROWTH_MB:g} MB growth)",
                         ", ".join(f"{v:.1f} MB" for v in end) + " (" + ", ".join(f"{g:+.1f}" for g in growth) + ")",
                         bool(end) and max(end) < RSS_MB and bool(growth) and max(growth) < RSS_GROWTH_MB))
        width_t, width_m = max(len(x[0]) for x in rows), max(len(x[1]) for x in rows)
        print(f"\n== summary{' (--quick: short phases)' if self.quick else ''}")
        for target, measured, ok in rows:
            print(f"   {target:{width_t}}  {measured:{width_m}}  {'PASS' if ok else 'FAIL'}")
        return all(ok for *_, ok in rows)

    def close(self, *, keep_logs: bool) -> None:
        self.procs.stop_all()
        for db_name in (ORG_DB, ONE_DB):
            try:
                _admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
                _flush_redis(db_name)
            except Exception as exc:
                print(f"clean-up of {db_name} failed: {exc}", file=sys.stderr)
        if keep_logs:
            print(f"logs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.org", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases, one round: to check the bench works")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--args-file", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.role:
        args = json.loads(Path(opts.args_file).read_text())
        print(base.RESULT_MARK + json.dumps(ROLES[opts.role](args)), flush=True)
        return 0
    signal.signal(signal.SIGTERM, base._raise_on_sigterm)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")
    started, ok, failed = time.monotonic(), False, True
    bench = OrgBench(quick=opts.quick)
    try:
        bench.prepare()
        for phase in PHASES:
            if phase in opts.phases.split(","):
                getattr(bench, phase)()
        ok, failed = bench.summary(), False
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except Exception as exc:
        print(f"\nbench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        bench.close(keep_logs=failed)
    print(f"\n(bench took {time.monotonic() - started:.0f}s; exit status {0 if ok else 2 if failed else 1})")
    return 0 if ok else 2 if failed else 1


if __name__ == "__main__":
    sys.exit(main())
