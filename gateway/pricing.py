"""What a call costs, from the catalog price in force when it was made."""
from decimal import ROUND_HALF_UP, Decimal

from gateway.models import ModelPrice

MILLION = Decimal(1_000_000)
CENT_FRACTION = Decimal("0.00000001")  # the ledger keeps 8 decimal places


def cost_of(price: ModelPrice | None, *, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
            cache_write_tokens: int = 0) -> Decimal:
    """Cached (read) and cache-written input tokens are part of input_tokens; each is billed at its own rate
    (cache writes at the input rate when the catalog has none for them)."""
    if price is None:
        return Decimal(0)
    plain = max(input_tokens - cached_tokens - cache_write_tokens, 0)
    cache_write_rate = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
    total = (
        plain * price.input_per_mtok
        + cached_tokens * price.cached_input_per_mtok
        + cache_write_tokens * cache_write_rate
        + output_tokens * price.output_per_mtok
    ) / MILLION
    return total.quantize(CENT_FRACTION, rounding=ROUND_HALF_UP)
