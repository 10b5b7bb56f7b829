"""Budget alerts: thresholds (50/80/100% by default) crossed on the request path, pages for production
grants allowed past their cap, unverifiable budgets, and month-end forecasts. The crossing is detected
where the spend changes; the sending is a Celery task queued after commit, and a unique row per
(grant, period, kind) makes every alert go out once per period however many processes race for it.

The broker is the same Redis whose outage some alerts report, so raising an alert never depends on it: when
the task cannot be queued at once (one attempt: a broker that refuses fails in milliseconds, one that does
not answer in half a second, not after Celery's retries), the alert is kept as a pending GrantAlert row
(one small insert) and `deliver_pending` sends it later: every minute from beat, and as soon as this
process queues anything again. An alert about Redis being down is kept at once, without trying."""
import logging
import os
import threading
from datetime import datetime
from decimal import Decimal

import requests
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from budgets.enforcement import Settled, period_start, spent_now
from budgets.models import Grant, GrantAlert
from governance import roles
from governance.webhooks import grant_alert_payload, webhook_emit

log = logging.getLogger(__name__)

# Publishing an alert: one attempt, short socket timeouts. Celery's defaults retry and reconnect for
# seconds per publish, which a relay call that crossed a threshold must not wait for.
_FAIL_FAST = {"max_retries": 0, "socket_connect_timeout": 0.5, "socket_timeout": 1}
_kept: set[tuple] = set()  # alerts this process kept pending, so it inserts each once
_kept_lock = threading.Lock()
_kept_pid: int | None = None


def _queue(grant: Grant, since: datetime, kind: str, spent: Decimal, *, broker: bool = True) -> None:
    # robust: an alert that cannot even be kept is logged, never a reason to fail the call that crossed it.
    transaction.on_commit(lambda: _hand_over(grant.pk, since, kind, spent, broker=broker), robust=True)


def _hand_over(grant_id: int, since: datetime, kind: str, spent: Decimal, *, broker: bool) -> None:
    from budgets.tasks import deliver_pending_grant_alerts, send_grant_alert

    if broker:
        try:
            _publish(send_grant_alert, grant_id, since.isoformat(), kind, str(spent))
        except Exception as exc:
            log.warning("budget alert %s for grant %s could not be queued (%s): kept to send later",
                        kind, grant_id, type(exc).__name__)
        else:
            if _take_kept():  # the broker is back: what this process kept goes out now, not at the next beat
                try:
                    _publish(deliver_pending_grant_alerts)
                except Exception as exc:
                    log.warning("pending budget alerts wait for beat (%s)", type(exc).__name__)
            return
    _keep_pending(grant_id, since, kind, spent)


def _publish(task, *args) -> None:
    with _broker_connections(task.app).acquire(block=True, timeout=1) as connection:
        task.apply_async(args, connection=connection, retry=False)


_pool: tuple | None = None  # (pid, broker url, kombu ConnectionPool)
_pool_lock = threading.Lock()


def _broker_connections(app):
    """This process's fail-fast connections to the broker (a fork or a new broker URL starts a new pool)."""
    global _pool
    url = app.conf.broker_write_url
    with _pool_lock:
        if _pool is None or _pool[:2] != (os.getpid(), url):
            connection = app.connection_for_write(url, connect_timeout=1, transport_options=_FAIL_FAST)
            _pool = (os.getpid(), url, connection.Pool(limit=8))
        return _pool[2]


def _keep_pending(grant_id: int, since: datetime, kind: str, spent: Decimal) -> None:
    """The alert as a pending row (INSERT ... ON CONFLICT DO NOTHING: a row already there, sent or not,
    is the same alert)."""
    global _kept_pid
    with _kept_lock:
        if _kept_pid != os.getpid() or len(_kept) > 10_000:
            _kept.clear()
            _kept_pid = os.getpid()
        if (grant_id, since, kind) in _kept:
            return
    GrantAlert.objects.bulk_create([GrantAlert(grant_id=grant_id, period_start=since, kind=kind, spent=spent, pending=True)],
                                   ignore_conflicts=True)
    with _kept_lock:
        _kept.add((grant_id, since, kind))


def _take_kept() -> bool:
    """Whether this process kept alerts pending since it last asked (it then has deliver_pending run)."""
    with _kept_lock:
        kept = bool(_kept) and _kept_pid == os.getpid()
        _kept.clear()
        return kept


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
    """Redis is down and production grants admitted calls unchecked: IT hears about it once an hour. The
    broker is that Redis, so the alert is kept pending at once (one insert per process and hour) and goes out
    when it is back."""
    if grants:
        hour = timezone.now().replace(minute=0, second=0, microsecond=0)
        _queue(grants[0], hour, "unverified", Decimal(0), broker=False)


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
    alert, _ = GrantAlert.objects.get_or_create(
        grant_id=grant_id, period_start=datetime.fromisoformat(since_iso), kind=kind,
        defaults={"spent": Decimal(spent), "pending": True})
    return deliver(alert.pk)


def deliver(alert_id: int) -> bool:
    """Send a pending alert; returns whether this call sent it. The row is locked (others skip it) while the
    email goes out and marked sent in the same transaction, so whoever races for it, it is sent once; if
    the mail server fails, nothing is marked and the next run tries again. The email is sent here rather
    than queued as a task: the broker being down is what kept many of these alerts pending."""
    with transaction.atomic():
        alert = (GrantAlert.objects.select_for_update(skip_locked=True, of=("self",)).select_related("grant__owner")
                 .filter(pk=alert_id, pending=True).first())
        if alert is None:
            return False
        grant = alert.grant
        subject, body = _message(grant, alert.kind, alert.spent)
        recipients = [grant.owner, *grant.watchers.all()]
        if alert.kind in ("page", "unverified"):
            recipients += roles.people_with_role(roles.IT_ADMIN)
        addresses = sorted({person.email for person in recipients} - {""})
        if addresses:
            send_mail(f"[Tollgate] {subject}", body, None, addresses)
        alert.pending, alert.sent_at = False, timezone.now()
        alert.save(update_fields=["pending", "sent_at"])
        if alert.kind not in ("forecast", "unverified"):  # percents, "cap" and "page": a line was crossed
            webhook_emit("budget.threshold_crossed", grant_alert_payload(alert))
    if grant.webhook_url:
        try:
            requests.post(grant.webhook_url, json={"text": f"*{subject}*\n{body}"}, timeout=5).raise_for_status()
        except requests.RequestException as exc:
            log.warning("budget webhook for grant %s failed: %s", grant.pk, type(exc).__name__)
    return True


def deliver_pending(*, batch_size: int = 200) -> int:
    """Send the alerts kept while they could not be queued, oldest first. Safe to run twice at once."""
    sent = 0
    pending = GrantAlert.objects.filter(pending=True).order_by("sent_at").values_list("pk", flat=True)[:batch_size]
    for alert_id in list(pending):
        try:
            sent += deliver(alert_id)
        except Exception:  # this one stays pending for the next run; the others still go out
            log.exception("budget alert %s could not be delivered", alert_id)
    return sent


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
