"""What a call costs: plain, cached and cache-written input each at its own rate (issue 12: Anthropic's
cache-write tokens were charged at the plain input price, the catalog had no price for them)."""
from decimal import Decimal

from gateway.models import ModelPrice
from gateway.pricing import cost_of
from gateway.translate import usage_from_anthropic


def price(**rates) -> ModelPrice:
    return ModelPrice(input_per_mtok=Decimal("3"), output_per_mtok=Decimal("15"), cached_input_per_mtok=Decimal("0.30"),
                      **rates)


def test_cache_writes_are_billed_at_their_own_rate():
    usage = usage_from_anthropic({"input_tokens": 100, "cache_read_input_tokens": 1000,
                                  "cache_creation_input_tokens": 2000, "output_tokens": 10})
    assert (usage.input_tokens, usage.cached_tokens, usage.cache_write_tokens) == (3100, 1000, 2000)
    cost = cost_of(price(cache_write_per_mtok=Decimal("3.75")), input_tokens=usage.input_tokens,
                   output_tokens=usage.output_tokens, cached_tokens=usage.cached_tokens,
                   cache_write_tokens=usage.cache_write_tokens)
    # 100 plain x 3 + 1000 cached x 0.30 + 2000 written x 3.75 + 10 output x 15, per million
    assert cost == Decimal("0.00825000")


def test_without_a_cache_write_price_writes_cost_the_input_price():
    cost = cost_of(price(), input_tokens=3000, output_tokens=0, cache_write_tokens=2000)
    assert cost == Decimal("0.00900000")
