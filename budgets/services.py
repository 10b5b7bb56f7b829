"""Writes to grants: delegation, increases, renewals, the expiry sweep and the counter check. Each state
change writes its AuditEvent in the same transaction."""
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from budgets.enforcement import UNIT, Meter, meters_for, period_start, to_units
from budgets.models import Grant, GrantAlert, IncreaseRequest
from governance import roles, runtime
from governance.audit import audit_record, snapshot
from governance.models import Person
from governance.notify import email_after_commit
from governance.redis import get_redis
from ledger.selectors import spend_since

log = logging.getLogger(__name__)


def _may_manage(person: Person, grant: Grant) -> bool:
    return Grant.objects.manageable_by(person).filter(pk=grant.pk).exists()


@transaction.atomic
def grant_delegate(*, parent: Grant, actor: Person, name: str, scope: str, limit_amount: Decimal,
                   owner: Person | None = None, project: str = "", environment: str = "", person: Person | None = None,
                   key=None, purpose: str = "") -> Grant:
    """A grant's owner splits it: a child grant for one of their projects, features, environments, people
    or keys, within the parent's limit (validated), without IT."""
    parent = Grant.objects.select_for_update().get(pk=parent.pk)
    if not _may_manage(actor, parent):
        raise PermissionDenied("Only the grant's owner can delegate from it.")
    child = Grant(
        name=name, owner=owner or person or actor, parent=parent, scope=scope, limit_amount=limit_amount,
        project=project, environment=environment, person=person, key=key, purpose=purpose,
        team=parent.team if scope in (Grant.Scope.PROJECT, Grant.Scope.ENVIRONMENT, Grant.Scope.PERSON) else None,
        department=parent.department, grant_class=parent.grant_class, period=parent.period,
        renews_at=parent.renews_at, term_start=parent.term_start,
    )
    child.full_clean()
    child.save()
    audit_record(actor=actor, action="grant.delegate", obj=child, after={**snapshot(child), "parent": parent.name})
    return child


def _apply_limit(grant: Grant, new_limit: Decimal, *, actor: Person | None, reason: str) -> Grant:
    before = snapshot(grant)
    grant.limit_amount = new_limit
    grant.full_clean()
    grant.save(update_fields=["limit_amount"])
    audit_record(actor=actor, actor_label=None if actor else "increase policy", action="grant.limit_change",
                 obj=grant, before=before, after={**snapshot(grant), "reason": reason})
    return grant


@transaction.atomic
def grant_increase_request(*, grant: Grant, requester: Person, new_limit: Decimal, reason: str) -> IncreaseRequest:
    """Small increases (up to TOLLGATE_GRANT_AUTO_INCREASE) that fit the parent are approved at once; larger
    ones wait for the parent grant's owner (or IT for a top-level grant)."""
    grant = Grant.objects.select_for_update(of=("self",)).select_related("parent__owner").get(pk=grant.pk)
    if grant.owner_id != requester.pk:
        raise PermissionDenied("Only the grant's owner can ask for more.")
    if new_limit <= grant.limit_amount:
        raise ValidationError({"new_limit": f"Ask for more than the current {grant.limit_amount}."})
    # Nobody decides their own increase: when the requester also owns the parent, IT decides.
    approver = grant.parent.owner if grant.parent and grant.parent.owner_id != requester.pk else None
    request = IncreaseRequest.objects.create(grant=grant, requester=requester, new_limit=new_limit, reason=reason,
                                             from_limit=grant.limit_amount, approver=approver)
    audit_record(actor=requester, action="grant.increase_request", obj=grant,
                 after={"from": grant.limit_amount, "to": new_limit, "reason": reason})
    if new_limit - grant.limit_amount + _automatic_this_period(grant) <= settings.TOLLGATE_GRANT_AUTO_INCREASE:
        try:
            with transaction.atomic():
                _apply_limit(grant, new_limit, actor=None, reason=f"increase under the policy threshold: {reason}")
        except ValidationError:
            pass  # does not fit the parent: a person decides
        else:
            _decide_increase(request, status=IncreaseRequest.Status.APPROVED, actor=None, reason="under the policy threshold")
            return request
    recipients = [request.approver] if request.approver else []
    email_after_commit(to=recipients or _it_people(), subject=f"{requester} asks to raise '{grant.name}' to {new_limit}",
                       body=f"Grant '{grant.name}' is at {grant.limit_amount}; {requester} asks for {new_limit}: {reason}")
    return request


