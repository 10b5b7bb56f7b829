"""The budget guarantees, shown with concurrent requests from several processes against the real relay
(gunicorn, three workers) and the real Redis and PostgreSQL:
(a) recorded spend never exceeds a hard cap; (b) when the last call fits, it is admitted;
(c) a person's cap binds under a team's service key with an actor header as under their own key;
(d) the counters equal the ledger after the run."""
import multiprocessing
from decimal import Decimal

import pytest
import requests

from budgets.models import Grant
from budgets.services import grant_counters_verify
from keys import services as key_services
from keys.actor import sign_actor
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory
from tests.governance.factories import MembershipFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]
HELLO = [{"role": "user", "content": "hello there"}]
COST = Decimal("0.01")  # per call on "pricey": 2 input tokens at $1000/M + 4 output at $2000/M
WORST = Decimal("0.02")  # held per call: 10 input tokens (o200k, with message overhead) + max_tokens 5


def _call(args) -> int:
    url, secret, headers = args
    response = requests.post(f"{url}/v1/chat/completions", json={"model": "pricey", "messages": HELLO, "max_tokens": 5},
                             headers={"Authorization": f"Bearer {secret}", "Connection": "close", **headers}, timeout=30)
    return response.status_code


def _hammer(url: str, calls: list[tuple[str, dict]]) -> list[int]:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        return pool.map(_call, [(url, secret, headers) for secret, headers in calls])


def _spent(grant: Grant) -> Decimal:
    return sum((e.cost for e in LedgerEntry.objects.filter(grant_path__contains=f",{grant.pk},", outcome="ok")), Decimal(0))


@pytest.fixture
def hierarchy(relay):
    relay.alias("pricey", (relay.openai_provider, "gpt-4o-stub"), price=("1000", "2000", "0"))
    member = MembershipFactory()
    team = member.team
    org = GrantFactory(name="org", scope=Grant.Scope.ORG, team=None, limit_amount=Decimal("100"))
    dept = GrantFactory(name="dept", scope=Grant.Scope.DEPARTMENT, team=None, department=team.department, parent=org, limit_amount=Decimal("10"))
    team_grant = GrantFactory(name="team", scope=Grant.Scope.TEAM, team=team, parent=dept, limit_amount=Decimal("1"))
    project = GrantFactory(name="project", scope=Grant.Scope.PROJECT, team=team, project="search", parent=team_grant,
                           limit_amount=Decimal("0.25"))
    return member, project


def test_concurrent_calls_never_pass_the_cap_and_the_counters_match_the_ledger(relay, gunicorn, hierarchy):
    member, project = hierarchy
    keys = [VirtualKeyFactory(person=member.person, team=member.team, default_tags={"project": "search"}) for _ in range(2)]
    statuses = _hammer(gunicorn, [(keys[i % 2].secret, {}) for i in range(48)])
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 10
    spent = _spent(project)
    assert spent <= project.limit_amount  # (a)
    assert spent == statuses.count(200) * COST
    assert grant_counters_verify().drift == []  # (d): every grant on the path, to the unit
    # (b) go on one call at a time: each is admitted until the next could overshoot, and no sooner
    while _call((gunicorn, keys[0].secret, {})) == 200:
        pass
    assert _spent(project) + WORST > project.limit_amount
    assert _spent(project) + WORST - COST <= project.limit_amount
    assert grant_counters_verify().drift == []


def test_a_persons_cap_binds_under_their_key_and_under_a_service_key(relay, gunicorn, hierarchy):
    member, _ = hierarchy
    alice = member.person
    personal = VirtualKeyFactory(person=alice, team=member.team)
    service = key_services.key_issue(name="bot", team=member.team, person=None, actor=None, with_signing_secret=True)
    cap = GrantFactory(name="alice", scope=Grant.Scope.PERSON, person=alice, team=None, limit_amount=Decimal("0.10"))

    def as_alice():
        return dict(zip(("X-Tollgate-Actor", "X-Tollgate-Actor-Signature"), sign_actor(service.signing_secret, user=alice.email)))

    calls = [(personal.secret, {}) if i % 2 else (service.secret, as_alice()) for i in range(24)]
    statuses = _hammer(gunicorn, calls)
    assert statuses.count(200) >= 3
    assert _spent(cap) <= cap.limit_amount  # (c)
    served = LedgerEntry.objects.filter(person=alice, outcome="ok")
    assert {e.key_id for e in served} == {personal.pk, service.key.pk}
    assert grant_counters_verify().drift == []
