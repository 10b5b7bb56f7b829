"""manage.py issue_key and revoke_key, for IT automation."""
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from gateway.models import ModelAlias
from keys.models import VirtualKey
from keys.selectors import key_by_secret
from tests.gateway.factories import ModelAliasFactory
from tests.governance.factories import MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def member():
    ModelAliasFactory(name="fast")
    ModelAliasFactory(name="smart", tier=ModelAlias.Tier.PREMIUM)
    return MembershipFactory()


def issue(*args):
    out, err = StringIO(), StringIO()
    call_command("issue_key", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_issue_key_prints_only_the_key(member):
    out, _ = issue("--person", member.person.email, "--team", member.team.slug, "--models", "fast", "--budget", "25")
    secret = out.strip()
    assert "\n" not in secret and key_by_secret(secret).monthly_budget == 25


def test_service_key_prints_key_and_signing_secret(member):
    out, _ = issue("--service", "--team", member.team.slug, "--models", "fast")
    secret, signing = out.split()
    key = key_by_secret(secret)
    assert key.is_service_key and key.signing_secret == signing


@pytest.mark.parametrize("args, message", [
    (["--team", "nope", "--models", "fast"], "no team"),
    (["--models", "gpt-9"], "unknown model"),
    (["--models", "smart"], "approver"),
    (["--models", "fast", "--budget", "lots"], "--budget"),
])
def test_issue_key_errors_exit_non_zero_with_a_message(member, args, message):
    base = ["--person", member.person.email] + ([] if "--team" in args else ["--team", member.team.slug])
    with pytest.raises(CommandError, match=message):
        issue(*base, *args)
    assert not VirtualKey.objects.exists()


def test_revoke_key_by_prefix(member):
    out, _ = issue("--person", member.person.email, "--team", member.team.slug, "--models", "fast")
    key = key_by_secret(out.strip())
    result = StringIO()
    call_command("revoke_key", key.prefix, "--reason", "offboarding", stdout=result)
    key.refresh_from_db()
    assert key.status == "revoked" and key.prefix in result.getvalue()
    with pytest.raises(CommandError, match="no key"):
        call_command("revoke_key", "tg_l_nothere", "--reason", "x")


def test_command_line_errors_go_to_stderr_with_exit_status_1(member):
    import os
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "manage.py", "issue_key", "--team", "t", "--models", "fast", "--budget", "lots"],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DEBUG": "true"})
    assert result.returncode == 1 and result.stdout == "" and "--budget: 'lots' is not an amount" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_revoke_key_fails_loudly_when_running_processes_cannot_be_told(member, settings):
    """Reproduction: beside `make run`, revoke_key could not reach the embedded Redis, printed "revoked" and
    exited 0, and the key kept working on a worker for ~40 s."""
    from governance import redis as shared_redis

    out, _ = issue("--person", member.person.email, "--team", member.team.slug, "--models", "fast")
    key = key_by_secret(out.strip())
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    shared_redis._client.cache_clear()
    try:
        with pytest.raises(CommandError, match="revoked in the database, but running processes could not be told"):
            call_command("revoke_key", key.prefix, "--reason", "offboarding", stdout=StringIO())
    finally:
        shared_redis._client.cache_clear()
    key.refresh_from_db()
    assert key.status == "revoked"
