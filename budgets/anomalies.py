"""Anomaly detection: every few minutes (beat), each key, person and team's last window of the ledger against the
mean window of the baseline hours before it. Findings become Alerts (one open per kind and subject), sent to the
owners and IT by email and webhook; a runaway experimentation key may be suspended, and reinstated from its alert.

The business rules are here only: the beat task, the admin actions and the dashboard call these functions."""
import ipaddress
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import requests
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from django.db.models import Count, Q, QuerySet, Sum, Value
from django.urls import reverse
from django.utils import timezone

from budgets.models import Alert
from gateway.models import ModelAlias
from governance import roles
from governance.audit import audit_record, snapshot
from governance.models import Person, Team, UsageClass
from governance.notify import email_after_commit
from governance.webhooks import webhook_emit
from keys.models import VirtualKey
from keys.services.lifecycle import KeyStateError, key_reactivate, key_suspend
from ledger.models import LedgerEntry

log = logging.getLogger(__name__)

SYSTEM_LABEL = "anomaly detection"
WEBHOOK_TIMEOUT_SECONDS = 5
_SUSPENDING_KINDS = {Alert.Kind.RATE, Alert.Kind.SPEND}


class AlertStateError(Exception):
    """The change does not apply to the alert in its current state."""


@dataclass(frozen=True)
class Policy:
    window: timedelta
    baseline: timedelta
    rate_factor: Decimal
    min_calls: int
    min_spend: Decimal
    call_cost: Decimal
    premium_min_calls: int
    suspend: str  # "experimentation" or "off"

    @classmethod
    def from_settings(cls) -> "Policy":
        return cls(
            window=timedelta(minutes=settings.TOLLGATE_ANOMALY_WINDOW_MINUTES),
            baseline=timedelta(hours=settings.TOLLGATE_ANOMALY_BASELINE_HOURS),
            rate_factor=Decimal(settings.TOLLGATE_ANOMALY_RATE_FACTOR),
            min_calls=settings.TOLLGATE_ANOMALY_MIN_CALLS,
            min_spend=Decimal(settings.TOLLGATE_ANOMALY_MIN_SPEND),
            call_cost=Decimal(settings.TOLLGATE_ANOMALY_CALL_COST),
            premium_min_calls=settings.TOLLGATE_ANOMALY_PREMIUM_MIN_CALLS,
            suspend=settings.TOLLGATE_ANOMALY_SUSPEND,
        )

    @property
    def windows_in_baseline(self) -> Decimal:
        return Decimal(self.baseline / self.window)


@dataclass
class Finding:
    kind: str
    level: str  # "key", "person" or "team"
    subject_id: int
    evidence: dict

    @property
    def subject(self) -> str:
        return f"{self.level}:{self.subject_id}"


@dataclass
class Tally:
    calls: int = 0
    cost: Decimal = Decimal(0)
    premium: int = 0
    premium_models: set = field(default_factory=set)


LEVELS = ("key", "person", "team")


# --- Reading the ledger -------------------------------------------------------------------------------

def _calls(start: datetime, end: datetime) -> QuerySet:
    """The window's calls. created_at has no index of its own (months are partitions): naming every team reads
    one short range of the (team, created_at) index per team instead of the month's whole partition. Every
    call made with a key carries the key's team; adjustments are finance's, not traffic."""
    team_ids = list(Team.objects.values_list("pk", flat=True))
    return (LedgerEntry.objects.filter(team_id__in=team_ids, created_at__gte=start, created_at__lt=end)
            .exclude(outcome=LedgerEntry.Outcome.ADJUSTMENT).order_by())


def _premium_count(premium_ids: set[int]):
    return Count("id", filter=Q(alias_id__in=premium_ids)) if premium_ids else Value(0)


def _baseline(level: str, ids: set[int], start: datetime, end: datetime, premium_ids: set[int],
              person_keys: set[int]) -> dict[int, Tally]:
    """Calls, spend and premium calls per subject over the baseline, aggregated in SQL. Keys and teams read
    their own (key|team, created_at) index; a person has no index of their own, so their calls are read
    through the keys they hold or used in the window."""
    if not ids:
        return {}
    rows = LedgerEntry.objects.filter(created_at__gte=start, created_at__lt=end).exclude(
        outcome=LedgerEntry.Outcome.ADJUSTMENT).order_by()
    if level == "person":
        rows = rows.filter(person_id__in=ids, key_id__in=person_keys)
    else:
        rows = rows.filter(**{f"{level}_id__in": ids})
    totals = rows.values(f"{level}_id").annotate(calls=Count("id"), cost=Sum("cost"), premium=_premium_count(premium_ids))
    return {row[f"{level}_id"]: Tally(calls=row["calls"], cost=row["cost"] or Decimal(0), premium=row["premium"])
            for row in totals}


