"""The relay fixtures live in tests/support/relay_fixtures.py (shared with every app); here only what is
budget-specific: every budgets test starts with empty Redis counters and a fresh catalog cache."""
import pytest


@pytest.fixture(autouse=True)
def _fresh(fresh_state):
    yield
