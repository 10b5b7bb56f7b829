"""Reads of grants for the owner's pages and the admin."""
from decimal import Decimal

from django.db.models import Q
from django.utils import timezone

from budgets.enforcement import held_now, spent_now
from budgets.models import Grant, IncreaseRequest

RENEWAL_WINDOW_DAYS = 14


def grants_for_owner(person) -> list[Grant]:
    """The person's grants (and everything delegated under them), each with this period's spend."""
    grants = list(Grant.objects.filter(Q(owner=person) | Q(parent__owner=person)).select_related("parent", "owner")
                  .order_by("parent_id", "name"))
    today = timezone.localdate()
    for grant in grants:
        grant.spent, grant.held = spent_now(grant), held_now(grant)
        # What calls are refused against is spend plus what calls in flight hold: the bar shows both.
        committed = grant.spent + grant.held
        grant.percent = int(min(committed / grant.limit_amount * 100, 999)) if grant.limit_amount else 0
        grant.spent_percent = int(min(grant.spent / grant.limit_amount * 100, 100)) if grant.limit_amount else 0
        grant.left = max(grant.limit_amount - committed, Decimal(0))
        # Due within the window of the term that is running; a renewed grant's next term has not started.
        grant.renewal_due = (grant.renews_at is not None and grant.term_start <= today
                             and grant.renews_at <= today + timezone.timedelta(days=RENEWAL_WINDOW_DAYS))
    return grants


def increases_awaiting(person):
    pending = (IncreaseRequest.objects.filter(status=IncreaseRequest.Status.PENDING).exclude(requester=person)
               .select_related("grant", "requester"))  # never one's own (budgets.services.increase_decide)
    if person.has_perm("budgets.change_grant"):
        return pending
    return pending.filter(approver=person)


def usage_percent(grant: Grant) -> Decimal:
    return spent_now(grant) / grant.limit_amount * 100 if grant.limit_amount else Decimal(0)