def network_of(address: str) -> str:
    """The /24 of an IPv4 address, the /48 of an IPv6 one: the source network a key is seen from."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False))


# --- Deciding -------------------------------------------------------------------------------------------

def _ratio(value: Decimal, mean: Decimal) -> str | None:
    return f"{value / mean:.1f}" if mean else None


def find_anomalies(*, start: datetime, end: datetime, policy: Policy) -> list[Finding]:
    """What the window [start, end) shows against the baseline before it. Reads only; raises nothing."""
    premium_aliases = dict(ModelAlias.objects.filter(tier=ModelAlias.Tier.PREMIUM).values_list("pk", "name"))
    premium_ids = set(premium_aliases)
    window = {level: defaultdict(Tally) for level in LEVELS}
    # Per (subject, key): how much of a person's or team's window came through each key, so a person or team
    # alert that one runaway key already explains is not sent three times.
    through_key: dict[str, dict[tuple[int, int], Tally]] = {level: defaultdict(Tally) for level in ("person", "team")}
    for row in (_calls(start, end).exclude(key_id=None).values("key_id", "person_id", "team_id", "alias_id")
                .annotate(calls=Count("id"), cost=Sum("cost"))):
        premium = row["alias_id"] in premium_ids
        for level in LEVELS:
            subject_id = row[f"{level}_id"]
            if subject_id is None:
                continue
            targets = [window[level][subject_id]]
            if level != "key":
                targets.append(through_key[level][(subject_id, row["key_id"])])
            for tally in targets:
                tally.calls += row["calls"]
                tally.cost += row["cost"] or Decimal(0)
                if premium:
                    tally.premium += row["calls"]
                    tally.premium_models.add(premium_aliases[row["alias_id"]])
    if not window["key"]:
        return []

    baseline_start = start - policy.baseline
    person_ids = set(window["person"])
    person_keys = {key_id for (_, key_id) in through_key["person"]} | set(
        VirtualKey.objects.filter(person_id__in=person_ids).values_list("pk", flat=True))
    baseline = {level: _baseline(level, set(window[level]), baseline_start, start, premium_ids, person_keys)
                for level in LEVELS}

    findings: list[Finding] = []
    windows = policy.windows_in_baseline
    common = {"window_minutes": int(policy.window.total_seconds() // 60),
              "baseline_hours": round(policy.baseline.total_seconds() / 3600, 2)}
    for level in LEVELS:
        for subject_id, now in window[level].items():
            before = baseline[level].get(subject_id, Tally())
            mean_calls, mean_cost = Decimal(before.calls) / windows, before.cost / windows
            if now.calls >= policy.min_calls and now.calls >= policy.rate_factor * mean_calls:
                findings.append(Finding(Alert.Kind.RATE, level, subject_id, {
                    **common, "window_calls": now.calls, "baseline_calls": before.calls,
                    "usual_calls_per_window": f"{mean_calls:.2f}", "times_usual": _ratio(Decimal(now.calls), mean_calls),
                    "factor": str(policy.rate_factor), "min_calls": policy.min_calls}))
            if now.cost >= policy.min_spend and now.cost >= policy.rate_factor * mean_cost:
                findings.append(Finding(Alert.Kind.SPEND, level, subject_id, {
                    **common, "window_spend": f"{now.cost:.4f}", "baseline_spend": f"{before.cost:.4f}",
                    "usual_spend_per_window": f"{mean_cost:.4f}", "times_usual": _ratio(now.cost, mean_cost),
                    "factor": str(policy.rate_factor), "min_spend": str(policy.min_spend),
                    "currency": settings.TOLLGATE_CURRENCY}))
            if (level != "team" and now.premium >= policy.premium_min_calls and now.premium * 2 > now.calls
                    and before.calls > 0 and before.premium == 0):
                findings.append(Finding(Alert.Kind.PREMIUM_SWITCH, level, subject_id, {
                    **common, "window_calls": now.calls, "premium_calls": now.premium,
                    "premium_models": sorted(now.premium_models), "baseline_calls": before.calls,
                    "baseline_premium_calls": 0}))
    findings = _without_echoes(findings, window, through_key)
    findings += _expensive_calls(start, end, policy)
    findings += _new_networks(start, end, baseline_start, set(window["key"]), common)
    return findings


def _without_echoes(findings: list[Finding], window: dict, through_key: dict) -> list[Finding]:
    """Drop a person's or team's alert when keys alerted for the same kind carry most of its window."""
    flagged = {(f.kind, f.subject_id) for f in findings if f.level == "key"}
    kept = []
    for finding in findings:
        if finding.level != "key":
            total = window[finding.level][finding.subject_id]
            from_flagged = [tally for (subject_id, key_id), tally in through_key[finding.level].items()
                            if subject_id == finding.subject_id and (finding.kind, key_id) in flagged]
            measure = (lambda t: t.cost) if finding.kind == Alert.Kind.SPEND else (
                (lambda t: t.premium) if finding.kind == Alert.Kind.PREMIUM_SWITCH else (lambda t: t.calls))
            if from_flagged and sum(measure(t) for t in from_flagged) * 2 > measure(total):
                continue
        kept.append(finding)
    return kept


def _expensive_calls(start: datetime, end: datetime, policy: Policy) -> list[Finding]:
    by_key: dict[int, list[dict]] = defaultdict(list)
    for row in (_calls(start, end).filter(cost__gte=policy.call_cost).exclude(key_id=None).order_by("-cost")
                .values("key_id", "request_id", "cost", "model_requested", "created_at")[:500]):
        by_key[row["key_id"]].append(row)
    return [Finding(Alert.Kind.EXPENSIVE_CALL, "key", key_id, {
        "threshold": str(policy.call_cost), "currency": settings.TOLLGATE_CURRENCY, "calls_over": len(rows),
        "calls": [{"request_id": r["request_id"], "cost": f"{r['cost']:.4f}", "model": r["model_requested"],
                   "at": r["created_at"].isoformat()} for r in rows[:5]]})
        for key_id, rows in by_key.items()]


def _new_networks(start: datetime, end: datetime, baseline_start: datetime, key_ids: set[int], common: dict) -> list[Finding]:
    """Window addresses whose network the key did not call from in the baseline. A key with no calls in the
    baseline has nothing to compare with (a new key, the first call after a weekend) and raises nothing."""
    seen_now: dict[int, dict[str, int]] = defaultdict(dict)
    for row in (_calls(start, end).exclude(key_id=None).exclude(client_ip=None)
                .values("key_id", "client_ip").annotate(calls=Count("id"))):
        seen_now[row["key_id"]][row["client_ip"]] = row["calls"]
    if not seen_now:
        return []
    known: dict[int, set[str]] = defaultdict(set)
    for key_id, address in (LedgerEntry.objects.filter(key_id__in=set(seen_now), created_at__gte=baseline_start,
                                                         created_at__lt=start, client_ip__isnull=False)
                            .order_by().values_list("key_id", "client_ip").distinct()):
        known[key_id].add(network_of(address))
    findings = []
    for key_id, addresses in seen_now.items():
        if not known[key_id]:
            continue
        new = {address: calls for address, calls in addresses.items() if network_of(address) not in known[key_id]}
        if new:
            findings.append(Finding(Alert.Kind.NEW_NETWORK, "key", key_id, {
                **common, "new_networks": sorted({network_of(a) for a in new}), "addresses": sorted(new)[:20],
                "calls_from_new": sum(new.values()), "known_networks": sorted(known[key_id])[:20]}))
    return findings


# --- Raising --------------------------------------------------------------------------------------------

def anomalies_detect(*, now: datetime | None = None, policy: Policy | None = None) -> list[Alert]:
    """One detection run over the window that ends now. Safe to run twice at once: the constraint lets one
    open alert per kind and subject exist, and only the run that created it suspends or notifies."""
    policy = policy or Policy.from_settings()
    end = now or timezone.now()
    start = end - policy.window
    raised = []
    for finding in find_anomalies(start=start, end=end, policy=policy):
        alert = alert_raise(finding=finding, window_start=start, window_end=end, policy=policy)
        if alert is not None:
            raised.append(alert)
    return raised


def alert_raise(*, finding: Finding, window_start: datetime, window_end: datetime, policy: Policy) -> Alert | None:
    """Record the finding as an open alert (unless one is open for its kind and subject, or one was resolved after
    this window began: whoever resolved it saw these calls), audit it, apply the suspension policy and notify."""
    pending = Alert.objects.filter(kind=finding.kind, subject=finding.subject)
    if pending.exclude(status=Alert.Status.RESOLVED).exists() or pending.filter(resolved_at__gt=window_start).exists():
        return None
    fields = {"key": None, "person": None, "team": None}
    if finding.level == "key":
        key = VirtualKey.objects.select_related("person", "team").get(pk=finding.subject_id)
        fields = {"key": key, "person": key.person, "team": key.team}
    elif finding.level == "person":
        fields["person"] = Person.objects.get(pk=finding.subject_id)
    else:
        fields["team"] = Team.objects.get(pk=finding.subject_id)
    try:
        with transaction.atomic():
            alert = Alert.objects.create(kind=finding.kind, subject=finding.subject, evidence=finding.evidence,
                                         window_start=window_start, window_end=window_end, **fields)
            audit_record(actor=None, actor_label=SYSTEM_LABEL, action="alert.raise", obj=alert, after=snapshot(alert))
            if _suspends(alert, policy):
                try:
                    key_suspend(key=alert.key, actor=None, reason=f"Anomaly alert #{alert.pk}: {alert_summary(alert)}")
                except KeyStateError:
                    pass  # not active any more (revoked, expired, suspended): nothing to stop
                else:
                    alert.action_taken = "Key suspended (TOLLGATE_ANOMALY_SUSPEND=experimentation)."
                    alert.save(update_fields=["action_taken"])
            _notify(alert)
            webhook_emit("anomaly.raised", webhook_payload(alert))
    except IntegrityError:
        return None  # another run raised it between the check and the insert
    return alert


def _suspends(alert: Alert, policy: Policy) -> bool:
    return (policy.suspend == "experimentation" and alert.kind in _SUSPENDING_KINDS and alert.key is not None
            and alert.subject.startswith("key:") and alert.key.key_class == UsageClass.EXPERIMENTATION
            and alert.key.status == VirtualKey.Status.ACTIVE)


def alert_url(alert: Alert) -> str:
    return getattr(settings, "TOLLGATE_BASE_URL", "") + reverse("admin:budgets_alert_change", args=[alert.pk])


def alert_summary(alert: Alert) -> str:
    try:
        return _summary(alert)
    except (KeyError, IndexError, TypeError):  # evidence of another shape (an older alert): say what it is
        return alert.get_kind_display()


def _summary(alert: Alert) -> str:
    e, minutes = alert.evidence, alert.evidence.get("window_minutes")
    if alert.kind == Alert.Kind.RATE:
        times = f"{e['times_usual']}x the usual {e['usual_calls_per_window']}" if e.get("times_usual") else "no calls before"
        return f"{e['window_calls']} calls in {minutes} min, {times}"
    if alert.kind == Alert.Kind.SPEND:
        times = f"{e['times_usual']}x the usual {e['usual_spend_per_window']}" if e.get("times_usual") else "no spend before"
        return f"{e['window_spend']} {e['currency']} spent in {minutes} min, {times}"
    if alert.kind == Alert.Kind.EXPENSIVE_CALL:
        dearest = e["calls"][0]
        return (f"{e['calls_over']} call(s) over {e['threshold']} {e['currency']}, the dearest {dearest['cost']} "
                f"on {dearest['model'] or 'an unknown model'}")
    if alert.kind == Alert.Kind.PREMIUM_SWITCH:
        return (f"{e['premium_calls']} of {e['window_calls']} calls in {minutes} min on premium models "
                f"({', '.join(e['premium_models'])}); none in the {e['baseline_hours']} h before")
    if alert.kind == Alert.Kind.NEW_NETWORK:
        return (f"calls from {', '.join(e['new_networks'])}, not seen for this key in the {e['baseline_hours']} h before")
    return alert.get_kind_display()


def _recipients(alert: Alert) -> list[Person]:
    owners = [alert.person] if alert.subject.startswith("person:") else []
    if alert.key is not None:
        owners = [alert.key.person, alert.key.team.owner]
    elif alert.team is not None:
        owners = [alert.team.owner]
    return [p for p in owners if p is not None] + roles.people_with_role(roles.IT_ADMIN)


def _notify(alert: Alert) -> None:
    """Email the owners and IT, and queue the webhook, once the alert commits."""
    action = f"\nAction taken: {alert.action_taken}" if alert.action_taken else ""
    email_after_commit(
        to=_recipients(alert), subject=f"Anomaly: {alert.get_kind_display().lower()} on {alert.subject_label}",
        body=f"{alert.get_kind_display()} on {alert.subject_label}: {alert_summary(alert)}.{action}\n\n"
             f"Window: {alert.window_start:%Y-%m-%d %H:%M} to {alert.window_end:%H:%M} UTC.\n"
             f"Acknowledge or resolve it (and reinstate a suspended key) at {alert_url(alert)}")
    if settings.TOLLGATE_ALERT_WEBHOOK_URL:
        from budgets.tasks import send_anomaly_webhook

        # robust: a broker that is down must not undo the alert; the email says it all the same.
        transaction.on_commit(lambda: send_anomaly_webhook.delay(alert.pk), robust=True)


def webhook_payload(alert: Alert) -> dict:
    """What the webhook receives: the alert's identity, numbers and link. No key secrets or hashes, no prompts."""
    return {"alert": alert.pk, "kind": alert.kind, "subject": alert.subject, "subject_label": alert.subject_label,
            "status": alert.status, "evidence": alert.evidence, "window_start": alert.window_start.isoformat(),
            "window_end": alert.window_end.isoformat(), "action_taken": alert.action_taken, "url": alert_url(alert),
            "text": f"Tollgate anomaly: {alert.get_kind_display().lower()} on {alert.subject_label}: "
                    f"{alert_summary(alert)} ({alert_url(alert)})"}


