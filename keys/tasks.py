"""Beat tasks for keys: the hourly expiry sweep and the weekly unused-key report."""
from celery import shared_task
from django.utils import timezone

from budgets.services import grants_expire_sweep, grants_lapse_notices
from governance import roles
from governance.notify import email_after_commit
from keys.models import VirtualKey
from keys.services import keys_expire_sweep


@shared_task
def expire_keys_and_grants() -> dict:
    result = keys_expire_sweep()
    return {"keys_expired": result.expired, "notices": result.notices, "grants_expired": grants_expire_sweep(),
            "grant_notices": grants_lapse_notices()}


@shared_task
def report_unused_keys(days: int = 30) -> int:
    """Active keys unused for `days` (or never used and older than that), to IT and to each team's owner."""
    cutoff = timezone.now() - timezone.timedelta(days=days)
    unused = list(
        VirtualKey.objects.filter(status=VirtualKey.Status.ACTIVE, created_at__lt=cutoff)
        .exclude(last_used_at__gte=cutoff).select_related("team__owner", "person").order_by("team__name")
    )
    if not unused:
        return 0
    line = lambda k: f"- {k.prefix}… {k.name} ({k.team}, {k.person or 'service key'}), last used {k.last_used_at or 'never'}"
    it_people = roles.people_with_role(roles.IT_ADMIN)
    email_after_commit(to=it_people, subject=f"{len(unused)} keys unused for {days} days",
                       body="\n".join(line(k) for k in unused))
    for owner in {k.team.owner for k in unused}:
        mine = [k for k in unused if k.team.owner == owner]
        email_after_commit(to=[owner], subject=f"{len(mine)} of your team's keys are unused",
                           body="Consider revoking:\n" + "\n".join(line(k) for k in mine))
    return len(unused)
