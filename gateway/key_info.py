"""GET /v1/key: what a relay key's holder may ask from code before calling (as OpenRouter's GET /api/v1/key):
the key's status, models, rate limits, and per budget this period's spend, what calls in flight hold, what is
left and when it resets. The figures are the key page's (keys.selectors), read the way the relay counts."""
from decimal import Decimal

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from gateway.errors import RelayError
from gateway.relay.checks import _presented_secret
from keys.models import VirtualKey
from keys.selectors import key_aliases, key_budget_lines, key_by_secret


def _refusal(error: RelayError) -> JsonResponse:
    return JsonResponse(error.body(), status=error.status, headers={"Cache-Control": "no-store"})


def _money(value: Decimal | None) -> str | None:
    return None if value is None else f"{value.quantize(Decimal('0.00000001')):f}"


def key_info_body(key: VirtualKey) -> dict:
    lines = key_budget_lines(key)
    capped = [line for line in lines if line.limit is not None and line.blocking]
    tightest = min(capped, key=lambda line: line.left, default=None)
    return {"data": {
        "name": key.name,
        "prefix": key.prefix,
        "status": key.status,
        "key_class": key.key_class,
        "team": key.team.slug,
        "expires_at": key.expires_at,
        "models": [alias.name for alias in key_aliases(key)],
        "rate_limits": {"rpm": key.rpm_limit, "rpd": key.rpd_limit, "tpm": key.tpm_limit, "tpd": key.tpd_limit},
        # The cap calls meet first: the blocking budget with the least left (None: nothing caps this key).
        "limit": _money(tightest.limit) if tightest else None,
        "limit_remaining": _money(tightest.left) if tightest else None,
        "resets_on": tightest.resets_on if tightest else None,
        "budgets": [{"name": line.name, "limit": _money(line.limit), "spent": _money(line.spent),
                     "held": _money(line.held), "remaining": _money(line.left), "resets_on": line.resets_on,
                     "blocking": line.blocking} for line in lines],
    }}


@csrf_exempt
def key_info(request):
    if request.method != "GET":
        return _refusal(RelayError("method_not_allowed", f"{request.method} is not allowed on this endpoint"))
    secret = _presented_secret(request.headers)
    if not secret:
        return _refusal(RelayError("missing_api_key",
                                   "no API key: send 'Authorization: Bearer tg_...' or 'x-api-key: tg_...'"))
    key = key_by_secret(secret)
    if key is None:
        return _refusal(RelayError("invalid_api_key", "the API key is not valid"))
    return JsonResponse(key_info_body(key), headers={"Cache-Control": "no-store"})