def alert_webhook_send(alert_id: int) -> bool:
    """POST one alert to TOLLGATE_ALERT_WEBHOOK_URL; raises requests' errors so the task retries."""
    url = settings.TOLLGATE_ALERT_WEBHOOK_URL
    alert = Alert.objects.select_related("key", "person", "team").filter(pk=alert_id).first()
    if not url or alert is None:
        return False
    requests.post(url, json=webhook_payload(alert), timeout=WEBHOOK_TIMEOUT_SECONDS).raise_for_status()
    return True


# --- Acting on an alert ----------------------------------------------------------------------------------

def _may_act(actor: Person | None) -> None:
    if actor is not None and not actor.has_perm("budgets.change_alert"):
        raise PermissionDenied("Only IT can acknowledge or resolve anomaly alerts.")


def _locked(alert: Alert) -> Alert:
    return Alert.objects.select_for_update(of=("self",)).select_related("key", "person", "team").get(pk=alert.pk)


@transaction.atomic
def alert_acknowledge(*, alert: Alert, actor: Person | None, note: str = "") -> Alert:
    """Someone is on it: the alert stays (no new one of its kind and subject) until resolved."""
    _may_act(actor)
    alert = _locked(alert)
    if alert.status != Alert.Status.OPEN:
        raise AlertStateError(f"only open alerts can be acknowledged (this one is {alert.status})")
    before = snapshot(alert)
    alert.status, alert.acknowledged_by, alert.acknowledged_at = Alert.Status.ACKNOWLEDGED, actor, timezone.now()
    alert.save(update_fields=["status", "acknowledged_by", "acknowledged_at"])
    audit_record(actor=actor, action="alert.acknowledge", obj=alert, before=before, after={**snapshot(alert), "note": note})
    return alert


