"""The relay keeps keys, grants and the catalog in each process's memory (keys.selectors,
budgets.enforcement, gateway.catalog); every
write that changes what the relay decides must reach it on the very next call, and without its stamp store
the relay reads the database instead of trusting what it holds."""
from decimal import Decimal

import pytest
import requests

from budgets.models import Grant
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory

pytestmark = pytest.mark.redis
HELLO = [{"role": "user", "content": "hello there"}]


def call(relay, key, model="fast"):
    return requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                         json={"model": model, "messages": HELLO, "max_tokens": 5}, timeout=10)


@pytest.fixture
def fast(relay):
    return relay.alias("fast", (relay.openai_provider, "gpt-stub"))


def code_of(response) -> str | None:
    return response.json().get("error", {}).get("code")


def test_a_team_allowlist_change_binds_on_the_next_call(relay, fast, key):
    other = relay.alias("other", (relay.openai_provider, "gpt-stub-2"))
    assert call(relay, key).status_code == 200  # the key is now in the relay's memory
    key.team.allowed_models.set([other])
    refused = call(relay, key)
    assert refused.status_code == 403 and code_of(refused) == "model_not_allowed"


def test_deactivating_the_owner_refuses_the_next_call(relay, fast, key):
    assert call(relay, key).status_code == 200
    key.person.is_active = False
    key.person.save()
    refused = call(relay, key)
    assert refused.status_code == 401 and code_of(refused) == "key_inactive"


def test_a_suspended_grant_refuses_the_next_call(relay, fast, key):
    grant = GrantFactory(name="Team budget", scope=Grant.Scope.TEAM, team=key.team, limit_amount=Decimal("10"),
                         owner=key.team.owner)
    assert call(relay, key).status_code == 200  # the grant is now in the relay's memory
    grant.status = Grant.Status.SUSPENDED
    grant.save()
    refused = call(relay, key)
    assert code_of(refused) == "grant_suspended"
    assert LedgerEntry.objects.filter(error_code="grant_suspended").count() == 1


def test_a_catalog_change_reaches_the_relay_on_the_next_call(relay, fast, key):
    assert call(relay, key).status_code == 200  # the catalog is now in the relay's memory
    price = fast.deployments.get().provider_model.prices.get()
    price.input_per_mtok = price.output_per_mtok = Decimal("1000")
    price.save()
    assert call(relay, key).status_code == 200
    first, second = LedgerEntry.objects.filter(outcome="ok").order_by("id")
    assert second.cost > first.cost * 100  # the second call was charged the new price
    fast.is_active = False
    fast.save()
    refused = call(relay, key)
    assert refused.status_code == 404 and code_of(refused) == "model_not_found"


def test_without_the_stamp_store_every_call_reads_the_database(relay, fast, key, settings):
    assert call(relay, key).status_code == 200
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there: stamps cannot be read
    key.status = key.Status.SUSPENDED
    key.save()  # its stamp bump cannot be published either
    refused = call(relay, key)
    assert refused.status_code == 401 and code_of(refused) == "key_suspended"


def test_a_login_leaves_the_relays_key_cache_alone(relay, fast, key, client):
    """Reproduction: every web login saved Person.last_login, which bumped the keys stamp and flushed every
    relay process's key cache."""
    from governance import stamps

    key.person.set_password("a-long-password-123")
    key.person.save()
    before = stamps.current(stamps.KEYS)
    response = client.post("/accounts/login/", {"username": key.person.username, "password": "a-long-password-123"})
    assert response.status_code == 302  # logged in (last_login saved)
    assert stamps.current(stamps.KEYS) == before
    key.person.is_active = False
    key.person.save(update_fields=["is_active"])  # what the relay reads still reaches it
    assert stamps.current(stamps.KEYS) != before


def test_a_change_whose_stamp_was_lost_reaches_the_relay_within_the_cache_age(relay, fast, key, settings):
    """The safety net under the stamps: every key held is read again each TOLLGATE_MEMORY_CACHE_SECONDS."""
    import time

    from keys.models import VirtualKey

    settings.TOLLGATE_MEMORY_CACHE_SECONDS = 0.5
    assert call(relay, key).status_code == 200
    VirtualKey.objects.filter(pk=key.pk).update(status=VirtualKey.Status.SUSPENDED)  # no stamp bump at all
    time.sleep(0.6)
    refused = call(relay, key)
    assert refused.status_code == 401 and code_of(refused) == "key_suspended"
