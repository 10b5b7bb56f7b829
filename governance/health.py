"""/healthz: the process is up. /readyz: the database, the cache and the Celery broker answer, and the ledger's
journal directory takes writes."""
import time
import uuid

from django.core.cache import cache
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from governance.celery import app as celery_app


@require_GET
@never_cache
def healthz(request):
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_cache() -> None:
    probe = uuid.uuid4().hex
    cache.set("readyz:probe", probe, timeout=10)
    if cache.get("readyz:probe") != probe:
        raise RuntimeError("cache did not return what was written")


def _check_broker() -> None:
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_spool() -> None:
    """The ledger journals' directory (TOLLGATE_SPOOL_DIR) takes writes: without it a database outage or a
    crashed worker could lose ledger rows."""
    from django.conf import settings

    directory = settings.TOLLGATE_SPOOL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".readyz-{uuid.uuid4().hex}"
    probe.write_bytes(b"ok")
    probe.unlink()


CHECKS = {"database": _check_database, "cache": _check_cache, "broker": _check_broker, "spool": _check_spool}


@require_GET
@never_cache
def readyz(request):
    results, ready = {}, True
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
            results[name] = {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:  # any failure means not ready; the class name says which, never a secret
            ready = False
            results[name] = {"ok": False, "error": type(exc).__name__}
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": results}, status=200 if ready else 503)