@transaction.atomic
def alert_resolve(*, alert: Alert, actor: Person | None, note: str = "", reinstate_key: bool = False) -> Alert:
    """Close the alert; with reinstate_key, reactivate the key it suspended (audited as key.reactivate). A
    resolved alert's kind and subject may alert again from the next window that starts after now."""
    _may_act(actor)
    alert = _locked(alert)
    if alert.status == Alert.Status.RESOLVED:
        raise AlertStateError("this alert is already resolved")
    before = snapshot(alert)
    if reinstate_key:
        if alert.key is None:
            raise AlertStateError("this alert is not about a key")
        was = alert.key.status
        key = key_reactivate(key=alert.key, actor=actor, reason=note or f"Reinstated from anomaly alert #{alert.pk}")
        if was != key.status:
            who = actor.get_username() if actor else "system"
            alert.action_taken = " ".join(filter(None, [alert.action_taken, f"Key reinstated by {who}."]))[:300]
    alert.status, alert.resolved_by, alert.resolved_at = Alert.Status.RESOLVED, actor, timezone.now()
    alert.save(update_fields=["status", "resolved_by", "resolved_at", "action_taken"])
    audit_record(actor=actor, action="alert.resolve", obj=alert, before=before,
                 after={**snapshot(alert), "note": note, "reinstate_key": reinstate_key})
    return alert


# --- Reading alerts ----------------------------------------------------------------------------------------

def open_alerts_for(user) -> QuerySet:
    """Alerts not yet resolved that `user` may see, newest first: IT, finance and auditors (view permission) all;
    everyone else those on their own keys or about themselves (a key's alert names its holder and team), and those
    on teams they own."""
    alerts = Alert.objects.exclude(status=Alert.Status.RESOLVED).select_related("key", "person", "team")
    if user.has_perm("budgets.view_alert"):
        return alerts
    return alerts.filter(Q(person=user) | Q(team__owner=user))
