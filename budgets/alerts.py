"""Budget alerts: thresholds (50/80/100% by default) crossed on the request path, pages for production
grants allowed past their cap, unverifiable budgets, and month-end forecasts. The crossing is detected
where the spend changes; the sending is a Celery task queued after commit, and a unique row per
(grant, period, kind) makes every alert go out once per period however many processes race for it."""
import logging
from datetime import datetime
from decimal import Decimal

import requests
from django.db import IntegrityError, transaction
from django.utils import timezone

from budgets.enforcement import Settled, period_start, spent_now
from budgets.models import Grant, GrantAlert
from governance import roles
from governance.notify import email_after_commit

log = logging.getLogger(__name__)


def _queue(grant: Grant, since: datetime, kind: str, spent: Decimal) -> None:
    from budgets.tasks import send_grant_alert

    # robust: an alert that cannot be queued is logged, never a reason to fail the call that crossed it.
    transaction.on_commit(lambda: send_grant_alert.delay(grant.pk, since.isoformat(), kind, str(spent)), robust=True)


def after_settle(settled: list[Settled]) -> None:
    for item in settled:
        limit = item.grant.limit_amount
        if not limit:
            continue
        for threshold in sorted(item.grant.alert_thresholds or []):
            line = limit * Decimal(threshold) / 100
            if item.before < line <= item.after:
                _queue(item.grant, item.since, str(threshold), item.after)


def cap_reached(grant: Grant) -> None:
    """A call was refused at this grant's cap: its owner hears once per period."""
    _queue(grant, period_start(grant.period, term_start=grant.term_start), "cap", spent_now(grant))


def page_over_cap(grant: Grant) -> None:
    _queue(grant, period_start(grant.period, term_start=grant.term_start), "page", spent_now(grant))


def alert_unverified(grants: list[Grant]) -> None:
    """Redis is down and production grants admitted calls unchecked: IT hears about it once an hour."""
    if grants:
        hour = timezone.now().replace(minute=0, second=0, microsecond=0)
        _queue(grants[0], hour, "unverified", Decimal(0))


def _message(grant: Grant, kind: str, spent: Decimal) -> tuple[str, str]:
    limit = f"{grant.limit_amount}"
    if kind == "page":
        return (f"PAGE: grant '{grant.name}' is past its cap and still serving",
                f"Production grant '{grant.name}' (owner {grant.owner}) has spent {spent:.2f} of {limit} this period "
                "and its policy keeps calls flowing. Raise the limit, change the policy or suspend it.")
    if kind == "unverified":
        return (f"Budget counters unreachable: calls on '{grant.name}' admitted unchecked",
                "Redis could not be reached; production grants admit calls without a budget check until it is back.")
    if kind == "cap":
        return (f"Grant '{grant.name}' is at its cap: calls are being refused",
                f"'{grant.name}' (owner {grant.owner}) has spent {spent:.2f} of {limit} this period; calls that could "
                "go past it are refused. Ask for more from the My grants page, or delegate differently.")
    if kind == "forecast":
        return (f"Grant '{grant.name}' is forecast to pass its limit",
                f"At the current pace '{grant.name}' will spend more than {limit} this period ({spent:.2f} so far).")
    return (f"Grant '{grant.name}' reached {kind}% of its limit",
            f"'{grant.name}' (owner {grant.owner}) has spent {spent:.2f} of {limit} this period.")


def send(grant_id: int, since_iso: str, kind: str, spent: str) -> bool:
    """Send one alert unless it was already sent this period. Returns whether this call sent it."""
    grant = Grant.objects.select_related("owner").get(pk=grant_id)
    try:
        with transaction.atomic():
            GrantAlert.objects.create(grant=grant, period_start=datetime.fromisoformat(since_iso), kind=kind, spent=Decimal(spent))
            subject, body = _message(grant, kind, Decimal(spent))
            recipients = [grant.owner, *grant.watchers.all()]
            if kind in ("page", "unverified"):
                recipients += roles.people_with_role(roles.IT_ADMIN)
            email_after_commit(to=recipients, subject=subject, body=body)
    except IntegrityError:
        return False
    if grant.webhook_url:
        try:
            requests.post(grant.webhook_url, json={"text": f"*{subject}*\n{body}"}, timeout=5).raise_for_status()
        except requests.RequestException as exc:
            log.warning("budget webhook for grant %s failed: %s", grant.pk, type(exc).__name__)
    return True


def forecast_alerts(*, now=None) -> int:
    """Month-end forecast: spend so far projected linearly over the period; alert when it passes the limit."""
    now = now or timezone.now()
    sent = 0
    for grant in Grant.objects.filter(status=Grant.Status.ACTIVE, period=Grant.Period.MONTHLY).select_related("owner"):
        since = period_start(grant.period, now=now)
        next_month = (since.replace(day=28) + timezone.timedelta(days=4)).replace(day=1)
        elapsed = (now - since) / (next_month - since)
        spent = spent_now(grant)
        if elapsed > 0.1 and spent / Decimal(elapsed) > grant.limit_amount and spent < grant.limit_amount:
            sent += send(grant.pk, since.isoformat(), "forecast", str(spent))
    return sent