def _automatic_this_period(grant: Grant) -> Decimal:
    """What the policy has added to this grant without anyone deciding, this period: the threshold caps the
    sum, so ten small increases cannot do what one large one may not."""
    since = period_start(grant.period, term_start=grant.term_start)
    added = (IncreaseRequest.objects.filter(grant=grant, status=IncreaseRequest.Status.APPROVED, decided_by=None,
                                            created_at__gte=since, from_limit__isnull=False)
             .aggregate(total=Sum(F("new_limit") - F("from_limit")))["total"])
    return added or Decimal(0)


def _it_people() -> list[Person]:
    return roles.people_with_role(roles.IT_ADMIN)


def _decide_increase(request: IncreaseRequest, *, status: str, actor: Person | None, reason: str) -> None:
    request.status, request.decided_by, request.decided_at, request.decision_reason = status, actor, timezone.now(), reason
    request.save(update_fields=["status", "decided_by", "decided_at", "decision_reason"])
    audit_record(actor=actor, actor_label=None if actor else "increase policy", action=f"grant.increase_{status}",
                 obj=request.grant, after={"to": request.new_limit, "reason": reason})
    email_after_commit(to=[request.requester], subject=f"Your increase for '{request.grant.name}' was {status}",
                       body=f"Requested {request.new_limit}: {status}" + (f" ({reason})" if reason else "."))


@transaction.atomic
def increase_decide(*, request: IncreaseRequest, actor: Person, approve: bool, reason: str = "") -> IncreaseRequest:
    request = IncreaseRequest.objects.select_for_update(of=("self",)).select_related("grant", "requester").get(pk=request.pk)
    if request.status != IncreaseRequest.Status.PENDING:
        raise ValidationError(f"This request was already {request.status}.")
    if actor.pk == request.requester_id:  # separation of duties, IT included
        raise PermissionDenied("You cannot decide your own increase: the parent grant's owner or IT must.")
    if actor.pk != request.approver_id and not actor.has_perm("budgets.change_grant"):
        raise PermissionDenied("Only the parent grant's owner or IT can decide this increase.")
    if approve:
        grant = Grant.objects.select_for_update().get(pk=request.grant_id)
        _apply_limit(grant, request.new_limit, actor=actor, reason=reason or f"increase request #{request.pk}")
    elif not reason.strip():
        raise ValidationError({"reason": "Give a reason for the denial."})
    _decide_increase(request, status=IncreaseRequest.Status.APPROVED if approve else IncreaseRequest.Status.DENIED,
                     actor=actor, reason=reason)
    return request


@transaction.atomic
def grant_renew(*, grant: Grant, actor: Person) -> Grant:
    """The next term: as long as the last one, starting the day after it ends (or today, if it lapsed)."""
    grant = Grant.objects.select_for_update().get(pk=grant.pk)
    if not _may_manage(actor, grant):
        raise PermissionDenied("Only the grant's owner or IT can renew it.")
    if grant.renews_at is None:
        raise ValidationError("This grant does not expire.")
    before = snapshot(grant)
    length = max((grant.renews_at - grant.term_start).days, 1)
    grant.term_start = max(grant.renews_at + timedelta(days=1), timezone.localdate())
    grant.renews_at = grant.term_start + timedelta(days=length)
    grant.status = Grant.Status.ACTIVE
    grant.save(update_fields=["term_start", "renews_at", "status"])
    audit_record(actor=actor, action="grant.renew", obj=grant, before=before, after=snapshot(grant))
    return grant


LAPSE_NOTICE_DAYS = (1, 7)


def grants_lapse_notices(*, today=None) -> int:
    """Warn owners 7 days and 1 day before a grant lapses (its renewal date passes). Each notice goes once per
    term (a GrantAlert row, unique per grant, term and kind: two sweeps at once send it once), the nearest
    first, so a grant with a day left gets the 1-day notice only."""
    from django.db import IntegrityError

    today = today or timezone.localdate()
    sent = 0
    for days in LAPSE_NOTICE_DAYS:
        due = Grant.objects.filter(status=Grant.Status.ACTIVE, renews_at__gte=today,
                                   renews_at__lte=today + timedelta(days=days)).select_related("owner")
        for grant in due:
            term = timezone.make_aware(timezone.datetime.combine(grant.term_start, timezone.datetime.min.time()))
            earlier = {f"lapse-{d}" for d in LAPSE_NOTICE_DAYS if d <= days}
            if GrantAlert.objects.filter(grant=grant, period_start=term, kind__in=earlier).exists():
                continue
            try:
                with transaction.atomic():
                    GrantAlert.objects.create(grant=grant, period_start=term, kind=f"lapse-{days}", spent=0)
                    left = (grant.renews_at - today).days
                    when = "today" if left == 0 else "tomorrow" if left == 1 else f"in {left} days"
                    email_after_commit(
                        to=[grant.owner, *grant.watchers.all()], subject=f"Your grant '{grant.name}' lapses {when}",
                        body=f"'{grant.name}' ({grant.limit_amount} {settings.TOLLGATE_CURRENCY} {grant.period_phrase}) runs "
                             f"until {grant.renews_at:%Y-%m-%d}; calls it covers are refused after that. Renew it from "
                             f"{getattr(settings, 'TOLLGATE_BASE_URL', '').rstrip('/')}/budgets/ if it is still needed.")
            except IntegrityError:
                continue  # another sweep sent it
            sent += 1
    return sent


