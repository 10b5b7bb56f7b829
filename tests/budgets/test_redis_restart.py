"""Through the relay (in-process live server, official OpenAI SDK): streams in flight while Redis loses its
data (the test database's counters flushed, as a restart without persistence would), then what the
counters say once those calls are over. The finer cases are in tests/reliability/test_redis_faults.py."""
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from budgets import enforcement
from budgets.models import Grant
from governance.redis import get_redis
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.redis
HELLO = [{"role": "user", "content": "hello there"}]


def test_streams_in_flight_when_redis_loses_its_data_are_counted_once(relay, transactional_db):
    relay.alias("drip", (relay.openai_provider, "drip-1"), price=("1000", "2000", "0"))
    key = VirtualKeyFactory(monthly_budget=Decimal("50"))
    grant = GrantFactory(name="Team budget", scope=Grant.Scope.TEAM, team=key.team, limit_amount=Decimal("50"),
                         owner=key.team.owner)
    openai = relay.openai(key.secret)
    assert openai.chat.completions.create(model="drip", messages=HELLO, max_tokens=20).choices  # counters exist

    under_way, flushed = threading.Barrier(6), threading.Event()

    def stream(_) -> str:
        chunks = iter(openai.chat.completions.create(model="drip", messages=HELLO, max_tokens=20, stream=True))
        first = next(chunks)
        under_way.wait(timeout=10)
        flushed.wait(timeout=10)
        return "".join(c.choices[0].delta.content or "" for c in [first, *chunks] if c.choices)

    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(stream, i) for i in range(5)]
        under_way.wait(timeout=10)  # every stream has its hold and its first chunk
        get_redis().flushdb()
        flushed.set()
        replies = [s.result() for s in streams]
    assert all(reply.startswith("stub reply") for reply in replies)

    rows = LedgerEntry.objects.filter(outcome="ok")
    assert rows.count() == 6
    for meter in enforcement.meters_for([grant], key):
        assert int(get_redis().get(meter.redis_keys()[0])) == meter.ledger_total()  # not the streams' costs alone
        assert int(get_redis().get(meter.redis_keys()[1]) or 0) == 0  # no hold left
