"""What a call costs, from the catalog price in force when it was made."""
from decimal import ROUND_HALF_UP, Decimal

from gateway.models import ModelPrice

MILLION = Decimal(1_000_000)
CENT_FRACTION = Decimal("0.00000001")  # the ledger keeps 8 decimal places


def cost_of(price: ModelPrice | None, *, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Decimal:
    """Cached input tokens are part of input_tokens and billed at the cached rate."""
    if price is None:
        return Decimal(0)
    uncached = max(input_tokens - cached_tokens, 0)
    total = (
        uncached * price.input_per_mtok
        + cached_tokens * price.cached_input_per_mtok
        + output_tokens * price.output_per_mtok
    ) / MILLION
    return total.quantize(CENT_FRACTION, rounding=ROUND_HALF_UP)
