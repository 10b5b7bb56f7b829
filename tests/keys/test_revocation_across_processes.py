"""Revocation, and a change to the catalog, reach every relay process at once: a real gunicorn with several
workers serves the relay from the test database while the key is revoked, or a model added, from this
process (fixture in tests/support/relay_fixtures.py)."""
import time

import pytest
import requests

from keys import services

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


def test_revocation_reaches_every_worker_within_a_second(relay, gunicorn, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))

    def call():
        # a new connection each time, so the kernel spreads calls over the workers
        return requests.post(f"{gunicorn}/v1/chat/completions", headers={"Authorization": f"Bearer {key.secret}", "Connection": "close"},
                             json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)

    assert all(call().status_code == 200 for _ in range(6))
    revoked_at = time.monotonic()
    services.key_revoke(key=key, actor=None, reason="incident")
    codes = []
    while time.monotonic() - revoked_at < 1.0:
        codes.append(call().json().get("error", {}).get("code"))
    assert codes and set(codes) == {"key_revoked"}, codes


def test_a_new_model_is_served_by_every_worker_at_once(relay, gunicorn, key):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))

    def call(model):
        return requests.post(f"{gunicorn}/v1/chat/completions", headers={"Authorization": f"Bearer {key.secret}", "Connection": "close"},
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)

    assert all(call("fast").status_code == 200 for _ in range(6))  # every worker holds the catalog now
    relay.alias("fresh", (relay.openai_provider, "gpt-stub-fresh"))
    codes = [call("fresh").status_code for _ in range(12)]
    assert codes == [200] * 12, codes
