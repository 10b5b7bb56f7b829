import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from governance import logging as tg_logging
from governance.celery import app as celery_app
from keys import keyformat

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_ENV = {
    "DEBUG": "false",
    "SECRET_KEY": "x" * 20 + "-production-secret-key-with-enough-entropy-Q7v9",
    "TOLLGATE_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
    "ALLOWED_HOSTS": "tollgate.example.com",
}


def _manage(*args, env):
    clean = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "TOLLGATE_ENCRYPTION_KEYS", "DEBUG")}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean_with_production_settings():
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr and "issues" in result.stdout


@pytest.mark.parametrize("missing", ["SECRET_KEY", "TOLLGATE_ENCRYPTION_KEYS"])
def test_production_start_without_a_secret_fails_naming_it(missing):
    env = {k: v for k, v in PRODUCTION_ENV.items() if k != missing}
    result = _manage("check", env=env)
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {missing}" in result.stderr


def test_unreadable_value_names_the_variable():
    result = _manage("check", env={**PRODUCTION_ENV, "DATABASE_CONN_MAX_AGE": "forever"})
    assert result.returncode != 0 and "DATABASE_CONN_MAX_AGE" in result.stderr


def test_stores_and_broker_come_from_the_environment():
    probe = ("from django.conf import settings as s; print(s.DATABASES['default']['ENGINE'], s.DATABASES['default']['HOST'], "
             "s.CACHES['default']['BACKEND'], s.CELERY_BROKER_URL)")
    env = {**PRODUCTION_ENV, "DATABASE_URL": "postgres://tg@db.internal:5432/tollgate",
           "REDIS_URL": "redis://cache.internal:6379/0", "CELERY_BROKER_URL": "redis://cache.internal:6379/1"}
    result = _manage("shell", "-v", "0", "-c", probe, env=env)
    assert result.stdout.strip().splitlines()[-1].split() == [
        "django.db.backends.postgresql", "db.internal", "django.core.cache.backends.redis.RedisCache", "redis://cache.internal:6379/1"
    ], result.stderr


def test_healthz_says_the_process_is_up(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_checks_database_cache_and_broker(client):
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ready" and set(body["checks"]) == {"database", "cache", "broker", "spool"}


@pytest.mark.django_db
def test_readyz_is_503_when_the_ledger_journal_cannot_be_written(client, settings, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    settings.TOLLGATE_SPOOL_DIR = tmp_path / "a-file" / "spool"
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503 and body["checks"]["spool"]["ok"] is False


@pytest.mark.django_db
def test_readyz_is_503_when_the_broker_is_unreachable(client):
    original = celery_app.conf.broker_write_url
    celery_app.conf.broker_write_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    try:
        response = client.get("/readyz")
    finally:
        celery_app.conf.broker_write_url = original
    body = response.json()
    assert response.status_code == 503
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["database"]["ok"] is True


def _json_log_line(message, *args) -> dict:
    import io

    from pythonjsonlogger.json import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("%(levelname)s %(message)s %(request_id)s"))
    handler.addFilter(tg_logging.RequestIdFilter())
    handler.addFilter(tg_logging.RedactSecretsFilter())
    logger = logging.getLogger("tollgate.test")
    logger.addHandler(handler)
    try:
        logger.warning(message, *args)
    finally:
        logger.removeHandler(handler)
    return json.loads(stream.getvalue())


def test_logs_are_json_lines_with_the_request_id():
    from governance.context import request_id_var

    token = request_id_var.set("req-abcdef123")
    try:
        line = _json_log_line("relay call %s", "done")
    finally:
        request_id_var.reset(token)
    assert line["message"] == "relay call done" and line["request_id"] == "req-abcdef123"


@pytest.mark.parametrize("secret", [keyformat.generate().secret, "Bearer abc.def-ghi_jkl", "sk-proj-abcdef1234567890"])
def test_secrets_never_reach_the_log(secret):
    line = _json_log_line("calling with %s", secret)
    assert secret not in json.dumps(line) and tg_logging.REDACTED in line["message"]


def test_responses_carry_a_request_id(client):
    response = client.get("/healthz", HTTP_X_REQUEST_ID="client-supplied-id-1")
    assert response["X-Request-ID"] == "client-supplied-id-1"
    assert len(client.get("/healthz", HTTP_X_REQUEST_ID="bad id!")["X-Request-ID"]) == 32


def test_a_command_run_beside_make_run_uses_its_embedded_redis(tmp_path):
    """`tollgate run` writes var/run.env with its embedded Redis; a manage.py command run by hand meanwhile
    (with no REDIS_URL or DATABASE_URL of its own) must reach the same Redis as the running relay."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "run.env").write_text("REDIS_URL=unix:///tmp/tollgate-test-redis.sock\n")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DEBUG="true", TOLLGATE_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="governance.settings")
    result = subprocess.run([sys.executable, "-c", "from django.conf import settings; print(settings.REDIS_URL)"],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "unix:///tmp/tollgate-test-redis.sock", result.stderr


def test_management_api_tokens_never_reach_the_log():
    """A tg_api_ token written without "Bearer" before it (a command's output, an exception) is redacted too."""
    from governance.api import tokens

    secret = tokens.generate()[0]
    line = _json_log_line("token issued: %s", secret)
    assert secret not in json.dumps(line) and tg_logging.REDACTED in line["message"]
