"""The budget hold is an upper bound on what the provider bills, so concurrent calls cannot pass a cap.

Reproduction: the hold counted input as 1 token per 3 characters. A prompt of short words ("a a a ...")
is billed one token a word, about 1.5 times the estimate; 20 such calls at once took a $1.00 cap to $1.20.
Now the input is counted with the model's tokenizer where one fits (OpenAI models), else bounded by its
UTF-8 bytes, both with per-message overhead."""
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import openai
import pytest

from budgets.models import Grant
from budgets.services import grant_counters_verify
from ledger.models import LedgerEntry
from tests.budgets.factories import GrantFactory
from tests.support.stub_provider import count_words

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

PROMPT = " ".join(["a"] * 300)  # the stub bills one token a word: 300 tokens, about 1.5x the old estimate
CAP = Decimal("1.00")


@pytest.mark.parametrize("provider_model", ["gpt-4o-mini", "stub-chat"], ids=["tokenizer", "byte-bound"])
def test_twenty_calls_at_once_never_pass_a_cap_with_a_prompt_billed_above_the_old_estimate(relay, key, provider_model):
    relay.alias("wordy", (relay.openai_provider, provider_model), price=("1000", "1000", "0"))  # $0.001 a token
    GrantFactory(scope=Grant.Scope.TEAM, team=key.team, limit_amount=CAP,
                         grant_class=Grant.GrantClass.EXPERIMENTATION)
    client = relay.openai(key.secret)

    def call(_):
        try:
            client.chat.completions.create(model="wordy", messages=[{"role": "user", "content": PROMPT}], max_tokens=1)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(call, range(20)))

    served = LedgerEntry.objects.filter(outcome=LedgerEntry.Outcome.OK)
    spent = sum((entry.cost for entry in served), Decimal(0))
    billed_each = Decimal(count_words(PROMPT) + 1) / 1000
    print(f"\n{provider_model}: {statuses.count(200)} served, {statuses.count(429)} refused at the cap, "
          f"ledger {spent} of {CAP}, {LedgerEntry.objects.count()} rows for 20 calls")
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1
    assert served.count() == statuses.count(200) and LedgerEntry.objects.count() == 20
    assert all(entry.cost == billed_each for entry in served)  # the provider did bill above the old estimate
    assert spent <= CAP
    assert grant_counters_verify(repair=False).drift == []
