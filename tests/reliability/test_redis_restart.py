"""Through the relay (in-process live server, official OpenAI SDK) on a redis-server of the test's own:
Redis restarted empty while streams are in flight, then a burst against the same experimentation cap.

Reproduction: the settle script created the lost counter from 0, so the rebuild from the ledger never
happened: a grant at $0.70 came back as $0.10 and a burst then took a $1.00 experimentation cap to $1.60.
What must hold: once the streams are over the counters equal the ledger (all the spend before the restart
included, no hold left behind), and the burst after it never takes the ledger past the cap."""
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import openai
import pytest

from budgets import enforcement
from budgets.models import Grant
from governance.redis import get_redis
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]
HELLO = [{"role": "user", "content": "hello there"}]
CAP = Decimal("0.60")  # room for the 4 streams' holds ($0.129 each: drip-1 has no tokenizer, its bound is bytes)
STREAMS = 4


def test_streams_in_flight_through_a_redis_restart_are_counted_once_and_a_burst_stays_under_the_cap(relay, throwaway_redis):
    # An OpenAI model name (the hold counts the prompt with its tokenizer): $0.02 held, $0.01 charged a call.
    relay.alias("drip", (relay.openai_provider, "drip-1"), price=("1000", "2000", "0"))
    relay.alias("pricey", (relay.openai_provider, "gpt-4o-stub"), price=("1000", "2000", "0"))
    key = VirtualKeyFactory(monthly_budget=Decimal("50"))
    grant = GrantFactory(name="Team budget", scope=Grant.Scope.TEAM, team=key.team, limit_amount=CAP,
                         grant_class=Grant.GrantClass.EXPERIMENTATION, owner=key.team.owner)
    client = relay.openai(key.secret)
    for _ in range(5):  # spend before the restart: $0.05, which a counter created from 0 would forget
        client.chat.completions.create(model="pricey", messages=HELLO, max_tokens=5)

    under_way, restarted = threading.Barrier(STREAMS + 1), threading.Event()

    def stream(_) -> str:
        chunks = iter(client.chat.completions.create(model="drip", messages=HELLO, max_tokens=20, stream=True))
        first = next(chunks)
        under_way.wait(timeout=10)
        restarted.wait(timeout=10)
        return "".join(c.choices[0].delta.content or "" for c in [first, *chunks] if c.choices)

    with ThreadPoolExecutor(STREAMS) as pool:
        streams = [pool.submit(stream, i) for i in range(STREAMS)]
        under_way.wait(timeout=10)  # every stream holds its worst case and has sent its first chunk
        throwaway_redis.restart_empty()
        restarted.set()
        replies = [s.result(timeout=30) for s in streams]
    assert all(reply.startswith("stub reply") for reply in replies)

    def call(_):
        try:
            client.chat.completions.create(model="pricey", messages=HELLO, max_tokens=5)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(20) as pool:
        burst = list(pool.map(call, range(60)))

    served = LedgerEntry.objects.filter(outcome="ok")
    spent = sum((e.cost for e in served), Decimal(0))
    counters = {m.name: (int(get_redis().get(m.redis_keys()[0]) or -1), m.ledger_total(),
                         int(get_redis().get(m.redis_keys()[1]) or 0)) for m in enforcement.meters_for([grant], key)}
    print(f"\nbefore: 5 calls; {STREAMS} streams through the restart; burst: {burst.count(200)} served, "
          f"{burst.count(429)} refused at the cap; ledger {spent} of {CAP} in {served.count()} rows; "
          f"counters (counted, ledger, held): {counters}")
    assert set(burst) <= {200, 429} and burst.count(200) >= 1 and burst.count(429) >= 1
    assert served.count() == 5 + STREAMS + burst.count(200)
    assert spent <= CAP
    for name, (counted, ledger, held) in counters.items():
        assert counted == ledger, f"{name}: counter {counted} != ledger {ledger}"
        assert held == 0, f"{name}: {held} still held after every call ended"
