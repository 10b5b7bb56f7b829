"""Lifecycle as the relay sees it: revocation, rotation grace, signed actors on service keys."""
import time

import pytest
import requests
from django.utils import timezone

from keys import services
from keys.actor import sign_actor
from ledger.models import LedgerEntry
from tests.governance.factories import MembershipFactory

pytestmark = pytest.mark.redis
HELLO = [{"role": "user", "content": "hello there"}]


def call(relay, secret, headers=None):
    return requests.post(f"{relay.v1}/chat/completions", json={"model": "fast", "messages": HELLO}, timeout=10,
                         headers={"Authorization": f"Bearer {secret}", **(headers or {})})


@pytest.fixture
def fast(relay):
    return relay.alias("fast", (relay.openai_provider, "gpt-stub"))


def test_revoked_key_is_refused_on_the_next_call(relay, fast, key):
    assert call(relay, key.secret).status_code == 200
    started = time.monotonic()
    services.key_revoke(key=key, actor=None, reason="leaked in a repo")
    response = call(relay, key.secret)
    elapsed = time.monotonic() - started
    assert response.status_code == 401 and response.json()["error"]["code"] == "key_revoked"
    assert elapsed < 1.0, f"revocation took {elapsed:.3f}s to reach the relay"


def test_rotated_secret_works_through_the_grace_period_then_stops(relay, fast, key):
    import time_machine

    rotated = services.key_rotate(key=key, actor=None, grace_hours=24)
    assert call(relay, key.secret).status_code == 200 and call(relay, rotated.secret).status_code == 200
    with time_machine.travel(timezone.now() + timezone.timedelta(hours=24, minutes=1)):
        old = call(relay, key.secret)
        assert old.status_code == 401 and old.json()["error"]["code"] == "invalid_api_key"
        assert call(relay, rotated.secret).status_code == 200


@pytest.fixture
def service_key(key):
    return services.key_issue(name="support bot", team=key.team, person=None, actor=None, with_signing_secret=True)


def test_signed_actor_attributes_a_service_key_call_to_the_person(relay, fast, service_key):
    alice = MembershipFactory(team=service_key.key.team).person
    value, signature = sign_actor(service_key.signing_secret, user=alice.email, feature="triage", environment="prod")
    response = call(relay, service_key.secret, {"X-Tollgate-Actor": value, "X-Tollgate-Actor-Signature": signature})
    assert response.status_code == 200
    row = LedgerEntry.objects.get()
    assert (row.key_id, row.person_id) == (service_key.key.pk, alice.pk)
    assert row.tags == {"feature": "triage", "environment": "prod"}


@pytest.mark.usefixtures("one_rate_window")
def test_the_actors_own_limit_binds_under_a_service_key(relay, fast, service_key):
    alice = MembershipFactory(team=service_key.key.team).person
    alice.rpm_limit = 1
    alice.save()
    headers = dict(zip(("X-Tollgate-Actor", "X-Tollgate-Actor-Signature"), sign_actor(service_key.signing_secret, user=alice.email)))
    assert call(relay, service_key.secret, headers).status_code == 200
    second = call(relay, service_key.secret, headers)
    assert second.status_code == 429 and "person limit" in second.json()["error"]["message"]
    assert call(relay, service_key.secret).status_code == 200  # unattributed calls are the team's


@pytest.mark.parametrize("tamper, code", [
    ("signature", "invalid_actor"), ("stale", "invalid_actor"), ("stranger", "unknown_actor"),
])
def test_bad_actor_headers_are_refused(relay, fast, service_key, tamper, code):
    alice = MembershipFactory(team=service_key.key.team).person
    user = "stranger@example.com" if tamper == "stranger" else alice.email
    ts = int(time.time()) - 3600 if tamper == "stale" else None
    value, signature = sign_actor(service_key.signing_secret, user=user, ts=ts)
    if tamper == "signature":
        signature = sign_actor("not-the-secret", user=user)[1]
    response = call(relay, service_key.secret, {"X-Tollgate-Actor": value, "X-Tollgate-Actor-Signature": signature})
    assert response.json()["error"]["code"] == code
    assert LedgerEntry.objects.get().error_code == code


def test_person_keys_cannot_claim_an_actor(relay, fast, key):
    value, signature = sign_actor("anything", user=key.person.email)
    response = call(relay, key.secret, {"X-Tollgate-Actor": value, "X-Tollgate-Actor-Signature": signature})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_actor"


def test_an_actor_who_joins_or_leaves_the_team_is_seen_on_the_next_call(relay, fast, service_key):
    """Actors are kept in memory with the keys: a membership change must reach the relay at once."""
    from governance.models import Membership
    from tests.governance.factories import PersonFactory

    bob = PersonFactory()
    headers = dict(zip(("X-Tollgate-Actor", "X-Tollgate-Actor-Signature"), sign_actor(service_key.signing_secret, user=bob.email)))
    assert call(relay, service_key.secret, headers).json()["error"]["code"] == "unknown_actor"
    membership = MembershipFactory(team=service_key.key.team, person=bob)
    assert call(relay, service_key.secret, headers).status_code == 200
    Membership.objects.filter(pk=membership.pk).delete()  # a queryset delete: signals still fire per row
    assert call(relay, service_key.secret, headers).json()["error"]["code"] == "unknown_actor"


def test_a_call_records_when_its_key_was_last_used(relay, fast, key):
    from gateway.relay import checks
    from keys.models import VirtualKey

    checks._usage.__init__()  # this process has written no usage yet: the first is written at once
    assert call(relay, key.secret).status_code == 200
    assert VirtualKey.objects.get(pk=key.pk).last_used_at is not None
