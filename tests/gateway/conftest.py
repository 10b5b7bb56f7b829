"""The relay fixtures live in tests/support/relay_fixtures.py (shared with tests/keys); here only what is
gateway-specific: every gateway test starts with empty Redis counters and a fresh catalog cache."""
import pytest


@pytest.fixture(autouse=True)
def _fresh(fresh_state):
    yield
