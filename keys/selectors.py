"""Reads of virtual keys."""
from decimal import Decimal

from django.db.models import DecimalField, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from keys import keyformat
from keys.models import AccessRequest, VirtualKey


def key_by_secret(secret: str) -> VirtualKey | None:
    """The key for a presented secret, or None. A malformed secret (bad shape or checksum) costs no query.
    A secret rotated out still matches during its grace period."""
    if not keyformat.is_well_formed(secret):
        return None
    digest = keyformat.hash_key(secret)
    key = next(iter(
        VirtualKey.objects.select_related("person", "team", "team__cost_center")
        .filter(Q(key_hash=digest) | Q(previous_key_hash=digest))
        .order_by()[:1]  # at most one row matches; skip the default ORDER BY
    ), None)
    if key is None:
        return None
    # The lookup is by hash already; the constant-time compare guards against any future lookup by prefix.
    if keyformat.matches(secret, key.key_hash):
        return key
    in_grace = key.previous_key_expires_at is not None and key.previous_key_expires_at > timezone.now()
    if key.previous_key_hash and in_grace and keyformat.matches(secret, key.previous_key_hash):
        return key
    return None


def keys_for_person(person):
    """The keys a person may see, with this month's spend from the ledger."""
    from ledger.models import LedgerEntry

    month_start = timezone.localtime().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spend = (
        LedgerEntry.objects.filter(key=OuterRef("pk"), created_at__gte=month_start)
        .values("key").annotate(total=Sum("cost")).values("total")
    )
    return (
        VirtualKey.objects.visible_to(person)
        .select_related("team", "person")
        .prefetch_related("allowed_models")
        .annotate(spend_this_month=Coalesce(Subquery(spend), Value(Decimal(0)), output_field=DecimalField()))
    )


def requests_awaiting(person):
    """Pending requests this person may decide: all for IT, else those of teams they own or approve for."""
    from governance.models import Membership

    pending = AccessRequest.objects.filter(status=AccessRequest.Status.PENDING).select_related("requester", "team", "key")
    if person.has_perm("keys.change_accessrequest"):
        return pending
    teams = Membership.objects.filter(
        person=person, role__in=[Membership.Role.OWNER, Membership.Role.APPROVER]).values("team_id")
    return pending.filter(Q(team_id__in=teams) | Q(team__owner=person)).exclude(requester=person)