def grants_expire_sweep(*, today=None) -> int:
    """Grants past their renewal date expire (claimed one by one with a conditional UPDATE, so two sweeps
    at once never double-audit)."""
    today = today or timezone.localdate()
    expired = 0
    for grant in Grant.objects.filter(status=Grant.Status.ACTIVE, renews_at__lt=today).select_related("owner"):
        with transaction.atomic():
            if Grant.objects.filter(pk=grant.pk, status=Grant.Status.ACTIVE).update(status=Grant.Status.EXPIRED) == 1:
                audit_record(actor=None, actor_label="expiry sweep", action="grant.expire", obj=grant,
                             before={"status": "active"}, after={"status": "expired", "renews_at": grant.renews_at})
                email_after_commit(to=[grant.owner], subject=f"Grant '{grant.name}' expired",
                                   body=f"'{grant.name}' was not renewed by {grant.renews_at}; calls on it are refused.")
                expired += 1
    if expired:
        runtime.changed(runtime.GRANTS)  # a bulk UPDATE sends no post_save
    return expired


_COMPARE_AND_SET = """
if tonumber(redis.call('GET', KEYS[1]) or '-1') == tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""


@dataclass
class CounterReport:
    checked: int = 0
    drift: list[tuple[str, int, int]] = field(default_factory=list)  # (meter, counter, ledger) in units


def grant_counters_verify(*, repair: bool = True) -> CounterReport:
    """Compare this period's counter of every active grant, and of every key with a monthly budget, with the
    ledger; report (and repair) drift. The repair is a compare-and-set, so a call settling meanwhile is
    never overwritten. A missing counter is left alone: it is rebuilt from the ledger on its next use."""
    report = CounterReport()
    client = get_redis()
    if client is None:
        return report
    for grant in Grant.objects.filter(status=Grant.Status.ACTIVE):
        for meter in meters_for([grant]):
            report.checked += 1
            counter = client.get(meter.redis_keys()[0])
            if counter is not None:
                _compare(client, meter, int(counter), _counted(meter), report, repair=repair)
    _verify_key_counters(client, report, repair=repair)
    for base, counter, ledger in report.drift:
        log.warning("budget counter %s drifted: %d units counted, %d in the ledger", base, counter, ledger)
        audit_record(actor=None, actor_label="counter check", action="grant.counter_repair",
                     after={"counter": base, "counted": str(counter * UNIT), "ledger": str(ledger * UNIT)})
    return report


def _verify_key_counters(client, report: CounterReport, *, repair: bool, batch_size: int = 1000) -> None:
    """Keys' own monthly caps: all in the same month, so their counters are read with one MGET and their
    ledger totals with one grouped query per batch, however many keys there are."""
    from keys.models import VirtualKey

    keys = VirtualKey.objects.filter(monthly_budget__isnull=False).order_by("pk")
    last_pk = 0
    while batch := list(keys.filter(pk__gt=last_pk)[:batch_size]):
        last_pk = batch[-1].pk
        meters = [meters_for([], key)[0] for key in batch]
        report.checked += len(meters)
        counted = {m.key_id: int(c) for m, c in zip(meters, client.mget([m.redis_keys()[0] for m in meters])) if c is not None}
        if not counted:
            continue
        ledger = spend_since(since=meters[0].since, key_ids=list(counted), by_key=True)
        for meter in meters:
            if meter.key_id in counted:
                _compare(client, meter, counted[meter.key_id], to_units(ledger.get(meter.key_id) or Decimal(0)), report,
                         repair=repair)


def _counted(meter: Meter) -> int:
    """What the ledger says a meter has spent, read from the rollups (and the entries not yet folded)."""
    total = spend_since(since=meter.since, grant_id=meter.grant.pk if meter.grant else None,
                        key_ids=[meter.key_id] if meter.key_id else None, unit=meter.unit)
    return int(total) if meter.unit == "tokens" else to_units(total)


def _compare(client, meter: Meter, counter: int, ledger: int, report: CounterReport, *, repair: bool) -> None:
    if counter != ledger:
        report.drift.append((meter.base, counter, ledger))
        if repair:
            client.eval(_COMPARE_AND_SET, 1, meter.redis_keys()[0], counter, ledger)
