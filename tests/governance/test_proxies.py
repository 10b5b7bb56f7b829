"""Behind the documented load balancer: the client's address comes from X-Forwarded-For only through
TRUSTED_PROXIES, for IP allowlists, the ledger and the audit trail alike."""
import ipaddress

import pytest
import requests

from governance.context import client_ip
from ledger.models import LedgerEntry

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def behind_proxy(settings):
    settings.TRUSTED_PROXIES = ["127.0.0.1/32", "10.0.0.0/8"]
    settings.TRUSTED_PROXY_NETWORKS = [ipaddress.ip_network(c) for c in settings.TRUSTED_PROXIES]


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
    ("127.0.0.1", "6.6.6.6, 203.0.113.7", "203.0.113.7"),  # the client's own claim is not believed
    ("127.0.0.1", "203.0.113.7, 10.1.2.3", "203.0.113.7"),  # through two of our proxies
    ("127.0.0.1", "not-an-ip", "127.0.0.1"),
    ("198.51.100.9", "203.0.113.7", "198.51.100.9"),  # not a trusted proxy: its header is ignored
])
def test_the_client_is_the_nearest_untrusted_address(behind_proxy, peer, forwarded, expected):
    assert client_ip({"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}) == expected


def test_without_trusted_proxies_the_header_is_ignored():
    assert client_ip({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.7"}) == "127.0.0.1"


@pytest.mark.redis
def test_allowlists_and_the_ledger_see_the_client_behind_the_balancer(relay, key, behind_proxy):
    relay.alias("fast", (relay.openai_provider, "gpt-stub"))
    key.ip_allowlist = ["203.0.113.0/24"]
    key.save()

    def call(forwarded):
        return requests.post(f"{relay.v1}/chat/completions", json={"model": "fast", "messages": HELLO}, timeout=10,
                             headers={"Authorization": f"Bearer {key.secret}", "X-Forwarded-For": forwarded})

    assert call("203.0.113.7").status_code == 200
    refused = call("198.51.100.1")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ip_not_allowed"
    assert list(LedgerEntry.objects.order_by("id").values_list("client_ip", flat=True)) == ["203.0.113.7", "198.51.100.1"]
