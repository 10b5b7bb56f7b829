"""Where one relay call spends its time: cProfile over N non-streaming calls, in one process.

Run from the repository root: ``.venv/bin/python -m bench.relay_profile [--calls N] [--top K]``.
It builds the same throwaway PostgreSQL database and stub provider as bench/relay.py, then sends the
calls through Django's WSGI handler in this process (no gunicorn, no load generator), so the profile
shows only Tollgate's own work plus its round trips to PostgreSQL, Redis and the stub. It prints the
mean time per call and the functions with the most cumulative time. A guide for optimisation, not a
target: bench/relay.py measures the targets.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import subprocess
import sys
import time

from bench.relay import (
    HOST,
    PYTHON,
    Processes,
    _fernet_key,
    app_env,
    chat_body,
    database_create,
    database_drop,
    free_port,
    redis_flush,
    setup_data,
    wait_for_port,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=35)
    options = parser.parse_args()

    procs = Processes()
    env = app_env(secrets.token_urlsafe(48), _fernet_key())
    try:
        database_create()
        procs.run([PYTHON, "manage.py", "migrate", "--noinput"], env=env, timeout=300)
        redis_flush()
        port = free_port()
        stub = procs.start([PYTHON, "-m", "tests.support.stub_provider", "--host", HOST, "--port", port],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, stub, timeout=30)
        os.environ.clear()
        os.environ.update(env)
        secret = setup_data({"stub_url": f"http://{HOST}:{port}/v1"})["secret"]
        return profile(secret, options.calls, options.top)
    finally:
        procs.stop_all()
        database_drop()
        redis_flush()


def profile(secret: str, calls: int, top: int) -> int:
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}", HTTP_HOST=HOST)
    body = chat_body("bench")

    def call() -> None:
        response = client.post("/v1/chat/completions", data=body, content_type="application/json")
        if response.status_code != 200:
            raise RuntimeError(f"relay answered {response.status_code}: {response.content[:300]!r}")

    for _ in range(50):  # warm caches, pools and the catalog
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    plain = (time.perf_counter() - started) / calls * 1000
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "cumulative")).print_stats(top)
    print(out.getvalue())
    print(f"{calls} calls: {plain:.2f} ms per call without the profiler (stub answers at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
