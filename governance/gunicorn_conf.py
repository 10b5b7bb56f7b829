"""gunicorn settings for Tollgate's web tier (relay, pages, admin), read from the environment.

One file for every way the web tier starts: the Dockerfile, docker-compose, `make run`, the relay benchmark
and the tests' production-shaped server all run `gunicorn -c python:governance.gunicorn_conf`.

Worker class: gevent on PostgreSQL. A relay call spends most of its time waiting (on the provider, Redis,
PostgreSQL), and a stream can wait for minutes; gevent's workers serve thousands of them per process on
one OS thread, where gthread needs a thread per call in flight and loses a large share of its CPU to the
threads contending for the GIL (bench/README.md has the figures). Everything the relay calls cooperates
with gevent: sockets (requests, redis-py), psycopg 3 (>= 3.1.14 on its own), threading (patched). SQLite
does not (a wait for its write lock would stall every call in the worker), so on SQLite, the embedded
default, the workers are gthread.
"""
import multiprocessing
import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"{name}: cannot read {value!r} as an integer") from None


_on_postgres = os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://", "pgsql://"))

wsgi_app = "governance.wsgi:application"
bind = os.environ.get("WEB_BIND", "0.0.0.0:8000")
worker_class = os.environ.get("WEB_WORKER_CLASS") or ("gevent" if _on_postgres else "gthread")
if worker_class not in ("gevent", "gthread"):
    raise SystemExit(f"WEB_WORKER_CLASS: {worker_class!r} is not one of gevent, gthread")
if worker_class == "gevent":
    # Django keeps a database connection per thread, and under gevent every call is a thread of its own:
    # a connection kept past its call would never be reused, only left open. So each call gives its
    # connection back when it ends (to the pool when DATABASE_POOL_MAX_SIZE is set, as it should be here).
    os.environ.setdefault("DATABASE_CONN_MAX_AGE", "0")
# One process per core: each runs Python on one core at a time, whatever its worker class.
workers = _int("WEB_WORKERS", multiprocessing.cpu_count())
worker_connections = _int("WEB_CONNECTIONS", 1000)  # gevent: calls in flight per process
threads = _int("WEB_THREADS", 32)  # gthread: calls in flight per process
backlog = 2048
keepalive = 75  # seconds; longer than the idle timeout of most load balancers, so they close first
graceful_timeout = 30
forwarded_allow_ips = os.environ.get("WEB_FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = "-" if os.environ.get("WEB_ACCESS_LOG", "").lower() in ("1", "true", "yes") else None
# The path without its query string, and no referer: a key someone put in a URL never reaches the access log.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)s'



def post_worker_init(worker):
    """Once the worker has loaded the application, and its URL configuration (which imports every view),
    move all that is alive to the garbage collector's permanent generation: it lives as long as the worker,
    and a full collection then scans only what calls created since. Measured in the relay benchmark: full
    collections of about 100 ms, which showed as 100 ms stalls in the latency tail, became about 10 ms."""
    import gc

    from django.apps import apps
    from django.urls import get_resolver

    if apps.ready:  # a Django application (the relay benchmark also serves a bare WSGI app with this file)
        from ledger import writer

        get_resolver().url_patterns  # imports the views now, not on the first call
        # The ledger writer starts now, not on the first call: it first writes what workers that died
        # left in their journals (a worker killed mid-call is replaced by this one).
        writer.start()
    gc.freeze()


def worker_exit(server, worker):
    """A worker stopping (graceful shutdown, max requests, a reload) writes its queued ledger rows and
    closes its journal; what the database does not take now stays there for the next worker. The keys it
    served since its last usage write get their last_used_at."""
    from django.apps import apps

    if apps.ready:
        from gateway.relay.checks import flush_usage_marks
        from ledger import writer

        flush_usage_marks()
        writer.stop()

