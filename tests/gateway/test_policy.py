"""Body-logging policy and the rate limiter's guarantee across processes."""
import multiprocessing
import os

import pytest
import requests
from django.utils import timezone

from gateway import ratelimit
from governance.models import BodyLogging
from ledger.models import CallBody, LedgerEntry
from ledger.tasks import purge_call_bodies

pytestmark = pytest.mark.redis
SENSITIVE = "mail jane.doe@example.com or call +1 415 555 0100, card 4111 1111 1111 1111, key sk-abcdefghijklmnop"


def chat(relay, key, content):
    response = requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                             json={"model": "fast", "messages": [{"role": "user", "content": content}]}, timeout=10)
    response.raise_for_status()
    return LedgerEntry.objects.latest("id")


def test_bodies_are_not_stored_by_default(relay, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    chat(relay, key, SENSITIVE)
    assert CallBody.objects.count() == 0


def test_team_policy_redacted_stores_bodies_without_personal_data(relay, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    key.team.body_logging = BodyLogging.REDACTED
    key.team.save()
    body = chat(relay, key, SENSITIVE).body
    assert body.mode == "redacted"
    for secret in ("jane.doe@example.com", "555 0100", "4111 1111", "sk-abcdefghijklmnop"):
        assert secret not in body.request and secret not in body.response
    assert "[EMAIL]" in body.request and "[CARD]" in body.request and "[PHONE]" in body.request
    assert "stub reply:" in body.response


def test_key_policy_overrides_the_team(relay, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    key.team.body_logging = BodyLogging.REDACTED
    key.team.save()
    key.body_logging = BodyLogging.FULL
    key.save()
    assert "jane.doe@example.com" in chat(relay, key, SENSITIVE).body.request


def test_retention_task_deletes_old_bodies_and_keeps_the_ledger(relay, key, settings):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    key.body_logging = BodyLogging.FULL
    key.save()
    old, recent = chat(relay, key, "old call"), chat(relay, key, "recent call")
    CallBody.objects.filter(entry=old).update(created_at=timezone.now() - timezone.timedelta(days=31))
    settings.TOLLGATE_BODY_RETENTION_DAYS = 30
    assert purge_call_bodies() == 1
    assert list(CallBody.objects.values_list("entry_id", flat=True)) == [recent.pk]
    assert LedgerEntry.objects.count() == 2


def _hammer(args):
    scope_id, attempts = args
    limits = [ratelimit.Limit("key", scope_id, "requests", "day", 50)]  # a day window: no boundary mid-test
    admitted = 0
    for _ in range(attempts):
        try:
            ratelimit.admit(limits)
            admitted += 1
        except ratelimit.LimitExceeded:
            pass
    return admitted


def test_request_limit_holds_across_processes(db):
    """Four processes, 40 attempts each, one limit of 50 a day: exactly 50 get through."""
    scope_id = os.getpid() * 1000 + 7
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        admitted = pool.map(_hammer, [(scope_id, 40)] * 4)
    assert sum(admitted) == 50
