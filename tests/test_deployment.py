"""The production container files (Dockerfile, docker-compose.yml) agree with the code they run.

Docker itself is not needed: the files are parsed and checked against the installed environment.
"""
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
APP_SERVICES = ["web", "worker", "beat"]
VAR_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def simple_commands(command):
    """The commands a service runs, as argv lists: `sh -c "a && exec b"` gives [a, b]."""
    argv = shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]
    if argv[0] in ("sh", "/bin/sh") and argv[1] == "-c":
        parts = [shlex.split(part) for part in re.split(r"&&|\|\||;", argv[2]) if part.strip()]
        return [part[1:] if part[0] == "exec" else part for part in parts]
    return [argv]


def command_running(services, service, program):
    matches = [argv for argv in simple_commands(services[service]["command"]) if argv[0] == program]
    assert matches, f"{service} does not run {program}"
    return matches[0]


def test_compose_defines_the_production_services(services):
    assert {"postgres", "redis", "web", "worker", "beat"} <= set(services)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_service_programs_are_installed(services, service):
    for argv in simple_commands(services[service]["command"]):
        assert shutil.which(argv[0], path=VENV_BIN), f"{service} runs {argv[0]!r}, which is not in {VENV_BIN}"


def test_migrations_run_as_the_schema_owner_before_the_application_starts(services):
    migrate = command_running(services, "migrate", "python")
    assert migrate[1:3] == ["manage.py", "migrate"] and (ROOT / "manage.py").exists()
    assert services["migrate"]["environment"]["DATABASE_URL"].startswith("postgres://tollgate:")  # the owner
    for service in ("web", "worker", "beat"):
        assert services[service]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[service]["environment"]["DATABASE_URL"].startswith("postgres://tollgate_app:")  # owns nothing


def test_gunicorn_serves_the_wsgi_application_named_in_its_config(services):
    gunicorn = command_running(services, "web", "gunicorn")
    assert gunicorn[1:3] == ["--config", "python:governance.gunicorn_conf"]
    module, _, attribute = importlib.import_module("governance.gunicorn_conf").wsgi_app.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def _gunicorn_conf(**env) -> subprocess.CompletedProcess:
    code = "import governance.gunicorn_conf as c; print(c.worker_class, c.workers)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WEB_", "DATABASE_URL"))}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True, text=True)


def test_web_workers_are_gevent_on_postgres_and_gthread_on_sqlite():
    assert _gunicorn_conf(DATABASE_URL="postgres://db/tollgate", WEB_WORKERS="3").stdout.split() == ["gevent", "3"]
    assert _gunicorn_conf(DATABASE_URL="sqlite:///x.sqlite3").stdout.split()[0] == "gthread"
    assert _gunicorn_conf(DATABASE_URL="postgres://db/tollgate", WEB_WORKER_CLASS="gthread").stdout.split()[0] == "gthread"


def test_a_started_worker_has_its_views_loaded_and_kept_out_of_full_collections():
    code = ("import sys, gc, governance.wsgi, governance.gunicorn_conf as c; c.post_worker_init(None); "
            "print(gc.get_freeze_count() > 0, 'gateway.api' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DEBUG": "true"}, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.stdout.split() == ["True", "True"], result.stderr


@pytest.mark.parametrize("name, value", [("WEB_WORKERS", "many"), ("WEB_WORKER_CLASS", "eventlet")])
def test_a_bad_web_setting_stops_gunicorn_naming_the_variable(name, value):
    result = _gunicorn_conf(**{name: value})
    assert result.returncode != 0 and name in result.stderr


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_celery_services_name_an_existing_celery_app(services, service):
    celery = command_running(services, service, "celery")
    app = celery[celery.index("-A") + 1]
    assert importlib.util.find_spec(f"{app}.celery") is not None


@pytest.mark.parametrize("service", ["postgres", "redis", "web"])
def test_service_has_a_healthcheck(services, service):
    assert services[service].get("healthcheck", {}).get("test"), f"{service} has no healthcheck"


def test_web_healthcheck_probes_healthz(services):
    assert "/healthz" in " ".join(map(str, services["web"]["healthcheck"]["test"]))


def test_services_start_only_after_their_dependencies_are_healthy(services):
    def healthy_dependencies(service):
        depends_on = services[service].get("depends_on", {})
        return {name for name, spec in depends_on.items() if spec.get("condition") == "service_healthy"}

    assert healthy_dependencies("web") >= {"postgres", "redis"}


@pytest.mark.parametrize("service", ["postgres", "redis"])
def test_data_services_keep_their_data_in_named_volumes(compose, service):
    volumes = compose["services"][service].get("volumes", [])
    assert volumes, f"{service} has no volume"
    for volume in volumes:
        source = volume.split(":")[0]
        if source.startswith("./") and volume.endswith(":ro"):  # a file of this repository, read-only (init scripts)
            assert (ROOT / source).exists(), f"{source} does not exist"
            continue
        assert source in (compose.get("volumes") or {}), f"{volume} is not a declared named volume"


def test_compose_environment_variables_are_documented_in_readme(services):
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet")
    referenced = set()
    for service in services.values():
        environment = service.get("environment") or {}
        values = environment.values() if isinstance(environment, dict) else environment
        referenced.update(VAR_REFERENCE.findall(" ".join(str(value) for value in values)))

    lines = readme.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"#+\s.*configuration", line, re.I)), None)
    assert start is not None, "README.md has no Configuration section"
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    table = []
    for line in lines[start + 1 :]:
        heading = re.match(r"(#+)\s", line)
        if heading and len(heading.group(1)) <= level:
            break
        if line.lstrip().startswith("|"):
            table.append(line)
    documented = " ".join(table)
    missing = sorted(name for name in referenced if not re.search(rf"\b{name}\b", documented))
    assert not missing, f"not in README.md's configuration table: {missing}"


def dockerfile_instructions():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_from_python_311():
    instructions = dockerfile_instructions()
    assert instructions[0].split()[0].upper() == "FROM"
    assert instructions[0].split()[1].startswith("python:3.11")


def test_dockerfile_runs_as_a_non_root_user():
    users = [line.split()[1] for line in dockerfile_instructions() if line.split()[0].upper() == "USER"]
    assert users, "the Dockerfile has no USER line"
    assert users[-1].split(":")[0] not in ("root", "0")


@pytest.mark.django_db
def test_every_model_change_has_its_migration():
    from django.core.management import call_command

    call_command("makemigrations", "--check", "--dry-run", verbosity=0)  # exits non-zero when one is missing
