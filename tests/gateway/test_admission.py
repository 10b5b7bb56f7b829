"""Rate limits and the budget hold in one Redis round trip (gateway.relay.checks.admit_and_reserve, on
governance.redis.run_parts), with the same outcomes as the two steps one after the other."""
from decimal import Decimal

import pytest
import redis
import requests
from django.conf import settings

from budgets import enforcement
from budgets.models import Grant
from governance.redis import ScriptPart, get_redis, run_parts
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("one_rate_window")]
HELLO = [{"role": "user", "content": "hello there"}]


def call(relay, key):
    return requests.post(f"{relay.v1}/chat/completions", headers={"Authorization": f"Bearer {key.secret}"},
                         json={"model": "fast", "messages": HELLO, "max_tokens": 5}, timeout=10)


@pytest.fixture
def fast(relay):
    return relay.alias("fast", (relay.openai_provider, "gpt-stub"))


@pytest.fixture
def team_grant(key):
    return GrantFactory(name="Team budget", scope=Grant.Scope.TEAM, team=key.team, limit_amount=Decimal("10"),
                        owner=key.team.owner)


def redis_calls(command: str) -> int:
    stats = get_redis().info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


def test_limits_and_the_hold_take_one_round_trip(relay, fast, key, team_grant):
    key.rpm_limit = 100
    key.save()
    for _ in range(2):  # warm: key and grants in memory, and each script Redis is sent loaded there once
        assert call(relay, key).status_code == 200
    get_redis().config_resetstat()
    assert call(relay, key).status_code == 200
    # one script for the stamps check, limits and hold, one to settle; no separate read of the stamps
    assert redis_calls("evalsha") == 2 and redis_calls("eval") == 0 and redis_calls("mget") == 0


def counter_commands_during(action) -> list[str]:
    """The counter commands clients sent Redis while `action` ran (MONITOR), not those run inside scripts."""
    sent = []
    with redis.Redis.from_url(settings.REDIS_URL).monitor() as monitor:
        action()
        get_redis().echo("end of action")
        while (command := monitor.next_command())["command"] != "ECHO end of action":
            name = command["command"].split()[0].upper()
            if command["client_type"] != "lua" and name in ("EVAL", "EVALSHA", "INCRBY", "EXPIRE", "DECRBY", "HDEL"):
                sent.append(name)
    return sent


def test_settling_the_hold_and_charging_the_tokens_take_one_round_trip(relay, fast, key, team_grant):
    key.tpm_limit = 10_000
    key.save()
    tokens = []
    for _ in range(2):  # warm, as above
        tokens.append(call(relay, key).json()["usage"]["total_tokens"])
    sent = counter_commands_during(lambda: tokens.append(call(relay, key).json()["usage"]["total_tokens"]))
    assert sent == ["EVALSHA", "EVALSHA"]  # counting, then settling the hold and charging the tokens
    # both happened: the tokens of the three calls are counted, the grant is charged what the ledger says
    assert call(relay, key).headers["x-ratelimit-remaining-tokens"] == str(10_000 - sum(tokens))
    assert enforcement.spent_now(team_grant) == sum(e.cost for e in LedgerEntry.objects.filter(outcome="ok"))
    assert int(get_redis().get(enforcement.meters_for([team_grant])[0].redis_keys()[1]) or 0) == 0  # no hold left


def test_a_change_is_caught_by_the_counting_script_and_nothing_is_counted_twice(relay, fast, key, team_grant):
    key.rpm_limit = 3
    key.save()
    assert call(relay, key).status_code == 200  # counted once; the key is in memory
    key.rpm_limit = 2
    key.save()  # bumps the keys stamp: the next call's assumption is stale
    assert call(relay, key).status_code == 200  # the stale attempt counted nothing; the retry counted 2 of 2
    refused = call(relay, key)
    assert refused.status_code == 429 and "key limit of 2 requests" in refused.json()["error"]["message"]


def test_a_call_refused_by_its_rate_limit_holds_no_budget(relay, fast, key, team_grant):
    key.rpm_limit = 1
    key.save()
    assert call(relay, key).status_code == 200
    refused = call(relay, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    meter = enforcement.meters_for([team_grant])[0]
    assert int(get_redis().get(meter.redis_keys()[1]) or 0) == 0  # nothing held
    assert int(get_redis().get(meter.redis_keys()[0])) == enforcement.to_units(LedgerEntry.objects.get(outcome="ok").cost)


def test_a_budget_refusal_after_admission_still_counts_the_request(relay, fast, key, team_grant):
    key.rpm_limit = 2
    key.save()
    team_grant.limit_amount = Decimal("0.000001")  # below any call's worst case
    team_grant.save()
    first = call(relay, key)
    assert first.status_code == 429 and first.json()["error"]["code"] == "budget_exceeded"
    assert call(relay, key).json()["error"]["code"] == "budget_exceeded"
    assert call(relay, key).json()["error"]["code"] == "rate_limit_exceeded"  # both refusals were counted


def test_parts_see_their_own_keys_and_arguments_and_stop_when_told(db):
    client = get_redis()
    client.flushdb()
    echo = "redis.call('SET', KEYS[1], ARGV[1]) return {tonumber(ARGV[2]), KEYS[1], #KEYS, #ARGV}"
    first = ScriptPart(echo, ["a"], ["1", "0"], go_on_if="r[1] == 0")
    second = ScriptPart(echo, ["b", "c"], ["2", "7", "extra"])
    assert run_parts(client, [first, second]) == [[0, b"a", 1, 2], [7, b"b", 2, 3]]
    stopping = ScriptPart(echo, ["a"], ["3", "1"], go_on_if="r[1] == 0")
    assert run_parts(client, [stopping, ScriptPart(echo, ["d"], ["4", "0"])]) == [[1, b"a", 1, 2]]
    assert client.get("d") is None  # the part after a failed condition never ran
